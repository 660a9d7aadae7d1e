from stuseg.cli.app import main

main()
