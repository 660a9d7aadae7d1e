"""Fine-tuning STU-Net on a user's labelled scans, with nnU-Net v2 as the training engine (optional extra)."""
