"""Metrics logging (W&B on rank 0), MoE routing metrics and console output."""
