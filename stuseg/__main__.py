from stuseg.cli import main

main()
