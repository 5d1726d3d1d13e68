"""Answer a question about an image with an exported model: the prompt goes through the same conversation template,
image preprocessing and left-padded collation as evaluation, and the answer through the same greedy decoding."""

from __future__ import annotations

import json

from asymoe_train.config.derive import image_tokens_per_image
from asymoe_train.data.batch import Batch, collate
from asymoe_train.data.conversation import ConversationEncoder, MalformedSample
from asymoe_train.data.decode import SampleDecoder
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.evaluation.vqa import greedy_generate
from asymoe_train.export import ExportConfig


def prompt_batch(image: bytes, question: str, tokenizer: TextTokenizer, meta: ExportConfig) -> Batch:
    """A one-question generation batch, built as the eval pipeline builds one from a shard sample."""
    encoder = ConversationEncoder(tokenizer, meta.template, image_tokens_per_image(meta.model.vision))
    decoder = SampleDecoder(encoder, meta.image_size, meta.max_length, split_turns=True)
    # A shard sample; the image key only has to be an image extension (PIL detects the format from the bytes). The
    # answer is a placeholder that keeps the conversation well-formed: a prompt leaves the last answer out.
    sample = {"png": image, "json": json.dumps({"conversations": [{"from": "human", "value": question},
                                                                  {"from": "gpt", "value": "?"}]})}
    try:
        pixels_CHW, sequences = decoder.decode(sample, prompt_only=True)
    except MalformedSample as exn:
        raise ValueError(str(exn)) from None
    if not sequences:
        raise ValueError(f"the prompt is longer than the model's max_length={meta.max_length} tokens; "
                         "ask a shorter question")
    return collate(sequences, [pixels_CHW], 1, {}, tokenizer.pad_id, left_pad=True)


def generate(model, tokenizer: TextTokenizer, meta: ExportConfig, image: str | bytes, question: str,
             max_new_tokens: int | None = None) -> str:
    """The model's greedy answer to ``question`` about ``image`` (a file path or the file's bytes); at most
    ``max_new_tokens`` tokens (default: the run's ``eval.max_new_tokens``)."""
    if isinstance(image, str):
        with open(image, "rb") as f:
            image = f.read()
    batch = prompt_batch(image, question, tokenizer, meta)
    param = next(model.parameters())
    batch.to(param.device, param.dtype)
    return greedy_generate(model, batch, tokenizer, max_new_tokens or meta.max_new_tokens)[0]
