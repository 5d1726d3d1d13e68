"""A local lmms-eval task from QA shards, and the functions its YAML names.

``python -m asymoe_train.evaluation.lmms_task --shards 'data/scenes/qa-pope_adversarial-*.tar' --out <dir>
--name scenes_pope_adversarial`` writes ``<dir>/<name>/``: the images as PNG files, ``questions.jsonl`` (one document
per QA turn: question_id, image, question, answer, family and, on POPE shards, pope), ``<name>.yaml`` in lmms-eval's
task format (a local ``json`` dataset, ``generate_until`` with greedy decoding of at most ``max_new_tokens`` tokens)
and ``utils.py``, which imports the functions below. lmms-eval reads it with ``--include_path <dir>/<name>``; nothing
is downloaded. Scoring is that of ``asymoe-train`` evaluation: exact match after
:func:`asymoe_train.evaluation.vqa.normalise`, and POPE's F1, precision, recall and yes-ratio.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tarfile

from asymoe_train.config.names import IMAGE_PLACEHOLDER
from asymoe_train.evaluation.pope import pope_metrics
from asymoe_train.evaluation.vqa import normalise

TASK_YAML = """\
# Written by asymoe_train.evaluation.lmms_task from {shards}
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: pope_f1
    aggregation: !function utils.pope_f1
    higher_is_better: true
  - metric: pope_precision
    aggregation: !function utils.pope_precision
    higher_is_better: true
  - metric: pope_recall
    aggregation: !function utils.pope_recall
    higher_is_better: true
  - metric: yes_ratio
    aggregation: mean
    higher_is_better: false
"""

UTILS = """\
# Written by asymoe_train.evaluation.lmms_task: the task's functions live there.
from asymoe_train.evaluation.lmms_task import (  # noqa: F401
    doc_to_text,
    doc_to_visual,
    pope_f1,
    pope_precision,
    pope_recall,
    process_results,
)
"""


def read_turns(shards: list[str]):
    """(key, png bytes, question, answer, per-turn metadata) of every QA turn of ``shards``, in shard, sample and turn
    order (the order ``asymoe-train`` evaluation reads them)."""
    for shard in shards:
        with tarfile.open(shard) as tar:
            files: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                files.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, sample in files.items():
            record = json.loads(sample["json"])
            conv = record["conversations"]
            for turn in range(len(conv) // 2):
                meta = {field: value[turn] for field, value in record.items()
                        if field != "conversations" and isinstance(value, list) and len(value) == len(conv) // 2}
                question = conv[2 * turn]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
                yield key, sample["png"], question, conv[2 * turn + 1]["value"], meta


def write_task(shard_glob: str, out: str, name: str, max_questions: int = 0, max_new_tokens: int = 4) -> str:
    """Write the task directory ``<out>/<name>`` from the QA shards matching ``shard_glob`` (the first
    ``max_questions`` turns; 0 = all); returns it."""
    shards = sorted(glob.glob(shard_glob))
    if not shards:
        raise FileNotFoundError(f"no shards match {shard_glob!r}; build them first (make data-scenes)")
    task_dir = os.path.abspath(os.path.join(out, name))
    os.makedirs(os.path.join(task_dir, "images"), exist_ok=True)
    questions = os.path.join(task_dir, "questions.jsonl")
    with open(questions, "w", encoding="utf-8") as f:
        for n, (key, png, question, answer, meta) in enumerate(read_turns(shards)):
            if max_questions and n >= max_questions:
                break
            image = os.path.join(task_dir, "images", f"{key}.png")
            if not os.path.isfile(image):
                with open(image, "wb") as img:
                    img.write(png)
            doc = {"question_id": n, "image": image, "question": question, "answer": answer,
                   "family": meta.get("family", ""), "pope": meta.get("pope", "")}
            f.write(json.dumps(doc) + "\n")
    with open(os.path.join(task_dir, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(TASK_YAML.format(shards=shard_glob, name=name, questions=questions, max_new_tokens=max_new_tokens))
    with open(os.path.join(task_dir, "utils.py"), "w", encoding="utf-8") as f:
        f.write(UTILS)
    return task_dir


def doc_to_visual(doc: dict) -> list:
    from PIL import Image

    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    prediction, answer = normalise(results[0]), normalise(doc["answer"])
    said_yes = prediction == "yes"
    return {"exact_match": float(prediction == answer), "pope_f1": (said_yes, answer == "yes"),
            "pope_precision": (said_yes, answer == "yes"), "pope_recall": (said_yes, answer == "yes"),
            "yes_ratio": float(said_yes)}


def _pope(items: list[tuple[bool, bool]], metric: str) -> float:
    return pope_metrics([bool(s) for s, _ in items], [bool(t) for _, t in items])[metric]


def pope_f1(items: list[tuple[bool, bool]]) -> float:
    return _pope(items, "f1")


def pope_precision(items: list[tuple[bool, bool]]) -> float:
    return _pope(items, "precision")


def pope_recall(items: list[tuple[bool, bool]]) -> float:
    return _pope(items, "recall")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a local lmms-eval task from QA shards.")
    parser.add_argument("--shards", required=True, help="shard glob, e.g. 'data/scenes/qa-pope_adversarial-*.tar'")
    parser.add_argument("--out", required=True, help="directory the task directory goes into")
    parser.add_argument("--name", required=True, help="task name (and directory name), e.g. scenes_pope_adversarial")
    parser.add_argument("--max-questions", type=int, default=0, help="the first N questions (0 = all)")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    args = parser.parse_args(argv)
    print(write_task(args.shards, args.out, args.name, args.max_questions, args.max_new_tokens))


if __name__ == "__main__":
    main()
