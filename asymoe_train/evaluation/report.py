"""A stage's evaluation as the run directory keeps it: exact-match accuracy on every eval source (POPE metrics on POPE
splits), the grounding probe and the paper's diagnostics, written to ``eval/<stage>.json`` (each question's outcome to
``eval/<stage>-questions.jsonl``, what paired statistics across runs need) and printed as tables."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

import torch

from asymoe_train.config.schema import TrainConfig
from asymoe_train.data.budget import BadSampleBudget
from asymoe_train.data.decode import SampleDecoder
from asymoe_train.data.pipeline import eval_batches
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.evaluation.diagnostics import diagnostics_metrics, paper_diagnostics
from asymoe_train.evaluation.pope import METRICS as POPE_METRICS
from asymoe_train.evaluation.probe import grounding_probe
from asymoe_train.evaluation.vqa import evaluate

log = logging.getLogger(__name__)


def report_path(run_dir: str, stage: str) -> str:
    return os.path.join(run_dir, "eval", f"{stage}.json")


def questions_path(run_dir: str, stage: str) -> str:
    """One JSON line per evaluated question: split, index (reading order within the split), family, answer,
    prediction, correct, and pope (the setting) on POPE splits."""
    return os.path.join(run_dir, "eval", f"{stage}-questions.jsonl")


def stored_results(run_dir: str, stage: str) -> dict | None:
    """The per-split results a stage's evaluation wrote, None if it has not run."""
    path = report_path(run_dir, stage)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["splits"]


def evaluate_splits(model, cfg: TrainConfig, decoder: Callable[[], SampleDecoder], tokenizer: TextTokenizer,
                    device, dtype: torch.dtype, max_samples: int) -> dict:
    """Accuracy (and POPE metrics) on every eval source, the first ``max_samples`` questions of each (0 = all), with
    each split's per-question records under ``questions``; the data budget of training applies."""
    results = {}
    for split, pattern in cfg.data.eval_sources.items():
        reader = decoder()
        batches = eval_batches(cfg.data, pattern, reader, cfg.eval.batch_size, max_samples)
        t0 = time.perf_counter()
        results[split] = result = evaluate(model, batches, tokenizer, cfg.eval.max_new_tokens, device, dtype)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        for reason, count in reader.take_skipped().items():  # skipped after the last batch
            result["skipped"][reason] = result["skipped"].get(reason, 0) + count
        if result["skipped"]:
            log.warning(f"eval {split}: skipped {sum(result['skipped'].values())} samples {result['skipped']}")
        budget = BadSampleBudget(cfg.data.max_bad_fraction, cfg.data.bad_fraction_min_samples, f"eval split {split}")
        budget.add_counts(result["num_samples"], result["skipped"])  # the training budget applies to evaluation
    return results


def logged_metrics(results: dict) -> dict[str, float]:
    """What a logger records of an evaluation: accuracy per split and family, POPE metrics per split and setting."""
    logged = {f"eval/{split}/{key}": value["accuracy"] for split, r in results.items()
              for key, value in r["breakdown"].items()}
    logged.update({f"eval/{split}/pope/{setting}/{metric}": value for split, r in results.items()
                   for setting, row in r.get("pope", {}).items() for metric, value in row.items()
                   if metric in POPE_METRICS})
    return logged


def evaluate_stage(model, cfg: TrainConfig, decoder: Callable[[], SampleDecoder], tokenizer: TextTokenizer,
                   device, dtype: torch.dtype, stage: str, step: int) -> tuple[dict, dict[str, float]]:
    """Evaluate on every eval source (and probe grounding if ``eval.grounding_sequences``, run the paper's diagnostics
    if ``eval.diagnostics_sequences``); write ``eval/<stage>.json`` and ``eval/<stage>-questions.jsonl``, print the
    tables, and return the results per split and the metrics to log."""
    results = evaluate_splits(model, cfg, decoder, tokenizer, device, dtype, cfg.eval.max_samples)
    questions = {split: result.pop("questions") for split, result in results.items()}
    report = {"stage": stage, "step": step, "splits": results}
    logged = logged_metrics(results)
    if cfg.eval.grounding_sequences:
        split, pattern = next(iter(cfg.data.eval_sources.items()))
        batches = eval_batches(cfg.data, pattern, decoder(), 64, cfg.eval.grounding_sequences, prompt_only=False)
        report["grounding"] = {"split": split, **grounding_probe(model, batches, device, dtype)}
        mass = report["grounding"]["image_mass_per_layer"]
        logged.update({f"probe/image_attention/L{i}": m for i, m in enumerate(mass)})
        log.info(f"grounding probe ({split}, {report['grounding']['positions']} answer positions): attention "
                 f"mass on image tokens per layer {[round(m, 3) for m in mass]}")
    if cfg.eval.diagnostics_sequences:
        split, pattern = next(iter(cfg.data.eval_sources.items()))
        batches = eval_batches(cfg.data, pattern, decoder(), 64, cfg.eval.diagnostics_sequences, prompt_only=False)
        report["diagnostics"] = {"split": split, **paper_diagnostics(model, batches, device, dtype)}
        logged.update(diagnostics_metrics(report["diagnostics"]))
    write_report(cfg.run_dir, stage, report, questions)
    print_eval(f"after stage {stage}", results)
    return results, logged


def write_report(run_dir: str, stage: str, report: dict, questions: dict[str, list[dict]]) -> None:
    """``eval/<stage>.json`` and, one line per question of each split, ``eval/<stage>-questions.jsonl``."""
    os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
    with open(report_path(run_dir, stage), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(questions_path(run_dir, stage), "w", encoding="utf-8") as f:
        for split, records in questions.items():
            for index, record in enumerate(records):
                f.write(json.dumps({"split": split, "index": index, **record}) + "\n")


def print_eval(when: str, results: dict) -> None:
    """The accuracy table (split x family) and, for POPE splits, the POPE table (split/setting x metric)."""
    keys = sorted({k for r in results.values() for k in r["breakdown"]}, key=lambda k: (k != "all", k))
    log.info(f"eval {when} (exact match):")
    width = max([12, *(len(split) + 2 for split in results)])
    log.info(f"  {'split':<{width}}" + "".join(f"{k.replace('family/', ''):>12}" for k in keys) + f"{'questions':>11}"
             + f"{'skipped':>9}")
    for split, r in results.items():
        cells = "".join(
            f"{r['breakdown'][k]['accuracy']:>12.3f}" if k in r["breakdown"] else f"{'-':>12}" for k in keys
        )
        log.info(f"  {split:<{width}}{cells}{r['num_questions']:>11}{sum(r.get('skipped', {}).values()):>9}")
    pope = [(split, setting, row) for split, r in results.items() for setting, row in r.get("pope", {}).items()]
    if pope:
        log.info("  POPE (positive class: yes):")
        log.info(f"  {'split':<{width}}{'setting':<13}" + "".join(f"{m:>11}" for m in POPE_METRICS) + f"{'questions':>11}")
        for split, setting, row in pope:
            log.info(f"  {split:<{width}}{setting:<13}" + "".join(f"{row[m]:>11.3f}" for m in POPE_METRICS)
                     + f"{row['count']:>11}")
