"""Text tokenizer: a ``tokenizers`` JSON file with the special tokens the framework needs."""

from __future__ import annotations

import os

from tokenizers import Tokenizer

SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "image": "<image>"}


class TextTokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` exposing the ids the collator and generator use."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise ValueError(f"data.tokenizer: {path} does not exist; build the demo shards with `make data`")
        self.path = path
        self.tok = Tokenizer.from_file(path)
        ids = {}
        for role, token in SPECIALS.items():
            token_id = self.tok.token_to_id(token)
            if token_id is None:
                raise ValueError(f"data.tokenizer: {path} has no special token {token!r} ({role})")
            ids[role] = token_id
        self.pad_id, self.bos_id, self.eos_id, self.image_id = ids["pad"], ids["bos"], ids["eos"], ids["image"]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
