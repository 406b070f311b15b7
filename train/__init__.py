"""Training: the command line (``python -m train.run``), checkpoints, sampling and evaluation."""
