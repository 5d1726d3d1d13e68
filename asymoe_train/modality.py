"""Per-token modality codes. Modality is data: the collator writes it, every module reads it."""

TEXT = 0
IMAGE = 1
PAD = 2

CODES = {"text": TEXT, "image": IMAGE, "pad": PAD}
