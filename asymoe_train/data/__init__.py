"""Conversation encoding, tokenizer and the webdataset pipeline."""
