"""The trainer: for each curriculum stage, build the stage's model from the previous stage's checkpoint, train it
with a DeepSpeed engine, save, and evaluate."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from asymoe_train.checkpoint.engine_checkpoint import load_checkpoint, save_checkpoint
from asymoe_train.checkpoint.rng import ProcessRng
from asymoe_train.checkpoint.store import TrainerState, config_hash, prune_checkpoints
from asymoe_train.checkpoint.weights import load_stage_model
from asymoe_train.config.derive import image_tokens_per_image, tag_lr, upcycled_after
from asymoe_train.config.errors import DivergenceError
from asymoe_train.config.labels import labels_path, load_labels
from asymoe_train.config.paths import resolve_data_path
from asymoe_train.config.schema import StageConfig, TrainConfig
from asymoe_train.data.batch import Batch
from asymoe_train.data.budget import BadSampleBudget
from asymoe_train.data.conversation import ConversationEncoder
from asymoe_train.data.decode import SampleDecoder, make_decoder
from asymoe_train.data.pipeline import answer_balance_weights, train_loader
from asymoe_train.data.positions import StreamPositions
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.distributed.deepspeed_moe import moe_block_type
from asymoe_train.distributed.engine import build_engine
from asymoe_train.distributed.expert_parallel import AllToAllDispatcher, init_expert_parallel
from asymoe_train.evaluation.classify import evaluate_classify_stage
from asymoe_train.evaluation.report import evaluate_splits, evaluate_stage, logged_metrics, print_eval, stored_results
from asymoe_train.modality import IMAGE, PAD
from asymoe_train.models.vlm import VisionLanguageModel, build_model
from asymoe_train.observability.flops import peak_tflops, train_flops_per_token
from asymoe_train.observability.logger import MetricsLogger
from asymoe_train.observability.throughput import Throughput
from asymoe_train.training import resume
from asymoe_train.training.groups import set_trainable
from asymoe_train.training.guard import SkippedSteps, all_finite, injected_nan_steps
from asymoe_train.training.losses import host_metrics
from asymoe_train.training.params import format_count, stage_params
from asymoe_train.training.schedule import rebase_schedule
from asymoe_train.training.signals import Preempted, StopSignals
from asymoe_train.training.step import TrainStep
from asymoe_train.training.sync import ClassifyObjective

log = logging.getLogger(__name__)


def main_loss(metrics: dict) -> float:
    """The task loss of a step's metrics: L_lm of a generate stage, the cross-entropy of a classify stage."""
    return float(metrics["loss/lm"] if "loss/lm" in metrics else metrics["loss/ce"])


@dataclass
class Progress:
    """Where training stands: the stage, its optimizer steps, all optimizer steps of the run."""

    stage: str = ""
    stage_index: int = 0
    step: int = 0
    global_step: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in self.state_dict():
            setattr(self, key, state[key])


class Trainer:
    """Runs the curriculum of a validated config in ``cfg.run_dir``."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world_size, self.run_dir = cfg, rank, world_size, cfg.run_dir
        self.tokenizer = TextTokenizer(resolve_data_path(cfg.data, cfg.data.tokenizer))
        self.num_image_tokens = image_tokens_per_image(cfg.model.vision)
        self.encoder = ConversationEncoder(self.tokenizer, cfg.data.template, self.num_image_tokens)
        self.labels = load_labels(labels_path(cfg.data)) if cfg.data.labels else None  # classify stages
        self.dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
        self.expert_parallel = init_expert_parallel(cfg.engine)  # None without expert parallelism
        self.layout = resume.layout_of(cfg.engine, world_size)
        os.makedirs(os.path.join(self.run_dir, "eval"), exist_ok=True)
        self.config_yaml = resume.resolved_yaml(cfg)
        self.start = resume.find_start(cfg, self.config_yaml, world_size, rank)
        self.logger = MetricsLogger(cfg.logger, self.run_dir, f"{cfg.experiment}/{os.path.basename(self.run_dir)}",
                                    asdict(cfg), rank)
        self.progress = Progress()
        self.positions = StreamPositions(world_size)  # this rank's training streams, after the last batch
        if self.start:
            self.logger.load_state_dict({"wandb_id": self.start[0].wandb_id})
            self.progress.global_step = self.start[0].global_step
        self.stop = StopSignals(rank, world_size)
        self.keys_file = None
        if cfg.data.record_keys:
            os.makedirs(os.path.join(self.run_dir, "data_keys"), exist_ok=True)
            self.keys_file = open(os.path.join(self.run_dir, "data_keys", f"rank{rank}.jsonl"), "a", encoding="utf-8")

    def check_layout(self, state: TrainerState, path: str) -> None:
        """Raise unless the checkpoint at ``path`` resumes on this run's layout (:func:`resume.check_layout`)."""
        resume.check_layout(state, path, self.layout)

    # ------------------------------------------------------------------------------------------------------ train
    def run(self) -> dict:
        """All stages in order, from the start checkpoint if any; returns the evaluation results per stage.

        SIGTERM/SIGUSR1/SIGUSR2 make every rank save a checkpoint at the next step boundary and raise :class:`Preempted`
        (then a handler that was installed before, e.g. submitit's requeue, runs)."""
        self.describe()
        names, results = list(self.cfg.curriculum.stages), {}
        try:
            with self.stop:
                for index, todo in enumerate(resume.stage_plan(names, self.start and self.start[0])):
                    name, stage = names[index], self.cfg.curriculum.stages[names[index]]
                    if todo == "done":
                        results[name] = self.finished_stage(name)
                    else:
                        results[name] = self.run_stage(index, name, stage, self.start if todo == "resume" else None)
        finally:
            self.logger.close()
            if self.keys_file is not None:
                self.keys_file.close()
        return results

    def run_stage(self, index: int, name: str, stage: StageConfig, start: resume.Start | None = None) -> dict:
        """Train one stage (from a mid-stage checkpoint when ``start`` is given), save its end, evaluate it."""
        model = self.build_stage_model(index, resuming=start is not None)
        counts = self.prepare_stage(model, index, name, stage)
        engine = build_engine(model, self.cfg.engine, stage, stage.steps, self.expert_parallel)
        objective = None
        if stage.task == "classify":
            objective = ClassifyObjective(model, self.labels, self.tokenizer, self.cfg.sync, stage.losses.sync,
                                          engine.device, self.world_size)
        train_step = TrainStep(engine, model, stage.losses, self.cfg.model.moe.evidence, self.cfg.engine,
                               self.world_size, self.expert_parallel, self.rank, self.cfg.logger.dead_expert_steps,
                               objective)
        train_step.nan_steps = injected_nan_steps(name)
        if start is not None:
            load_checkpoint(engine, model, start[1], self.rank, start[0].layout, self.layout)
            self.progress.load_state_dict(start[0].__dict__)
            self.positions.load_state_dict(start[0].data_position)
            if resume.schedule_changes(start[0], self.config_yaml):  # this run's lr, from the checkpoint's step
                rebase_schedule(engine.lr_scheduler, stage)
        first_step = self.progress.step
        stream = iter(self.stage_loader(index, stage))
        data = self.cfg.data
        budget = BadSampleBudget(data.max_bad_fraction, data.bad_fraction_min_samples, f"stage {name}")
        skips = SkippedSteps(name, self.cfg.training.max_skipped_steps, self.rank)
        speed = Throughput(self.world_size, peak_tflops(engine.device, self.cfg.engine.precision,
                                                        self.cfg.logger.peak_tflops))
        if self.rank == 0:
            log.info(f"== stage {name} ({index + 1}/{len(self.cfg.curriculum.stages)}): source={stage.source} "
                     f"trainable={ {g: format_count(c) for g, c in counts.items()} }")
        progress = tqdm(total=stage.steps, initial=first_step, desc=name, mininterval=2.0, dynamic_ncols=True,
                        disable=self.rank != 0 or not self.cfg.logger.progress)
        for step in range(first_step, stage.steps):
            log_step = (step + 1) % self.cfg.logger.log_every == 0 or step + 1 == stage.steps
            for micro in range(stage.grad_accum):
                t0 = time.perf_counter()
                batch = next(stream)
                speed.data_s += time.perf_counter() - t0
                budget.add(batch)
                self.to_device(batch, stage, model, engine.device, speed, first=step == first_step and micro == 0)
                metrics = train_step(batch, step, measure_grad_norm=log_step and micro + 1 == stage.grad_accum)
                self.positions.update(batch.positions)
                speed.add(batch)
                self.record_keys(batch, name, step, micro)
            skips.record(metrics.get("guard/skipped", 0.0) > 0, step, metrics)
            self.progress.step, self.progress.global_step = step + 1, self.progress.global_step + 1
            progress.update(1)
            if log_step:  # the step's loss terms are device tensors until here: one copy per log step
                metrics = host_metrics(metrics)
                perf = speed.metrics()
                progress.set_postfix(loss=f"{main_loss(metrics):.3f}", tok_s=f"{perf['perf/tokens_per_s']:.0f}")
                group_lrs = {f"lr/{g['lr_group']}": g["lr"] for g in engine.lr_scheduler.optimizer.param_groups
                             if g.get("lr_group", "default") != "default"}  # lr_scale / lr_groups
                self.logger.log({**metrics, **perf, **train_step.load.metrics(), "lr": engine.get_lr()[0],
                                 **group_lrs, "stage": index}, self.progress.global_step)
            self.evaluate_during(model, name, stage, engine.device)
            self.checkpoint_or_stop(engine, model, stage, last=False, progress=progress)
        progress.close()
        if self.rank == 0:
            log.info(f"stage {name}: done, final {stage.task} loss {main_loss(metrics):.4f}; data: {budget.summary()}; "
                     f"skipped optimizer steps (non-finite loss or gradient norm): {skips.total}")
        path = self.checkpoint_or_stop(engine, model, stage, last=True)
        del stream
        return self.evaluate_trained(model, name, stage, path, engine.device)

    def prepare_stage(self, model: VisionLanguageModel, index: int, name: str, stage: StageConfig) -> dict[str, int]:
        """Start the stage's progress and set its trainable groups; returns the trainable count per group."""
        self.progress.stage, self.progress.stage_index, self.progress.step = name, index, 0
        self.positions.load_state_dict({})
        return set_trainable(model, stage.trainable)

    def checkpoint_or_stop(self, engine, model, stage: StageConfig, last: bool, progress=None) -> str | None:
        """Save at the stage's end, every ``checkpoint.every_steps`` and when a stop signal came; after a stop
        signal's checkpoint raise :class:`Preempted`."""
        step, every = self.progress.step, self.cfg.checkpoint.every_steps
        if last:
            path = self.save(engine, model, stage_done=True)
            stop = self.stop.requested()
        else:
            stop = self.stop.requested()
            if step >= stage.steps or not (stop or (every and step % every == 0)):
                return None
            path = self.save(engine, model, stage_done=False)
        if stop:
            if progress is not None:
                progress.close()
            raise Preempted(path, stop)
        return path

    def save(self, engine, model, stage_done: bool) -> str:
        """A checkpoint of every rank's state (a collective), its trainer state assembled from the components'.
        Weights that are not finite are never saved (:class:`DivergenceError` instead)."""
        if not all_finite(model, self.world_size):
            raise DivergenceError(f"stage {self.progress.stage} step {self.progress.step}: the weights are not "
                                  "finite, so no checkpoint was written (the last one holds finite weights); lower "
                                  f"curriculum.stages.{self.progress.stage}.lr and continue with resume=auto")
        state = TrainerState(**self.progress.state_dict(), stage_done=stage_done,
                             data_position=self.positions.state_dict(), wandb_id=self.logger.state_dict()["wandb_id"],
                             config=self.config_yaml, config_hash=config_hash(self.config_yaml), layout=self.layout)
        path = save_checkpoint(engine, model, self.run_dir, state, self.rank, self.world_size, self.expert_parallel)
        if self.rank == 0:
            prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
        return path

    def stage_loader(self, index: int, stage: StageConfig):
        """The stage's training batches from where its streams stand; answer weights if ``data.answer_balance``."""
        data, seed = self.cfg.data, self.cfg.seed * 100 + index
        decoder = self.decoder(train=True, seed=seed)  # per-sample draws are seeded by stream position, not rank
        if stage.task == "classify":
            decoder.labels = self.labels
        if data.answer_balance:
            decoder.answer_field = data.answer_balance
            decoder.answer_weights = weights = answer_balance_weights(data, data.sources[stage.source])
            if self.rank == 0 and not weights:
                log.warning(f"data.answer_balance={data.answer_balance!r}: no turn of source {stage.source!r} "
                            "carries that metadata field; this stage trains unweighted")
            elif self.rank == 0:
                heaviest = sorted(weights.items(), key=lambda kv: -kv[1])[:3]
                log.info(f"answer balancing by {data.answer_balance}: {len(weights)} (group, answer) weights in "
                         f"[{min(weights.values()):.2f}, {max(weights.values()):.2f}]; heaviest {heaviest}")
        return train_loader(data, data.sources[stage.source], decoder, stage.batch_size, seed=seed, rank=self.rank,
                            world_size=self.world_size, start=self.positions.positions)

    def to_device(self, batch: Batch, stage: StageConfig, model, device, speed: Throughput, first: bool) -> None:
        """Move the batch to the device; on the stage's first, report its shape and count the model's FLOPs."""
        if first and self.rank == 0:
            seqs, scale = batch.input_ids_BT.shape[0], stage.grad_accum * self.world_size
            tokens, image_tokens = int((batch.modality_BT != PAD).sum()), int((batch.modality_BT == IMAGE).sum())
            log.info(f"first micro-batch: {batch.num_samples} samples -> {seqs} sequences, {tokens} tokens "
                     f"({image_tokens} image tokens) of length <= {batch.input_ids_BT.shape[1]}; global step ~ "
                     f"{seqs * scale} sequences, {tokens * scale} tokens, {image_tokens * scale} image tokens")
        batch.to(device, self.dtype)
        if not speed.flops_per_token:  # model FLOPs of a training step per token, counted on the stage's first batch
            speed.flops_per_token = train_flops_per_token(model, batch.model_inputs())
            if self.rank == 0:
                peak = speed.peak_tflops
                log.info(f"model FLOPs per training step: {speed.flops_per_token / 1e6:.2f} MFLOP per token (counted "
                         "on this batch)" + (f"; MFU against {peak:g} TFLOP/s per device" if peak else
                                             "; no MFU: set logger.peak_tflops to the device's peak"))

    def record_keys(self, batch: Batch, stage: str, step: int, micro: int) -> None:
        if self.keys_file is not None:
            self.keys_file.write(json.dumps({"stage": stage, "step": step, "micro": micro, "keys": batch.keys}) + "\n")
            self.keys_file.flush()

    def decoder(self, train: bool = False, seed: int = 0) -> SampleDecoder:
        return make_decoder(self.cfg.data, self.encoder, self.cfg.model.vision.image_size, train, seed)

    # ------------------------------------------------------------------------------------------------------ model
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
                                     resume.stage_checkpoint(self.run_dir, names[index - 1], self.start),
                                     setup=self.setup_model)
        if stages[names[index]].upcycle and not resuming:
            model.upcycle(torch.Generator().manual_seed(self.cfg.seed + 1))
        return model

    def describe(self) -> None:
        """Print what a user checks before a long run: parameters, batch sizes, image tokens."""
        if self.rank:
            return
        moe, stages = self.cfg.model.moe, self.cfg.curriculum.stages
        dense_total, counted = stage_params(self.cfg.model, stages, self.tokenizer.vocab_size)
        log.info(f"model: variant={moe.variant} pools={[(p.name, p.num_experts) for p in moe.pools]} "
                 f"top_k={moe.top_k}; parameters: dense {format_count(dense_total)}")
        log.info(f"conversations: data.template={self.cfg.data.template} -> {self.encoder.template_name}"
                 + (" (the tokenizer's chat template)" if self.encoder.template_name == "chat" else ""))
        if self.expert_parallel:
            ep = self.expert_parallel.size
            log.info(f"expert parallelism: groups of {ep} ranks, each expert held by {self.world_size // ep} of them; "
                     f"experts per rank {[(p.name, p.num_experts // ep) for p in moe.pools]}")
        for (name, stage), params in zip(stages.items(), counted):
            images = stage.batch_size * stage.grad_accum * self.world_size
            log.info(f"stage {name}: {stage.steps} steps, global batch {images} samples (images) "
                     f"= {stage.batch_size} x grad_accum {stage.grad_accum} x {self.world_size} ranks, "
                     f"{images * self.num_image_tokens} image tokens encoded per step; "
                     f"{'upcycled' if params.upcycled else 'dense'} model: total {format_count(params.total)}, "
                     f"activated per token {format_count(params.activated)}; trainable {stage.trainable} "
                     f"({format_count(params.params.dense_trainable + params.params.expert_trainable)}); lr {stage.lr}"
                     + "".join(f", {group} {tag_lr(stage, group)}" for group in (*stage.lr_scale, *stage.lr_groups)))

    # ------------------------------------------------------------------------------------------------------- eval
    def evaluate_trained(self, model, name: str, stage: StageConfig, path: str, device) -> dict:
        """Evaluate a stage just trained (rank 0). Under expert parallelism or ZeRO-3 rank 0 evaluates alone, on the
        consolidated weights with every expert and parameter local (an all-to-all or a parameter gather would wait
        for ranks that do not evaluate)."""
        if not stage.eval or self.rank != 0:
            return {}
        if self.expert_parallel or self.cfg.engine.zero_stage == 3:
            model = load_stage_model(self.cfg.model, self.cfg.curriculum.stages, self.run_dir, name,
                                     self.tokenizer.vocab_size, self.tokenizer.pad_id, self.cfg.seed, path)
            model.to(device, self.dtype)
        return self.evaluate(model, name, device)

    def evaluate_during(self, model, name: str, stage: StageConfig, device) -> None:
        """Every ``eval.every_steps`` optimizer steps of a stage that evaluates (not at its end, which evaluates
        anyway): the eval splits on rank 0, logged. Training does not notice: the eval readers are separate from the
        training streams, and every RNG is put back as it was (an exact resume stays exact)."""
        every, step = self.cfg.eval.every_steps, self.progress.step
        if not every or step % every or step >= stage.steps or not stage.eval or self.rank != 0:
            return
        rng = ProcessRng()
        state = rng.state_dict()
        try:
            results = evaluate_splits(model, self.cfg, self.decoder, self.tokenizer, device, self.dtype,
                                      self.cfg.eval.max_samples)
        finally:
            rng.load_state_dict(state)
        for result in results.values():
            del result["questions"]
        self.logger.log(logged_metrics(results), self.progress.global_step)
        print_eval(f"at stage {name} step {step}", results)

    def finished_stage(self, name: str) -> dict:
        """A stage a resumed run has behind it: its eval results, evaluating now if the run stopped before that. A
        stage that another run trained (``init_from``) was evaluated there."""
        stage, checkpoint = self.cfg.curriculum.stages[name], resume.stage_checkpoint(self.run_dir, name, self.start)
        if not stage.eval or self.rank != 0 or checkpoint == self.cfg.init_from or not os.path.isdir(checkpoint):
            return {}
        stored = stored_results(self.run_dir, name)
        if stored is not None:
            return stored
        model = load_stage_model(self.cfg.model, self.cfg.curriculum.stages, self.run_dir, name,
                                 self.tokenizer.vocab_size, self.tokenizer.pad_id, self.cfg.seed, checkpoint)
        return self.evaluate(model, name, torch.device("cpu"))

    def evaluate(self, model: VisionLanguageModel, stage: str, device) -> dict:
        """Exact-match accuracy on every eval source; table on the console, ``eval/<stage>.json`` on disk."""
        if self.rank != 0 or not self.cfg.data.eval_sources:
            return {}
        if self.cfg.curriculum.stages[stage].task == "classify":
            results, logged = evaluate_classify_stage(model, self.cfg, self.labels, self.decoder, device, self.dtype,
                                                      stage, self.progress.global_step)
            self.logger.log(logged, self.progress.global_step)
            return results
        results, logged = evaluate_stage(model, self.cfg, self.decoder, self.tokenizer, device, self.dtype, stage,
                                         self.progress.global_step)
        self.logger.log(logged, self.progress.global_step)
        return results
