"""Text tokenizer: a ``tokenizers`` JSON file with the framework's special tokens, or a Hugging Face tokenizer
directory (the LM's own tokenizer, with its chat template if it has one).

A JSON file must hold ``<pad>``, ``<s>``, ``</s>`` and ``<image>`` (what ``data_recipes/easy_vqa.py`` trains). A
directory (``tokenizer.json`` / ``tokenizer_config.json`` / ``chat_template.jinja``, as ``save_pretrained`` writes or
a checkpoint ships) is loaded with transformers, offline; it brings its own bos/eos/pad tokens and must hold
``<image>``.
"""

from __future__ import annotations

import os

from tokenizers import Tokenizer

SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "image": "<image>"}
IMAGE_TOKEN = SPECIALS["image"]
# Stands for an answer when the chat template is probed for its end-of-turn token: one word, so templates that trim
# or capitalise nothing leave it intact.
_PROBE_ANSWER = "ASYMOEPROBEANSWER"


class TextTokenizer:
    """The ids the collator and generator use, and the text <-> ids maps.

    ``eos_id`` is the token that ends an answer, where generation stops: for a directory whose chat template ends an
    assistant turn with a special token (``<|im_end|>``, ``<|eot_id|>``, ``<|end|>``), that token, else the eos token.
    ``bos_id`` is None for tokenizers without one (Qwen2); ``pad_id`` falls back to ``<pad>``, then to ``eos_id``
    (padding positions are masked by modality, so their id is never attended to or supervised).
    """

    def __init__(self, path: str):
        self.path = path
        self.chat_template: str | None = None
        self._hf = None
        if os.path.isdir(path):
            self._load_directory(path)
        elif os.path.isfile(path):
            self._load_file(path)
        else:
            raise ValueError(f"data.tokenizer: {path} does not exist; build the demo shards with `make data`, or point "
                             "data.tokenizer at a tokenizer.json or a Hugging Face tokenizer directory")

    def _load_file(self, path: str) -> None:
        self.tok = Tokenizer.from_file(path)
        ids = {}
        for role, token in SPECIALS.items():
            token_id = self.tok.token_to_id(token)
            if token_id is None:
                raise ValueError(f"data.tokenizer: {path} has no special token {token!r} ({role})")
            ids[role] = token_id
        self.pad_id, self.bos_id, self.eos_id, self.image_id = ids["pad"], ids["bos"], ids["eos"], ids["image"]

    def _load_directory(self, path: str) -> None:
        from transformers import AutoTokenizer  # slow to import; only directories need it

        try:
            self._hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exn:
            raise ValueError(f"data.tokenizer: {path} is not a Hugging Face tokenizer directory ({exn}); point it at "
                             "a directory with tokenizer.json and tokenizer_config.json, or at a tokenizer.json") from None
        hf = self._hf
        vocab = hf.get_vocab()
        if IMAGE_TOKEN not in vocab:
            raise ValueError(
                f"data.tokenizer: {path} has no {IMAGE_TOKEN!r} token; add it once and save the tokenizer: "
                f"tok = AutoTokenizer.from_pretrained({path!r}); "
                f"tok.add_special_tokens({{'additional_special_tokens': [{IMAGE_TOKEN!r}]}}); tok.save_pretrained(...)"
            )
        if hf.eos_token_id is None:
            raise ValueError(f"data.tokenizer: {path} defines no eos_token; set one in its tokenizer_config.json")
        self.image_id = vocab[IMAGE_TOKEN]
        self.bos_id = hf.bos_token_id
        self.chat_template = hf.chat_template if isinstance(hf.chat_template, str) else None
        self.eos_id = self._end_of_turn() if self.chat_template else None
        self.eos_id = hf.eos_token_id if self.eos_id is None else self.eos_id
        pad = hf.pad_token_id if hf.pad_token_id is not None else vocab.get(SPECIALS["pad"])
        self.pad_id = self.eos_id if pad is None else pad

    def _end_of_turn(self) -> int | None:
        """The special token the chat template puts right after an assistant's words, if any."""
        text = self.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_ANSWER}])
        if _PROBE_ANSWER not in text:
            return None
        after = self.encode(text.split(_PROBE_ANSWER, 1)[1])
        special = set(self._hf.all_special_ids) | {i for i, t in self._hf.added_tokens_decoder.items() if t.special}
        return after[0] if after and after[0] in special else None

    @property
    def vocab_size(self) -> int:
        """Embedding rows the ids need (added tokens included)."""
        return len(self._hf) if self._hf is not None else self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, without bos/eos (templates place those)."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False)
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` with special tokens left out."""
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self.tok.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """``messages`` (``{"role": "user"|"assistant", "content": ...}``) rendered as text by the chat template."""
        if not self.chat_template:
            raise ValueError(f"data.tokenizer: {self.path} has no chat template")
        return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
