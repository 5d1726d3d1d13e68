"""LLaVA-format conversations -> ``input_ids``, ``labels`` and ``modality_ids``.

Only answer tokens (the assistant's words and the end-of-turn token) carry labels; prompt, image and padding
positions are ignored (-100). The image placeholder ``<image>`` expands to the model's image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.modality import IMAGE, TEXT

IGNORE = -100
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Template:
    """Plain-text chat template: ``<s>`` then per turn ``{user}{question}{assistant}{answer}</s>``."""

    user: str
    assistant: str


TEMPLATES = {
    "plain": Template(user="USER: ", assistant="\nASSISTANT: "),
}


@dataclass
class Encoded:
    """A tokenised sequence; ``labels`` aligned with ``input_ids`` (label at t is the token at t, or IGNORE)."""

    input_ids: list[int]
    labels: list[int]
    modality: list[int]

    def extend(self, ids: list[int], modality: int, supervised: bool) -> None:
        self.input_ids += ids
        self.labels += ids if supervised else [IGNORE] * len(ids)
        self.modality += [modality] * len(ids)


class MalformedSample(ValueError):
    """A sample that cannot be encoded; the pipeline skips it and counts it under ``reason``."""

    reason = "malformed"


class TooManyImages(MalformedSample):
    """A sample with more images (files or ``<image>`` placeholders) than the model takes."""

    reason = "too_many_images"


def turns(conversations: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs from alternating human/gpt messages."""
    if not conversations or len(conversations) % 2:
        raise MalformedSample(f"conversation has {len(conversations)} messages; expected human/gpt pairs")
    pairs = []
    for human, gpt in zip(conversations[::2], conversations[1::2]):
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise MalformedSample(f"expected human then gpt, got {human.get('from')!r} then {gpt.get('from')!r}")
        pairs.append((str(human.get("value", "")), str(gpt.get("value", ""))))
    return pairs


class ConversationEncoder:
    """Encodes (question, answer) turns with a template; ``num_image_tokens`` positions per ``<image>``."""

    def __init__(self, tokenizer: TextTokenizer, template: str, num_image_tokens: int):
        if template not in TEMPLATES:
            raise ValueError(f"data.template={template!r} is unknown; expected one of {sorted(TEMPLATES)}")
        self.tok = tokenizer
        self.template = TEMPLATES[template]
        self.num_image_tokens = num_image_tokens

    def _question(self, seq: Encoded, question: str) -> None:
        parts = question.split(IMAGE_PLACEHOLDER)
        if len(parts) > 2:
            raise MalformedSample(f"question holds {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders; at most 1")
        seq.extend(self.tok.encode(self.template.user + parts[0].strip()), TEXT, False)
        if len(parts) == 2:
            seq.extend([self.tok.image_id] * self.num_image_tokens, IMAGE, False)
            seq.extend(self.tok.encode(parts[1].strip()), TEXT, False)
        seq.extend(self.tok.encode(self.template.assistant), TEXT, False)

    def encode(self, pairs: list[tuple[str, str]], with_last_answer: bool = True) -> Encoded:
        """All turns; the last answer is left out when ``with_last_answer`` is False (a generation prompt)."""
        seq = Encoded([], [], [])
        seq.extend([self.tok.bos_id], TEXT, False)
        for n, (question, answer) in enumerate(pairs):
            self._question(seq, question)
            if n < len(pairs) - 1 or with_last_answer:
                seq.extend(self.tok.encode(answer.strip()) + [self.tok.eos_id], TEXT, True)
        return seq
