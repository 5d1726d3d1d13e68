"""LLaVA-format conversations -> ``input_ids``, ``labels`` and ``modality_ids``.

Only answer tokens (the assistant's words and the token that ends its turn) carry labels; prompt, image and padding
positions are ignored (-100). The image placeholder ``<image>`` expands to the model's image tokens.

Two kinds of template (``data.template``):
- ``chat``: the tokenizer's own chat template (a Hugging Face tokenizer directory with ``chat_template``), rendered
  by transformers. The conversation is rendered turn by turn: the prompt up to each generation prompt, then each
  answer, and each rendering must extend the previous one (true of the usual templates: Llama-3, Qwen2, Phi-3,
  Mistral, SmolLM2), so the text splits into prompt pieces (unsupervised) and answer pieces (supervised up to and
  including the end-of-turn token; what follows it, such as ChatML's newline, is prompt).
- a name in :data:`TEMPLATES` (``plain``): ``<s>`` then per turn ``{user}{question}{assistant}{answer}</s>``.

``auto`` (the default) is ``chat`` when the tokenizer has a chat template, else ``plain``.
"""

from __future__ import annotations

from dataclasses import dataclass

from asymoe_train.config.names import IMAGE_PLACEHOLDER, NAMED_TEMPLATES
from asymoe_train.config.names import TEMPLATES as TEMPLATE_CHOICES
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.modality import IMAGE, TEXT

IGNORE = -100


@dataclass(frozen=True)
class Template:
    """Plain-text chat template: ``<s>`` then per turn ``{user}{question}{assistant}{answer}</s>``."""

    user: str
    assistant: str


TEMPLATES = {
    "plain": Template(user="USER: ", assistant="\nASSISTANT: "),
}
assert tuple(TEMPLATES) == NAMED_TEMPLATES, "asymoe_train.config.names.NAMED_TEMPLATES lists the templates"


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


ROLES = ("human", "gpt")  # LLaVA's roles, alternating from the question


def turns(conversations: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs from alternating human/gpt messages. A message that is not an object, has no role
    (``from``) or no text ``value``, an empty question or answer, an odd number of messages or roles out of order make
    the sample malformed (:class:`MalformedSample`): none of them is a training example whose answer means anything."""
    if not isinstance(conversations, list) or not conversations or len(conversations) % 2:
        count = len(conversations) if isinstance(conversations, list) else type(conversations).__name__
        raise MalformedSample(f"conversation has {count} messages; expected human/gpt pairs")
    texts = []
    for n, message in enumerate(conversations):
        expected = ROLES[n % 2]
        if not isinstance(message, dict):
            raise MalformedSample(f"message {n} is a {type(message).__name__}, not an object")
        role, value = message.get("from"), message.get("value")
        if role is None:
            raise MalformedSample(f"message {n} has no role ('from'); expected {expected!r}")
        if role != expected:
            raise MalformedSample(f"message {n} is from {role!r}, expected {expected!r} (roles alternate "
                                  f"{ROLES[0]}, {ROLES[1]}, ...)")
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise MalformedSample(f"message {n} ({role}) has no text 'value'")
        if not value.strip():
            raise MalformedSample(f"message {n} ({role}) is empty: an empty {'question' if n % 2 == 0 else 'answer'}")
        texts.append(value)
    return list(zip(texts[::2], texts[1::2]))


class ConversationEncoder:
    """Encodes (question, answer) turns with a template; ``num_image_tokens`` positions per ``<image>``.

    ``template`` is a :data:`TEMPLATE_CHOICES` value; ``template_name`` is what it resolved to (``chat`` or a name
    of :data:`TEMPLATES`).
    """

    def __init__(self, tokenizer: TextTokenizer, template: str, num_image_tokens: int):
        if template not in TEMPLATE_CHOICES:
            raise ValueError(f"data.template={template!r} is unknown; expected one of {list(TEMPLATE_CHOICES)}")
        if template == "chat" and not tokenizer.chat_template:
            raise ValueError(f"data.template=chat but data.tokenizer={tokenizer.path!r} has no chat template (a "
                             "Hugging Face tokenizer directory with chat_template in tokenizer_config.json or a "
                             "chat_template.jinja); use data.template=auto or plain")
        if template == "auto":
            template = "chat" if tokenizer.chat_template else "plain"
        self.tok = tokenizer
        self.template_name = template
        self.template = TEMPLATES.get(template)
        self.num_image_tokens = num_image_tokens
        if template == "chat":
            self._check_chat_template()

    # ------------------------------------------------------------------------------------------------ plain template
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
        if self.template is None:
            return self._encode_chat(pairs, with_last_answer)
        seq = Encoded([], [], [])
        if self.tok.bos_id is not None:
            seq.extend([self.tok.bos_id], TEXT, False)
        for n, (question, answer) in enumerate(pairs):
            self._question(seq, question)
            if n < len(pairs) - 1 or with_last_answer:
                seq.extend(self.tok.encode(answer.strip()) + [self.tok.eos_id], TEXT, True)
        return seq

    # ------------------------------------------------------------------------------------------ the tokenizer's chat
    def _encode_chat(self, pairs: list[tuple[str, str]], with_last_answer: bool) -> Encoded:
        seq = Encoded([], [], [])
        messages: list[dict[str, str]] = []
        rendered = ""  # the text seq holds so far
        for n, (question, answer) in enumerate(pairs):
            messages.append({"role": "user", "content": question.strip()})
            prompt = self.tok.render_chat(messages, add_generation_prompt=True)
            self._chat_prompt(seq, _continuation(rendered, prompt))
            if n == len(pairs) - 1 and not with_last_answer:
                break
            messages.append({"role": "assistant", "content": answer.strip()})
            rendered = self.tok.render_chat(messages)
            self._chat_answer(seq, _continuation(prompt, rendered))
        return seq

    def _chat_prompt(self, seq: Encoded, text: str) -> None:
        parts = text.split(IMAGE_PLACEHOLDER)
        if len(parts) > 2:
            raise MalformedSample(f"question holds {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders; at most 1")
        seq.extend(self.tok.encode(parts[0]), TEXT, False)
        if len(parts) == 2:
            seq.extend([self.tok.image_id] * self.num_image_tokens, IMAGE, False)
            seq.extend(self.tok.encode(parts[1]), TEXT, False)

    def _chat_answer(self, seq: Encoded, text: str) -> None:
        ids = self.tok.encode(text)
        if self.tok.eos_id not in ids:
            raise MalformedSample(f"the chat template ended an answer without the end-of-turn token "
                                  f"{self.tok.eos_id}: {text!r}")
        end = ids.index(self.tok.eos_id) + 1
        seq.extend(ids[:end], TEXT, True)
        seq.extend(ids[end:], TEXT, False)  # e.g. ChatML's newline after <|im_end|>: part of the next prompt

    def _check_chat_template(self) -> None:
        """Fail at start, naming the keys, when the chat template cannot be split into prompts and answers."""
        where = f"the chat template of data.tokenizer={self.tok.path!r}"
        try:
            self._encode_chat([("q1", "a1"), ("q2", "a2")], with_last_answer=True)
        except MalformedSample as exn:
            raise ValueError(f"{where} cannot be used for training: {exn}; use data.template=plain") from None
        except Exception as exn:  # jinja raises its own errors (e.g. templates that demand a system message)
            raise ValueError(f"{where} does not render a user/assistant conversation ({type(exn).__name__}: {exn}); "
                             "use data.template=plain") from None


def _continuation(prefix: str, text: str) -> str:
    """What ``text`` adds to ``prefix``; the chat template must render a conversation's prefix as a text prefix."""
    if not text.startswith(prefix):
        raise MalformedSample("the chat template renders a shorter conversation as something other than a prefix of "
                              "the longer one, so prompts and answers cannot be told apart")
    return text[len(prefix):]
