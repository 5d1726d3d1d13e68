"""Trainer, curriculum stages, trainable groups, losses and checkpoints."""
