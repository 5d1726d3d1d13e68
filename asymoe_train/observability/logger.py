"""Rank-0 metrics logger: Weights & Biases (offline by default, files under the run directory) and a JSONL copy."""

from __future__ import annotations

import json
import os

from asymoe_train.config.schema import LoggerConfig


class MetricsLogger:
    """One W&B run per job, owned by rank 0; other ranks log nothing."""

    def __init__(self, cfg: LoggerConfig, run_dir: str, run_name: str, config: dict, rank: int = 0,
                 run_id: str = ""):
        """``run_id``: the W&B run to continue (a resumed job logs into the run it started)."""
        self.enabled = rank == 0
        self.run = None
        self.jsonl = None
        self.run_id = run_id
        if not self.enabled:
            return
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if cfg.mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity or None,
            name=run_name,
            mode=cfg.mode,
            dir=run_dir,
            config=config,
            settings=wandb.Settings(console="off", silent=True),
            id=run_id or None,
            resume="allow" if run_id else None,
        )
        self.run_id = self.run.id

    @property
    def wandb_dir(self) -> str | None:
        return os.path.dirname(self.run.dir) if self.run is not None else None

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.run is not None:
            self.run.finish()
