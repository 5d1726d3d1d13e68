"""One rank of the layout-change resume test (tests/test_reshard.py): a small VLM (moiie: 8 experts in its MoE block)
in a DeepSpeed engine built by :func:`build_engine`, trained on fixed random batches (4 sequences with an image each
per step, split over the ranks), checkpointed with :func:`save_checkpoint` and resumed with :func:`load_checkpoint` on
another layout.

Phases, each over every scenario of ``SCENARIOS`` (layout A: 2 ranks, EP=2; layout B: 1 rank, EP=1; each scenario
picks the ZeRO stage and precision of both):

* ``train`` (A, 2 ranks): steps 1-6 from scratch, a checkpoint after step 3;
* ``resume1`` (B, 1 rank): resumes A's step-3 checkpoint, trains steps 4-6, checkpoints after step 4;
* ``resume2`` (A, 2 ranks): resumes B's step-4 checkpoint, trains steps 5-6.

After each checkpoint a phase writes the reference state: every parameter's fp32 master weights, Adam moments and
step, read with DeepSpeed's own per-parameter API (``safe_get_full_*``, collectives) or the torch optimizer, experts
gathered on rank 0. After a resume, the state the optimizer holds is compared with the writer's reference (it must be
equal: resharding only moves numbers). Rank 0 reports the losses and those differences (``RESULT`` lines).
``resume1`` also reports a control (the same steps after a resume of the weights with a fresh optimizer) and, for bf16
without ZeRO, a resume of its own checkpoint on its own layout.

``reshard_worker.py WORKDIR`` runs the three phases in turn, each on ranks forked from this process
(:func:`ep_worker.fork_ranks`: torchrun's environment without importing torch and DeepSpeed again for every rank
of every phase), and prints ``RESULT <phase> {json}`` for each. ``reshard_worker.py PHASE WORKDIR`` runs one phase as
one rank (under torchrun, or alone for ``resume1``).

# B sequences, T positions
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from ep_worker import fork_ranks, variant, warm_imports
from safetensors.torch import load_file, save_file

from asymoe_train.checkpoint.deepspeed_optim import link_optimizer_state
from asymoe_train.checkpoint.engine_checkpoint import load_checkpoint, save_checkpoint
from asymoe_train.checkpoint.store import TrainerState
from asymoe_train.checkpoint.weights import expert_slices, load_weights
from asymoe_train.config.schema import EngineConfig, LMConfig, ModelConfig, StageConfig, VisionConfig
from asymoe_train.distributed.engine import build_engine, init_distributed
from asymoe_train.distributed.expert_parallel import AllToAllDispatcher, gather_experts, init_expert_parallel
from asymoe_train.modality import IMAGE, TEXT
from asymoe_train.models.vlm import build_model

VOCAB, B, T, STEPS = 300, 4, 12, 6
SAVE_AT = {"train": 3, "resume1": 4}  # step after which a phase checkpoints
RESUME = {"resume1": ("train", 3), "resume2": ("resume1", 4)}  # phase -> (phase and step of its checkpoint)
# scenario -> (ZeRO stage, precision) on A (2 ranks, EP=2) and on B (1 rank, EP=1)
SCENARIOS = {
    "fp32-zero2": ((2, "fp32"), (2, "fp32")),
    "fp32-zero2-zero0": ((2, "fp32"), (0, "fp32")),
    "bf16-zero1-zero0": ((1, "bf16"), (0, "bf16")),
    "fp32-zero0-bf16-zero2": ((0, "fp32"), (2, "bf16")),
}


def batch(step: int, rank: int, world_size: int, dtype: torch.dtype) -> tuple:
    """This rank's share of the global batch of ``step``: sequences [rank * B / W, (rank + 1) * B / W)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids_BT = torch.randint(1, VOCAB, (B, T), generator=g)
    pixels = torch.randn(B, 3, 32, 32, generator=g)
    modality_BT = torch.full((B, T), TEXT)
    modality_BT[:, 1:5] = IMAGE  # 4 image tokens per image
    rows = slice(rank * B // world_size, (rank + 1) * B // world_size)
    local = rows.stop - rows.start
    return ids_BT[rows], modality_BT[rows], pixels[rows].to(dtype), torch.arange(local)


def build(layout: dict, ep):
    torch.manual_seed(0)
    # small: 32-px images, 4 patches of 8 px merged 2x2 into 4 image tokens; 2 LM layers of width 32, layer 1 MoE
    vision = VisionConfig(image_size=32, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, merge=2)
    lm = LMConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64)
    model = build_model(ModelConfig(vision=vision, lm=lm, moe=variant("moiie")), VOCAB, 0)
    model.dispatcher = AllToAllDispatcher(ep) if ep else None
    model.upcycle(torch.Generator().manual_seed(1))
    engine = EngineConfig(ep_size=layout["ep_size"], zero_stage=layout["zero_stage"], precision=layout["precision"],
                          grad_clip=0.0)
    # the vision tower at a tenth of the lr (its own optimizer group, as curriculum.stages.<s>.lr_scale makes it)
    stage = StageConfig(source="qa", steps=STEPS, lr=1e-2, warmup_steps=2, batch_size=B // layout["world_size"],
                        lr_scale={"vision": 0.1})
    return model, build_engine(model, engine, stage, STEPS, ep)


def train_step(engine, step: int, rank: int, world_size: int, dtype: torch.dtype) -> float:
    ids_BT, modality_BT, pixels, index = (t.to(engine.device) for t in batch(step, rank, world_size, dtype))
    out = engine(ids_BT, modality_BT, pixels, index)
    loss = torch.nn.functional.cross_entropy(out.logits_BTV[:, :-1].float().reshape(-1, VOCAB),
                                             ids_BT[:, 1:].reshape(-1))
    engine.backward(loss)
    engine.step()
    mean = loss.detach().clone()
    if world_size > 1:
        dist.all_reduce(mean)
        mean /= world_size
    return float(mean)


def reference_state(engine, model, ep) -> dict[str, torch.Tensor] | None:
    """Every trainable parameter's fp32 master weights, optimizer state and step (``<key>/<name>``), read with
    DeepSpeed's per-parameter API or from the torch optimizer, experts gathered: on rank 0, None elsewhere."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "fp32_groups"):
        link_optimizer_state(optimizer, model)  # DeepSpeed 0.19 leaves the later groups unlinked (see there)
    held = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if isinstance(optimizer, torch.optim.Optimizer):
            master, state = param, optimizer.state[param]
        elif hasattr(optimizer, "fp32_groups"):  # bf16 without ZeRO: fp32 master copies
            pairs = {id(p): m for ps, ms in zip(optimizer.fp16_groups, optimizer.fp32_groups) for p, m in zip(ps, ms)}
            master = pairs[id(param)]
            state = optimizer.optimizer.state[master]
        else:  # ZeRO-1/2: collectives over the parameter's data-parallel group
            master = safe_get_full_fp32_param(param)
            state = {k: safe_get_full_optimizer_state(param, k) for k in ("exp_avg", "exp_avg_sq")}
            state["step"] = next(iter(optimizer.optimizer.state.values()))["step"]
        held[f"fp32/{name}"] = master.detach().float().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq", "step"):
            held[f"{key}/{name}"] = torch.as_tensor(state[key]).detach().float().cpu().clone()
    lrs = group_lrs(engine)
    if ep is None:
        return {**held, **lrs}
    experts = {f"{key}/{name}" for name in expert_slices(model) for key in ("fp32", "exp_avg", "exp_avg_sq")}
    full = gather_experts({k: held[k] for k in sorted(experts)}, ep)
    return {**held, **full, **lrs} if dist.get_rank() == 0 else None


def group_lrs(engine) -> dict[str, torch.Tensor]:
    """``lr/<tag>``: the lr of the optimizer's groups of each lr tag (expert parallelism splits a tag into groups,
    which must agree), and ``initial_lr/<tag>``, the peak the schedule multiplies."""
    lrs: dict[str, torch.Tensor] = {}
    for group in engine.lr_scheduler.optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            value = torch.tensor([float(group[key])])
            name = f"{key}/{group['lr_group']}"
            assert name not in lrs or torch.equal(lrs[name], value), (name, lrs[name], value)
            lrs[name] = value
    return lrs


def compare(state: dict, reference: dict) -> float:
    """Largest absolute difference over every tensor (inf if the names differ)."""
    if set(state) != set(reference):
        return float("inf")
    return max(float((state[k] - reference[k]).abs().max()) if state[k].numel() else 0.0 for k in reference)


def run(phase: str, workdir: str, scenario: str, rank: int, world_size: int, ep) -> dict:
    a, b = SCENARIOS[scenario]
    zero, precision = b if phase == "resume1" else a
    layout = {"world_size": world_size, "ep_size": ep.size if ep else 1, "zero_stage": zero, "precision": precision}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, engine = build(layout, ep)
    result: dict = {"layout": layout}
    first = 0
    if phase in RESUME:
        source, first = RESUME[phase]
        path = os.path.join(workdir, scenario, source, "checkpoints", f"s-step{first:07d}")
        saved = TrainerState.load(path)
        load_checkpoint(engine, model, path, rank, saved.layout, layout)
        state = reference_state(engine, model, ep)
        if state is not None:
            result["state_diff"] = compare(state, load_file(os.path.join(workdir, scenario, f"{source}.safetensors")))
            result["lrs"] = {k: float(v) for k, v in group_lrs(engine).items()}
    losses = {}
    for step in range(first + 1, STEPS + 1):
        losses[step] = train_step(engine, step, rank, world_size, dtype)
        if step == SAVE_AT.get(phase):
            state = TrainerState(stage="s", stage_index=0, step=step, global_step=step, stage_done=False,
                                 layout=layout)
            save_checkpoint(engine, model, os.path.join(workdir, scenario, phase), state, rank, world_size, ep)
            reference = reference_state(engine, model, ep)
            if reference is not None:
                save_file(reference, os.path.join(workdir, scenario, f"{phase}.safetensors"))
    result["losses"] = losses
    if phase == "resume1" and scenario == "fp32-zero2":
        # control: the same steps from the same weights with a fresh optimizer
        model, engine = build(layout, ep)
        load_weights(model, os.path.join(path, "model.safetensors"))
        for _ in range(first):
            engine.lr_scheduler.step()
        result["fresh_optimizer_losses"] = {step: train_step(engine, step, rank, world_size, dtype)
                                            for step in range(first + 1, STEPS + 1)}
    if phase == "resume1" and precision == "bf16":
        # the same layout: DeepSpeed's own state dicts (bf16 master copies), read back as written
        model, engine = build(layout, ep)
        path = os.path.join(workdir, scenario, phase, "checkpoints", f"s-step{SAVE_AT[phase]:07d}")
        load_checkpoint(engine, model, path, rank, layout, layout)
        result["same_layout_state_diff"] = compare(reference_state(engine, model, ep),
                                                   load_file(os.path.join(workdir, scenario, f"{phase}.safetensors")))
    return result


PHASES = {"train": 2, "resume1": 1, "resume2": 2}  # phase -> ranks (layout A: 2 ranks, B: 1 rank)


def rank_main(phase: str, workdir: str) -> dict | None:
    """One rank of ``phase``: every scenario; the results on rank 0, None elsewhere."""
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    init_distributed(EngineConfig(dist_timeout_s=60))
    ep = init_expert_parallel(EngineConfig(ep_size=world_size, ep_timeout_s=60))
    rank = dist.get_rank()
    results = {scenario: run(phase, workdir, scenario, rank, world_size, ep) for scenario in SCENARIOS}
    return results if rank == 0 else None


def main() -> None:
    if len(sys.argv) == 3:  # one phase, one rank
        results = rank_main(sys.argv[1], sys.argv[2])
        if results is not None:
            print("RESULT " + json.dumps(results), flush=True)
        return
    workdir = sys.argv[1]
    warm_imports()
    for phase, nproc in PHASES.items():
        results = fork_ranks(nproc, rank_main, phase, workdir)[0]
        print(f"RESULT {phase} " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
