"""asymoe_train: training modality-asymmetric MoE vision-language models."""
