"""Fine-tuning a pretrained STU-Net on a user's labelled scans, with nnU-Net v2 as the training engine
(the optional extra ``stuseg[finetune]``)."""

__all__: list[str] = []  # the modules are the API: dataset, run, cli
