"""A stage's evaluation as the run directory keeps it: exact-match accuracy on every eval source, the grounding
probe and the paper's diagnostics, written to ``eval/<stage>.json`` and printed as a table."""

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
from asymoe_train.evaluation.probe import grounding_probe
from asymoe_train.evaluation.vqa import evaluate

log = logging.getLogger(__name__)


def report_path(run_dir: str, stage: str) -> str:
    return os.path.join(run_dir, "eval", f"{stage}.json")


def stored_results(run_dir: str, stage: str) -> dict | None:
    """The per-split results a stage's evaluation wrote, None if it has not run."""
    path = report_path(run_dir, stage)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["splits"]


def evaluate_stage(model, cfg: TrainConfig, decoder: Callable[[], SampleDecoder], tokenizer: TextTokenizer,
                   device, dtype: torch.dtype, stage: str, step: int) -> tuple[dict, dict[str, float]]:
    """Evaluate on every eval source (and probe grounding if ``eval.grounding_sequences``, run the paper's diagnostics
    if ``eval.diagnostics_sequences``); write
    ``eval/<stage>.json``, print the table, and return the results per split and the metrics to log."""
    results = {}
    for split, pattern in cfg.data.eval_sources.items():
        reader = decoder()
        batches = eval_batches(cfg.data, pattern, reader, cfg.eval.batch_size, cfg.eval.max_samples)
        t0 = time.perf_counter()
        results[split] = result = evaluate(model, batches, tokenizer, cfg.eval.max_new_tokens, device, dtype)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        for reason, count in reader.take_skipped().items():  # skipped after the last batch
            result["skipped"][reason] = result["skipped"].get(reason, 0) + count
        if result["skipped"]:
            log.warning(f"eval {split}: skipped {sum(result['skipped'].values())} samples {result['skipped']}")
        budget = BadSampleBudget(cfg.data.max_bad_fraction, cfg.data.bad_fraction_min_samples, f"eval split {split}")
        budget.add_counts(result["num_samples"], result["skipped"])  # the training budget applies to evaluation
    report = {"stage": stage, "step": step, "splits": results}
    logged = {f"eval/{split}/{key}": value["accuracy"] for split, r in results.items()
              for key, value in r["breakdown"].items()}
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
    os.makedirs(os.path.join(cfg.run_dir, "eval"), exist_ok=True)
    with open(report_path(cfg.run_dir, stage), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print_eval(stage, results)
    return results, logged


def print_eval(stage: str, results: dict) -> None:
    keys = sorted({k for r in results.values() for k in r["breakdown"]}, key=lambda k: (k != "all", k))
    log.info(f"eval after stage {stage} (exact match):")
    log.info(f"  {'split':<12}" + "".join(f"{k.replace('family/', ''):>12}" for k in keys) + f"{'questions':>11}"
             + f"{'skipped':>9}")
    for split, r in results.items():
        cells = "".join(
            f"{r['breakdown'][k]['accuracy']:>12.3f}" if k in r["breakdown"] else f"{'-':>12}" for k in keys
        )
        log.info(f"  {split:<12}{cells}{r['num_questions']:>11}{sum(r.get('skipped', {}).values()):>9}")
