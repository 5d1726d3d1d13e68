"""The lmms-eval model ``asymoe_train``: an ``asymoe-train export`` answering lmms-eval's requests.

``lmms_eval --model asymoe_train --model_args pretrained=<export dir>[,device=cpu,dtype=float32] --tasks <task>``
loads the export with :func:`asymoe_train.export.load_pretrained` and answers each ``generate_until`` request with
:func:`asymoe_train.evaluation.generate.generate`: the training conversation template, the image preprocessing of
evaluation and greedy decoding (a request's ``max_new_tokens``, else the run's ``eval.max_new_tokens``; the text is cut
at the request's ``until`` strings). Registered through the ``lmms_eval.models`` entry point (setup.cfg), so
installing the package with ``pip install -e '.[lmms]'`` is all lmms-eval needs. Only this module imports lmms_eval.
"""

from __future__ import annotations

import io

import torch
from lmms_eval.api.model import lmms

from asymoe_train.evaluation.generate import generate
from asymoe_train.export import load_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def manifest():
    """The entry point lmms-eval reads: the model id and where its class lives."""
    # imported here: lmms_eval.models reads the entry points while it is being imported itself
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="asymoe_train", simple_class_path=f"{__name__}.AsymoeTrain")


class AsymoeTrain(lmms):
    """One process, one device; images come from the task's ``doc_to_visual`` (the first visual of a request)."""

    def __init__(self, pretrained: str, device: str = "cpu", dtype: str = "float32", **kwargs) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
        self.model, self.tokenizer, self.meta = load_pretrained(pretrained, device, DTYPES[dtype])

    def generate_until(self, requests) -> list[str]:
        answers = []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in [request.args for request in requests]:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            if not visuals:
                raise ValueError(f"task {task}: document {doc_id} has no image; the model answers about an image")
            buffer = io.BytesIO()
            visuals[0].convert("RGB").save(buffer, format="PNG")
            answer = generate(self.model, self.tokenizer, self.meta, buffer.getvalue(), context,
                              gen_kwargs.get("max_new_tokens"))
            until = gen_kwargs.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                if stop and stop in answer:
                    answer = answer[: answer.index(stop)]
            answers.append(answer)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError("asymoe_train answers generate_until tasks only (no loglikelihood scoring)")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("asymoe_train answers single-round generate_until tasks only")
