"""Rank-0 metrics logger: Weights & Biases (offline by default, files under the run directory) and a JSONL copy."""

from __future__ import annotations

import json
import os

from asymoe_train.config.schema import LoggerConfig


class MetricsLogger:
    """One W&B run per job, owned by rank 0; other ranks log nothing."""

    def __init__(self, cfg: LoggerConfig, run_dir: str, run_name: str, config: dict, rank: int = 0):
        self.cfg, self.run_dir, self.run_name, self.config = cfg, run_dir, run_name, config
        self.enabled = rank == 0
        self.run = None
        self.jsonl = None
        self.run_id = ""
        if self.enabled:
            self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")

    def _start(self) -> None:
        """The W&B run, started at the first use (continuing ``run_id`` when a resumed job set one)."""
        if not self.enabled or self.run is not None or self.cfg.mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity or None,
            name=self.run_name,
            mode=self.cfg.mode,
            dir=self.run_dir,
            config=self.config,
            settings=wandb.Settings(console="off", silent=True),
            id=self.run_id or None,
            resume="allow" if self.run_id else None,
        )
        self.run_id = self.run.id

    def state_dict(self) -> dict:
        """The W&B run id, so that a resumed job logs into the run it started."""
        self._start()
        return {"wandb_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        if self.run is not None:
            raise RuntimeError("the logger's state is loaded before it logs")
        self.run_id = state.get("wandb_id", "")

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        self._start()
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.run is not None:
            self.run.finish()
