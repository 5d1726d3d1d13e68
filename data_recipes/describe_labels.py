"""Write a description per label with a local Hugging Face causal LM: the labels YAML of the classification task mode
(``data.labels``; its form in asymoe_train/config/labels.py).

Usage::

    python data_recipes/describe_labels.py --lm <local checkpoint directory> --labels in.yaml --out labels.yaml
        [--context "answers to questions about images of one coloured shape"] [--max-new-tokens 48] [--overwrite]
    python data_recipes/describe_labels.py --lm <dir> --names circle red yes --out labels.yaml

``--labels`` is a labels YAML whose entries may lack descriptions (``out_of_scope`` flags are kept); entries that have
one keep it unless ``--overwrite``. The LM and its tokenizer load from the ``--lm`` directory only
(``local_files_only``): nothing is downloaded. With a chat template the prompt is one user turn, else plain text;
decoding is greedy, and the description is the first line of what the LM writes. An LM that writes nothing for a
label is an error naming it (write that one by hand). The demo ships hand-written descriptions
(data_recipes/labels/easy_vqa.yaml).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import yaml

PROMPT = ("In one short sentence, describe what the class label \"{name}\" means{context}, so that a classifier "
          "could tell it apart from the other labels ({others}).")


def read_labels(path: str | None, names: Sequence[str]) -> list[dict]:
    """The entries to describe: a labels YAML's ``labels`` list, or bare names."""
    if path is None:
        return [{"name": n} for n in names]
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    entries = doc.get("labels") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("name") for e in entries):
        raise SystemExit(f"{path}: expected `labels:` as a list of entries with a `name`")
    return [dict(e) for e in entries]


def load_lm(path: str):
    """Tokenizer and model from a local checkpoint directory; never the hub."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"--lm {path!r} is not a local Hugging Face checkpoint (no config.json there); nothing is "
                         "downloaded: pass the directory of a causal LM on this machine")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    return tokenizer, model


def describe(tokenizer, model, name: str, others: list[str], context: str, max_new_tokens: int) -> str:
    """The LM's greedy one-line description of ``name``."""
    import torch

    prompt = PROMPT.format(name=name, context=f" among {context}" if context else "", others=", ".join(others))
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f"{prompt}\nDescription:"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    written = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return next((line.strip() for line in written.splitlines() if line.strip()), "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", required=True, help="local directory of a Hugging Face causal LM (never downloaded)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", help="a labels YAML to complete")
    source.add_argument("--names", nargs="+", help="bare label names")
    parser.add_argument("--out", required=True)
    parser.add_argument("--context", default="", help="what the labels are, e.g. 'answers about images of shapes'")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--overwrite", action="store_true", help="replace descriptions the input already has")
    args = parser.parse_args(argv)

    entries = read_labels(args.labels, args.names or [])
    tokenizer, model = load_lm(args.lm)
    names = [str(e["name"]) for e in entries]
    for entry in entries:
        if entry.get("description") and not args.overwrite:
            continue
        others = [n for n in names if n != entry["name"]]
        entry["description"] = describe(tokenizer, model, str(entry["name"]), others, args.context,
                                        args.max_new_tokens)
        if not entry["description"]:
            raise SystemExit(f"the LM wrote no description for label {entry['name']!r}; write that one by hand")
        print(f"{entry['name']}: {entry['description']}")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(f"# descriptions written by {os.path.basename(os.path.normpath(args.lm))} "
                "(data_recipes/describe_labels.py)\n")
        yaml.safe_dump({"labels": entries}, f, sort_keys=False, allow_unicode=True, width=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
