"""Fine-tuning STU-Net on labelled scans with nnU-Net v2 as the training engine (the ``finetune`` extra)."""
