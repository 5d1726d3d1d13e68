"""The trainer: for each curriculum stage, build the stage's model from the previous stage's checkpoint, train it
with a DeepSpeed engine, save, and evaluate."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, replace

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from asymoe_train.config.derive import image_tokens_per_image
from asymoe_train.config.schema import StageConfig, TrainConfig
from asymoe_train.config.validate import resolve_data_path
from asymoe_train.data.conversation import ConversationEncoder
from asymoe_train.data.pipeline import Batch, SampleDecoder, answer_balance_weights, eval_batches, train_loader
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.distributed.deepspeed_moe import moe_block_type
from asymoe_train.distributed.engine import build_engine
from asymoe_train.distributed.expert_parallel import AllToAllDispatcher, grad_norm, init_expert_parallel
from asymoe_train.evaluation.probe import grounding_probe
from asymoe_train.evaluation.vqa import evaluate
from asymoe_train.modality import IMAGE, PAD
from asymoe_train.models.vlm import VisionLanguageModel, build_model
from asymoe_train.observability.flops import peak_tflops, train_flops_per_token
from asymoe_train.observability.logger import MetricsLogger
from asymoe_train.observability.moe_metrics import ExpertLoad
from asymoe_train.training.checkpoint import (
    STATE,
    TrainerState,
    complete_checkpoints,
    config_hash,
    load_checkpoint,
    load_stage_model,
    prune_checkpoints,
    resumes_on_any_layout,
    save_checkpoint,
    upcycled_after,
)
from asymoe_train.training.groups import set_trainable
from asymoe_train.training.losses import counterfactual_evidence_loss, total_loss

AUX_LOSSES = ("balance", "z", "order", "evd")

log = logging.getLogger(__name__)


# What SLURM (SIGTERM, SIGUSR1 with --signal) and submitit (SIGUSR2) send before a time limit or a preemption.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """Raised after the checkpoint that a SIGTERM/SIGUSR1 asked for is written; carries its directory."""

    def __init__(self, checkpoint: str, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}: checkpoint {checkpoint}")
        self.checkpoint, self.signum = checkpoint, signum


# model keys that change how the model runs, not its weights: init_from may change them
HOW_IT_RUNS = ("activation_checkpointing", "compile_moe")


def format_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


class BadSampleBudget:
    """Counts skipped samples and stops the run when they exceed ``data.max_bad_fraction``."""

    MIN_SEEN = 200  # do not judge the fraction on a handful of samples

    def __init__(self, max_fraction: float):
        self.max_fraction = max_fraction
        self.seen = 0
        self.skipped: dict[str, int] = {}

    def add(self, batch: Batch) -> None:
        self.seen += batch.num_samples + sum(batch.skipped.values())
        for reason, count in batch.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        bad = sum(self.skipped.values())
        if self.seen >= self.MIN_SEEN and bad > self.max_fraction * self.seen:
            raise RuntimeError(
                f"{bad} of {self.seen} samples were skipped ({self.skipped}), more than "
                f"data.max_bad_fraction={self.max_fraction}; check the shards or raise the limit"
            )

    def summary(self) -> str:
        return f"skipped {sum(self.skipped.values())} of {self.seen} samples {self.skipped or ''}".strip()


def per_step(curriculum, world_size: int):
    """A resolved curriculum config with each stage's batch given as samples per optimizer step over all ranks
    (``batch_size`` x ``grad_accum`` x ranks), the same for every layout that trains the same way."""
    curriculum = copy.deepcopy(curriculum)
    for stage in curriculum.stages.values():
        stage.batch_size = stage.batch_size * stage.grad_accum * world_size
        stage.grad_accum = stage.global_batch_size = 0
    return curriculum


class Trainer:
    """Runs the curriculum of a validated config in ``cfg.run_dir``."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.run_dir = cfg.run_dir
        self.tokenizer = TextTokenizer(resolve_data_path(cfg.data, cfg.data.tokenizer))
        self.num_image_tokens = image_tokens_per_image(cfg.model.vision)
        self.encoder = ConversationEncoder(self.tokenizer, cfg.data.template, self.num_image_tokens)
        self.global_step = 0
        self.dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
        self.expert_parallel = init_expert_parallel(cfg.engine)  # None without expert parallelism
        os.makedirs(os.path.join(self.run_dir, "eval"), exist_ok=True)
        resolved = OmegaConf.structured(cfg)
        resolved.resume = "none"  # how a run was started is not part of what it is
        self.config_yaml = OmegaConf.to_yaml(resolved)
        self.resume_from = self.find_resume()
        self.logger = MetricsLogger(cfg.logger, self.run_dir, f"{cfg.experiment}/{os.path.basename(self.run_dir)}",
                                    asdict(cfg), rank, self.resume_from[0].wandb_id if self.resume_from else "")
        self.positions: dict[int, tuple[int, int, int]] = {}  # this rank's training streams, after the last batch
        self.stop_signal = 0
        self.keys_file = None
        if cfg.data.record_keys:
            os.makedirs(os.path.join(self.run_dir, "data_keys"), exist_ok=True)
            self.keys_file = open(os.path.join(self.run_dir, "data_keys", f"rank{rank}.jsonl"), "a", encoding="utf-8")

    # ----------------------------------------------------------------------------------------------------- resume
    @property
    def layout(self) -> dict:
        e = self.cfg.engine
        return {"world_size": self.world_size, "ep_size": e.ep_size, "zero_stage": e.zero_stage,
                "precision": e.precision}

    def find_resume(self) -> tuple[TrainerState, str] | None:
        """The checkpoint ``resume`` names (``auto``: the latest complete one of run_dir), checked against this run."""
        mode = self.cfg.resume
        if mode == "none":
            if self.rank == 0 and complete_checkpoints(self.run_dir):
                log.warning("%s holds checkpoints; starting over (resume=auto continues from them)", self.run_dir)
            return self.find_init()
        if mode == "auto":
            found = complete_checkpoints(self.run_dir)
            if not found:
                if self.rank == 0:
                    log.info(f"resume=auto: no complete checkpoint in {self.run_dir}/checkpoints; starting afresh"
                             + (f" from init_from={self.cfg.init_from}" if self.cfg.init_from else ""))
                return self.find_init()
            state, path = found[-1]
        else:
            if not os.path.isfile(os.path.join(mode, "COMPLETE")):
                raise FileNotFoundError(f"resume={mode}: not a complete checkpoint directory (no COMPLETE marker)")
            state, path = TrainerState.load(mode), mode
        names = list(self.cfg.curriculum.stages)
        if state.stage not in names or names.index(state.stage) != state.stage_index:
            raise ValueError(f"resume: checkpoint {path} is from stage {state.stage!r} (#{state.stage_index}), which "
                             f"this config's curriculum.stages {names} does not have at that place")
        saved = OmegaConf.create(state.config)
        now = OmegaConf.create(self.config_yaml)
        # on another layout the batch per rank may stay (the global batch then follows the ranks), or the per-rank
        # batch and gradient accumulation may change to keep the global batch
        same_steps = per_step(saved.curriculum, state.layout.get("world_size", 1)) == per_step(now.curriculum,
                                                                                              self.world_size)
        for key in ("model", "curriculum"):
            if saved[key] != now[key] and not (key == "curriculum" and same_steps):
                raise ValueError(f"resume: {key} differs from the checkpoint's ({path}/trainer_state.json holds the "
                                 f"resolved config); resume with the same {key} or start a new run")
        if state.config_hash != config_hash(self.config_yaml) and self.rank == 0:
            changed = sorted(k for k in now if k in saved and saved[k] != now[k])
            log.warning("resume: config differs from the checkpoint's in %s", changed)
        self.check_layout(state, path)
        if self.rank == 0:
            log.info(f"resuming from {path}: stage {state.stage}, step {state.step}, global step {state.global_step}")
        return state, path

    def find_init(self) -> tuple[TrainerState, str] | None:
        """``init_from``: another run's finished stage, which this run treats as its own finished stage (the stages up
        to it are skipped, the next starts from its weights) in a new W&B run. The skipped stages must be configured
        as that run had them, and the model as well, except model.moe while the weights are still dense."""
        path = self.cfg.init_from
        if not path:
            return None
        if not os.path.isfile(os.path.join(path, "COMPLETE")) or not os.path.isfile(os.path.join(path, STATE)):
            raise FileNotFoundError(f"init_from={path}: not a complete checkpoint directory (no COMPLETE marker or "
                                    f"{STATE}); name a finished stage of another run, e.g. <run_dir>/checkpoints/align")
        state = TrainerState.load(path)
        names = list(self.cfg.curriculum.stages)
        if not state.stage_done:
            raise ValueError(f"init_from={path}: a mid-stage checkpoint (stage {state.stage!r}, step {state.step}); "
                             "init_from takes a finished stage (checkpoints/<stage>), resume=<dir> continues a stage")
        if state.stage not in names[:-1] or names.index(state.stage) != state.stage_index:
            raise ValueError(f"init_from={path}: its stage {state.stage!r} (#{state.stage_index}) must be one of this "
                             f"run's curriculum.stages {names} at the same place, and not the last")
        saved, now = OmegaConf.create(state.config), OmegaConf.create(self.config_yaml)
        done = names[: state.stage_index + 1]
        saved_steps = per_step(saved.curriculum, state.layout.get("world_size", 1)).stages
        now_steps = per_step(now.curriculum, self.world_size).stages
        differ = [f"curriculum.stages.{name}" for name in done if saved_steps.get(name) != now_steps[name]]
        dense = not upcycled_after(self.cfg.curriculum.stages, state.stage)
        differ += [f"model.{key}" for key in now.model if saved.model.get(key) != now.model[key]
                   and key not in HOW_IT_RUNS and not (dense and key == "moe")]
        if differ:
            raise ValueError(f"init_from={path}: this run's {differ} differ from the config that checkpoint was "
                             f"trained with ({path}/{STATE} holds it); set them as there, or train those stages here")
        if self.rank == 0:
            log.info(f"init_from={path}: stages {done} come from there (global step {state.global_step}); "
                     f"{names[state.stage_index + 1]} starts from its weights")
        return replace(state, wandb_id="", data_position={}), path

    def check_layout(self, state: TrainerState, path: str) -> None:
        """A mid-stage checkpoint resumes on another layout (world size, ep_size, ZeRO stage, precision) when its
        optimizer state is saved by parameter name, as every checkpoint of this version is; a stage-end checkpoint
        resumes on any layout: the next stage needs only its weights."""
        before, after = state.layout, self.layout
        if before == after or state.stage_done or resumes_on_any_layout(path, before):
            return
        e = before
        raise ValueError(
            f"resume: {path} was written with layout {before}, this run has {after}; its optimizer state is "
            "partitioned by rank and it has no optimizer state by parameter name (optim_by_name_rank<r>.safetensors, "
            "written by newer versions), so it resumes on its own layout only. To convert it, resume it there "
            f"(`torchrun --nproc-per-node {e.get('world_size')} -m asymoe_train.cli ... "
            f"engine.ep_size={e.get('ep_size', 1)} engine.zero_stage={e.get('zero_stage', 0)} "
            f"engine.precision={e.get('precision')} resume={path}`) and send it SIGTERM: it saves a checkpoint after "
            "its next step and exits, and that checkpoint resumes on any layout"
        )

    def request_stop(self, signum, frame) -> None:
        self.stop_signal = signum
        if self.rank == 0:
            print(f"received {signal.Signals(signum).name}: checkpointing at the next step boundary", flush=True)

    def stop_requested(self) -> int:
        """The stop signal any rank received (all ranks agree, so all of them save and stop at the same step)."""
        if self.world_size == 1:
            return self.stop_signal
        flag = torch.tensor([self.stop_signal], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def save(self, engine, model, index: int, name: str, step: int, stage_done: bool) -> str:
        positions = self.positions
        if self.world_size > 1:
            gathered: list = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, self.positions)
            # a rank also holds the positions it resumed from for streams another rank reads: the furthest wins
            positions = {}
            for part in gathered:
                for stream, position in part.items():
                    if stream not in positions or position[2] > positions[stream][2]:
                        positions[stream] = position
        state = TrainerState(stage=name, stage_index=index, step=step, global_step=self.global_step,
                             stage_done=stage_done, data_position=positions, wandb_id=self.logger.run_id,
                             config=self.config_yaml, config_hash=config_hash(self.config_yaml), layout=self.layout)
        path = save_checkpoint(engine, model, self.run_dir, state, self.rank, self.world_size, self.expert_parallel)
        if self.rank == 0:
            prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
        return path

    def decoder(self, train: bool = False, seed: int = 0) -> SampleDecoder:
        data = self.cfg.data
        return SampleDecoder(self.encoder, self.cfg.model.vision.image_size, data.max_length, data.split_turns,
                             data.turn_caps if train else None, data.turn_cap_field, seed,
                             data.augment if train else "none")

    # ------------------------------------------------------------------------------------------------------ model
    def stage_checkpoint(self, stage: str) -> str:
        """Where a finished stage's weights are: this run's ``checkpoints/<stage>``, or the checkpoint a run resumed
        from when that is the stage's end (``resume=<dir>`` and ``init_from`` may name another run's)."""
        if self.resume_from and self.resume_from[0].stage == stage and self.resume_from[0].stage_done:
            return self.resume_from[1]
        return os.path.join(self.run_dir, "checkpoints", stage)

    def setup_model(self, model: VisionLanguageModel) -> None:
        """Inject what maps the model to this run's parallel layout, before it is upcycled: the token dispatcher
        (all-to-all under expert parallelism: every block then holds its rank's share of experts) and the MoE
        block class of ``model.moe.backend``."""
        model.dispatcher = AllToAllDispatcher(self.expert_parallel) if self.expert_parallel else None
        model.block_type = moe_block_type(self.cfg.model.moe.backend)

    def build_stage_model(self, index: int, resuming: bool = False) -> VisionLanguageModel:
        """The model a stage starts from: the previous stage's weights, upcycled if this or an earlier stage says so.
        ``resuming`` (mid-stage): the structure only, every weight then comes from the checkpoint."""
        stages = self.cfg.curriculum.stages
        names = list(stages)
        if resuming or index == 0:
            model = build_model(self.cfg.model, self.tokenizer.vocab_size, self.tokenizer.pad_id, self.cfg.seed)
            self.setup_model(model)
            if resuming and upcycled_after(stages, names[index]):
                model.upcycle()
                return model
        else:
            model = load_stage_model(self.cfg.model, stages, self.run_dir, names[index - 1],
                                     self.tokenizer.vocab_size, self.tokenizer.pad_id, self.cfg.seed,
                                     self.stage_checkpoint(names[index - 1]), setup=self.setup_model)
        if stages[names[index]].upcycle and not resuming:
            model.upcycle(torch.Generator().manual_seed(self.cfg.seed + 1))
        return model

    def describe(self) -> None:
        """Print what a user checks before a long run: parameters, batch sizes, image tokens."""
        if self.rank:
            return
        with torch.device("meta"):
            model = build_model(self.cfg.model, self.tokenizer.vocab_size, self.tokenizer.pad_id)
            dense_total, _ = model.parameter_counts()
            model.upcycle()
            total, activated = model.parameter_counts()
        moe = self.cfg.model.moe
        log.info(f"model: variant={moe.variant} moe_layers={model.moe_layers} "
              f"pools={[(p.name, p.num_experts) for p in moe.pools]} top_k={moe.top_k}")
        log.info(f"parameters: dense {format_count(dense_total)} | after upcycling: total {format_count(total)}, "
              f"activated per token {format_count(activated)}")
        log.info(f"conversations: data.template={self.cfg.data.template} -> {self.encoder.template_name}"
                 + (" (the tokenizer's chat template)" if self.encoder.template_name == "chat" else ""))
        if self.expert_parallel:
            ep = self.expert_parallel.size
            log.info(f"expert parallelism: groups of {ep} ranks, each expert held by {self.world_size // ep} of them; "
                     f"experts per rank {[(p.name, p.num_experts // ep) for p in moe.pools]}")
        for name, stage in self.cfg.curriculum.stages.items():
            images = stage.batch_size * stage.grad_accum * self.world_size
            log.info(f"stage {name}: {stage.steps} steps, global batch {images} samples (images) "
                  f"= {stage.batch_size} x grad_accum {stage.grad_accum} x {self.world_size} ranks, "
                  f"{images * self.num_image_tokens} image tokens encoded per step; "
                  f"trainable {stage.trainable}; lr {stage.lr}")

    # ------------------------------------------------------------------------------------------------------ train
    def run(self) -> dict:
        """All stages in order, from the resume checkpoint if any; returns the evaluation results per stage.

        SIGTERM/SIGUSR1/SIGUSR2 make every rank save a checkpoint at the next step boundary and raise :class:`Preempted`
        (then a handler that was installed before, e.g. submitit's requeue, runs)."""
        self.describe()
        previous = {signum: signal.signal(signum, self.request_stop) for signum in STOP_SIGNALS}
        results = {}
        try:
            resume = self.resume_from
            if resume:
                self.global_step = resume[0].global_step
            for index, (name, stage) in enumerate(self.cfg.curriculum.stages.items()):
                if resume and (index < resume[0].stage_index or (index == resume[0].stage_index
                                                                 and resume[0].stage_done)):
                    results[name] = self.finished_stage(index, name, stage)
                    continue
                here = resume if resume and index == resume[0].stage_index else None
                results[name] = self.run_stage(index, name, stage, here)
        except Preempted as stop:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            handler = previous.get(stop.signum)
            if callable(handler):
                handler(stop.signum, None)
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.logger.close()
            if self.keys_file is not None:
                self.keys_file.close()
        return results

    def finished_stage(self, index: int, name: str, stage: StageConfig) -> dict:
        """A stage a resumed run has behind it: its eval results, evaluating now if the run stopped before that. A
        stage that another run trained (``init_from``) was evaluated there."""
        path, checkpoint = os.path.join(self.run_dir, "eval", f"{name}.json"), self.stage_checkpoint(name)
        if not stage.eval or self.rank != 0 or checkpoint == self.cfg.init_from or not os.path.isdir(checkpoint):
            return {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)["splits"]
        model = load_stage_model(self.cfg.model, self.cfg.curriculum.stages, self.run_dir, name,
                                 self.tokenizer.vocab_size, self.tokenizer.pad_id, self.cfg.seed,
                                 checkpoint)
        return self.evaluate(model, name, torch.device("cpu"))

    def run_stage(self, index: int, name: str, stage: StageConfig,
                  resume: tuple[TrainerState, str] | None = None) -> dict:
        model = self.build_stage_model(index, resuming=resume is not None)
        active = {name for name in AUX_LOSSES if getattr(stage.losses, name)}
        for block in model.moe_blocks().values():
            block.active_losses = active  # zero-weight terms are not computed at all
        evidence = self.cfg.model.moe.evidence
        counterfactual_every = (
            evidence.counterfactual_every
            if "evd" in active and evidence.loss_kind == "counterfactual" and model.has_evidence_experts
            else 0
        )
        counts = set_trainable(model, stage.trainable)
        engine = build_engine(model, self.cfg.engine, stage, stage.steps, self.expert_parallel)
        first_step, self.positions = 0, {}
        if resume is not None:
            state, path = resume
            load_checkpoint(engine, model, path, self.rank, state.layout, self.layout)
            first_step, self.global_step = state.step, state.global_step
            self.positions = dict(state.data_position)
        seed = self.cfg.seed * 100 + index
        decoder = self.decoder(train=True, seed=seed)  # per-sample draws are seeded by stream position, not rank
        if self.cfg.data.answer_balance:
            decoder.answer_field = self.cfg.data.answer_balance
            decoder.answer_weights = answer_balance_weights(self.cfg.data, self.cfg.data.sources[stage.source])
            if self.rank == 0 and not decoder.answer_weights:
                log.warning(f"data.answer_balance={self.cfg.data.answer_balance!r}: no turn of source {stage.source!r} "
                            "carries that metadata field; this stage trains unweighted")
            elif self.rank == 0:
                heaviest = sorted(decoder.answer_weights.items(), key=lambda kv: -kv[1])[:3]
                log.info(f"answer balancing by {self.cfg.data.answer_balance}: {len(decoder.answer_weights)} "
                         f"(group, answer) weights in [{min(decoder.answer_weights.values()):.2f}, "
                         f"{max(decoder.answer_weights.values()):.2f}]; heaviest {heaviest}")
        loader = train_loader(self.cfg.data, self.cfg.data.sources[stage.source], decoder, stage.batch_size,
                              seed=seed, rank=self.rank, world_size=self.world_size, start=self.positions)
        stream = iter(loader)
        budget = BadSampleBudget(self.cfg.data.max_bad_fraction)
        load = ExpertLoad()
        if self.rank == 0:
            log.info(f"== stage {name} ({index + 1}/{len(self.cfg.curriculum.stages)}): source={stage.source} "
                  f"trainable={ {g: format_count(c) for g, c in counts.items()} }")
        progress = tqdm(total=stage.steps, initial=first_step, desc=name, mininterval=2.0, dynamic_ncols=True,
                        disable=self.rank != 0 or not self.cfg.logger.progress)
        window = {"tokens": 0, "samples": 0, "sequences": 0, "data_s": 0.0, "start": time.perf_counter()}
        metrics: dict[str, float] = {}
        every = self.cfg.checkpoint.every_steps
        trainable = [p for p in model.parameters() if p.requires_grad]
        peak = peak_tflops(engine.device, self.cfg.engine.precision, self.cfg.logger.peak_tflops)
        flops_per_token = 0.0  # model FLOPs of a training step per token, counted on the stage's first batch
        for step in range(first_step, stage.steps):
            log_step = (step + 1) % self.cfg.logger.log_every == 0 or step + 1 == stage.steps
            step_norm = None
            for micro in range(stage.grad_accum):
                t0 = time.perf_counter()
                batch = next(stream)
                window["data_s"] += time.perf_counter() - t0
                budget.add(batch)
                if step == first_step and self.rank == 0 and not window["sequences"]:
                    self.print_first_batch(batch, stage)
                batch.to(engine.device, self.dtype)
                if not flops_per_token:
                    flops_per_token = train_flops_per_token(model, batch.model_inputs())
                    if self.rank == 0:
                        log.info(f"model FLOPs per training step: {flops_per_token / 1e6:.2f} MFLOP per token (counted "
                                 "on this batch)" + (f"; MFU against {peak:g} TFLOP/s per device" if peak else
                                                     "; no MFU: set logger.peak_tflops to the device's peak"))
                out = engine(**batch.model_inputs())
                loss, metrics = total_loss(out, batch.labels_BT, stage.losses, self.world_size, batch.weight_B)
                if counterfactual_every and step % counterfactual_every == 0:
                    blind = engine(**{**batch.model_inputs(),
                                      "pixel_values_NCHW": torch.zeros_like(batch.pixel_values_NCHW)})
                    cf = counterfactual_evidence_loss(out, blind, batch.labels_BT, batch.image_index_B >= 0,
                                                      evidence.counterfactual_margin)
                    loss = loss + stage.losses.evd * cf
                    metrics["loss/evd_counterfactual"] = float(cf.detach())
                engine.backward(loss)
                if log_step and micro + 1 == stage.grad_accum and self.cfg.engine.zero_stage == 0:
                    # DeepSpeed reports no norm for a client optimizer without ZeRO; grads are reduced by now
                    step_norm = grad_norm(trainable, self.expert_parallel)  # every expert counted once
                engine.step()
                self.positions.update(batch.positions)
                if self.keys_file is not None:
                    self.keys_file.write(json.dumps({"stage": name, "step": step, "micro": micro, "keys": batch.keys})
                                         + "\n")
                load.add(out.moe)
                window["tokens"] += int((batch.modality_BT != PAD).sum())
                window["samples"] += batch.num_samples
                window["sequences"] += batch.input_ids_BT.shape[0]
            if not math.isfinite(metrics["loss/total"]):
                raise FloatingPointError(f"stage {name} step {step}: loss is {metrics['loss/total']}; "
                                         "lower the learning rate or check the data")
            self.global_step += 1
            if self.keys_file is not None:
                self.keys_file.flush()
            progress.update(1)
            if step % 5 == 0:
                progress.set_postfix(loss=f"{metrics['loss/lm']:.3f}", refresh=False)
            if log_step:
                elapsed = time.perf_counter() - window["start"]
                speed = {
                    "perf/tokens_per_s": window["tokens"] / elapsed,
                    "perf/samples_per_s": window["samples"] * self.world_size / elapsed,
                    "perf/sequences_per_s": window["sequences"] * self.world_size / elapsed,
                    "perf/data_wait_share": window["data_s"] / elapsed,
                    # this rank's tokens: model FLOP/s and MFU per device
                    "perf/model_tflops": flops_per_token * window["tokens"] / elapsed / 1e12,
                }
                if peak:
                    speed["perf/mfu"] = speed["perf/model_tflops"] / peak
                progress.set_postfix(loss=f"{metrics['loss/lm']:.3f}", tok_s=f"{speed['perf/tokens_per_s']:.0f}")
                if step_norm is None:
                    step_norm = engine.get_global_grad_norm()
                norm = {"grad_norm": float(step_norm)} if step_norm is not None else {}
                self.logger.log({**metrics, **speed, **load.metrics(), **norm, "lr": engine.get_lr()[0],
                                 "stage": index}, self.global_step)
                window = {"tokens": 0, "samples": 0, "sequences": 0, "data_s": 0.0, "start": time.perf_counter()}
            stop = self.stop_requested()
            if step + 1 < stage.steps and (stop or (every and (step + 1) % every == 0)):
                path = self.save(engine, model, index, name, step + 1, stage_done=False)
                if stop:
                    progress.close()
                    raise Preempted(path, stop)
        progress.close()
        if self.rank == 0:
            log.info(f"stage {name}: done, final lm loss {metrics['loss/lm']:.4f}; data: {budget.summary()}")
        path = self.save(engine, model, index, name, stage.steps, stage_done=True)
        stop = self.stop_requested()
        if stop:
            raise Preempted(path, stop)
        if stage.eval and self.expert_parallel and self.rank == 0:
            # rank 0 evaluates alone: on the consolidated weights, every expert local (an all-to-all would wait for
            # ranks that do not evaluate)
            model = load_stage_model(self.cfg.model, self.cfg.curriculum.stages, self.run_dir, name,
                                     self.tokenizer.vocab_size, self.tokenizer.pad_id, self.cfg.seed, path)
            model.to(engine.device, self.dtype)
        result = self.evaluate(model, name, engine.device) if stage.eval else {}
        del stream, loader
        return result

    def print_first_batch(self, batch: Batch, stage: StageConfig) -> None:
        seqs = batch.input_ids_BT.shape[0]
        tokens = int((batch.modality_BT != PAD).sum())
        image_tokens = int((batch.modality_BT == IMAGE).sum())
        scale = stage.grad_accum * self.world_size
        log.info(f"first micro-batch: {batch.num_samples} samples -> {seqs} sequences, {tokens} tokens "
              f"({image_tokens} image tokens) of length <= {batch.input_ids_BT.shape[1]}; global step ~ "
              f"{seqs * scale} sequences, {tokens * scale} tokens, {image_tokens * scale} image tokens")

    # ------------------------------------------------------------------------------------------------------- eval
    def evaluate(self, model: VisionLanguageModel, stage: str, device) -> dict:
        """Exact-match accuracy on every eval source; table on the console, ``eval/<stage>.json`` on disk."""
        if self.rank != 0 or not self.cfg.data.eval_sources:
            return {}
        results = {}
        for split, pattern in self.cfg.data.eval_sources.items():
            batches = eval_batches(self.cfg.data, pattern, self.decoder(), self.cfg.eval.batch_size,
                                   self.cfg.eval.max_samples)
            t0 = time.perf_counter()
            results[split] = evaluate(model, batches, self.tokenizer, self.cfg.eval.max_new_tokens, device,
                                      self.dtype)
            results[split]["seconds"] = round(time.perf_counter() - t0, 1)
        report = {"stage": stage, "step": self.global_step, "splits": results}
        logged = {f"eval/{split}/{key}": value["accuracy"] for split, r in results.items()
                  for key, value in r["breakdown"].items()}
        if self.cfg.eval.grounding_sequences:
            split, pattern = next(iter(self.cfg.data.eval_sources.items()))
            batches = eval_batches(self.cfg.data, pattern, self.decoder(), 64, self.cfg.eval.grounding_sequences,
                                   prompt_only=False)
            report["grounding"] = {"split": split, **grounding_probe(model, batches, device, self.dtype)}
            mass = report["grounding"]["image_mass_per_layer"]
            logged.update({f"probe/image_attention/L{i}": m for i, m in enumerate(mass)})
            log.info(f"grounding probe ({split}, {report['grounding']['positions']} answer positions): attention "
                     f"mass on image tokens per layer {[round(m, 3) for m in mass]}")
        path = os.path.join(self.run_dir, "eval", f"{stage}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        self.print_eval(stage, results)
        self.logger.log(logged, self.global_step)
        return results

    @staticmethod
    def print_eval(stage: str, results: dict) -> None:
        keys = sorted({k for r in results.values() for k in r["breakdown"]}, key=lambda k: (k != "all", k))
        log.info(f"eval after stage {stage} (exact match):")
        log.info(f"  {'split':<12}" + "".join(f"{k.replace('family/', ''):>12}" for k in keys) + f"{'questions':>11}")
        for split, r in results.items():
            cells = "".join(
                f"{r['breakdown'][k]['accuracy']:>12.3f}" if k in r["breakdown"] else f"{'-':>12}" for k in keys
            )
            log.info(f"  {split:<12}{cells}{r['num_questions']:>11}")
