"""One training step on a micro-batch: forward, losses, backward and the engine's step."""

from __future__ import annotations

import contextlib
import math

import torch

from asymoe_train.config.moe_schema import EvidenceConfig
from asymoe_train.config.schema import EngineConfig, LossConfig
from asymoe_train.data.batch import Batch
from asymoe_train.distributed.expert_parallel import grad_norm
from asymoe_train.observability.moe_metrics import ExpertLoad
from asymoe_train.training.guard import guarded_loss, torch_step_skipped
from asymoe_train.training.losses import counterfactual_evidence_loss, total_loss

AUX_LOSSES = ("balance", "z", "order", "evd")


class TrainStep:
    """``train_step(batch) -> metrics``: forward, losses, backward and ``engine.step()`` (an optimizer step at the
    end of each gradient-accumulation window) on a batch already on the engine's device. Routing statistics
    accumulate in :attr:`load` until the caller reads them.

    ``losses`` are the stage's weights: a zero-weight auxiliary term is not computed at all. The counterfactual
    evidence loss (``model.moe.evidence.loss_kind=counterfactual``) runs a second, image-blind forward every
    ``counterfactual_every`` optimizer steps (``step`` is the optimizer step the micro-batch belongs to).

    ``objective`` (a :class:`asymoe_train.training.sync.ClassifyObjective`, classify stages): the step refreshes the
    label descriptions when due, its cross-entropy replaces L_lm and its synchronization loss is added.

    At the end of each accumulation window the metrics hold ``guard/skipped``: 1.0 when the optimizer step was skipped
    because a loss or the gradient norm was not finite (:mod:`asymoe_train.training.guard`), else 0.0."""

    def __init__(self, engine, model, losses: LossConfig, evidence: EvidenceConfig, engine_cfg: EngineConfig,
                 world_size: int = 1, expert_parallel=None, rank: int = 0, dead_expert_steps: int = 0,
                 objective=None):
        self.engine, self.losses, self.world_size = engine, losses, world_size
        self.objective = objective
        self.expert_parallel, self.zero_stage = expert_parallel, engine_cfg.zero_stage
        active = {name for name in AUX_LOSSES if getattr(losses, name)}
        for block in model.moe_blocks().values():
            block.active_losses = active
        counterfactual = "evd" in active and evidence.loss_kind == "counterfactual" and model.has_evidence_experts
        self.counterfactual_every = evidence.counterfactual_every if counterfactual else 0
        self.margin = evidence.counterfactual_margin
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.load = ExpertLoad(dead_expert_steps, world_size, rank)
        self.window_finite = True  # every loss of this gradient-accumulation window was finite
        self.nan_steps: set[int] = set()  # steps whose loss is made NaN (fault injection, training.guard.NAN_ENV)

    def __call__(self, batch: Batch, step: int = 0, measure_grad_norm: bool = False) -> dict:
        """Train on ``batch``; ``measure_grad_norm`` on the last micro-batch of a step adds ``grad_norm`` (when the
        engine reports one) to the metrics. Loss terms and token counts come back as device tensors, so a step
        does not wait for the device; read them with :func:`asymoe_train.training.losses.host_metrics` on log
        steps. The divergence guard reads one flag per optimizer step."""
        engine, objective = self.engine, self.objective
        if objective is not None:
            objective.refresh(engine, step)
        out = engine(**batch.model_inputs())
        loss, metrics = total_loss(out, batch.labels_BT, self.losses, self.world_size, batch.weight_B,
                                   batch.segment_BT, main=objective and objective.main_loss(out, batch))
        if objective is not None and objective.weight:
            sync = objective.sync_loss(out, batch, metrics)
            loss = loss + sync
            metrics["loss/total"] = metrics["loss/total"] + sync.detach()
        if self.counterfactual_every and step % self.counterfactual_every == 0:
            blind = engine(**{**batch.model_inputs(), "pixel_values_NCHW": torch.zeros_like(batch.pixel_values_NCHW)})
            cf = counterfactual_evidence_loss(out, blind, batch.labels_BT, batch.image_index_B >= 0, self.margin,
                                              batch.segment_BT)
            loss = loss + self.losses.evd * cf
            metrics["loss/evd_counterfactual"] = cf.detach()
        # the divergence guard (training.guard): a non-finite loss or gradient norm skips the optimizer step
        loss, finite = guarded_loss(loss, poisoned=step in self.nan_steps)
        self.window_finite = self.window_finite & finite  # a device bool until the window's end
        engine.backward(loss)
        boundary, norm = engine.is_gradient_accumulation_boundary(), None
        if boundary:  # the guard's one host read per optimizer step
            self.window_finite = bool(self.window_finite)
        if boundary and self.zero_stage == 0:
            # DeepSpeed reports no norm for a client optimizer without ZeRO; grads are reduced by now
            norm = grad_norm(self.trainable, self.expert_parallel)  # every expert counted once
        skip = contextlib.nullcontext()
        if boundary and isinstance(engine.optimizer, torch.optim.Optimizer):  # DeepSpeed's optimizers skip themselves
            skip = torch_step_skipped(engine.optimizer, not (self.window_finite and math.isfinite(norm)))
        with skip:
            engine.step()
        if measure_grad_norm and norm is None:
            norm = engine.get_global_grad_norm()
        if norm is not None and measure_grad_norm:
            metrics["grad_norm"] = float(norm)
        if boundary:
            metrics["guard/skipped"] = float(not (self.window_finite and engine.was_step_applied()))
            self.window_finite = True
        self.load.add(out.moe)
        metrics.update(batch.padding_shares())
        return metrics
