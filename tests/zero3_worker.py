"""One rank of the ZeRO-3 tests (tests/test_zero3.py): the small VLM of tests/reshard_worker.py with a vanilla, moiie
or asymoe MoE block, fp32, gradient accumulation 2 and clipping, on fixed random batches split unevenly over 2 ranks
(rank 0 holds three sequences of the step's four, rank 1 one; in some micro-batches rank 1's sequence has no image,
so its vision router serves zero tokens, or is all padding, so no router serves any). The loss is the LM loss plus
every auxiliary loss of the blocks (balance, z, order, evidence routing), so their gradients cross the MoE block too.

Phases (``zero3_worker.py WORKDIR`` runs them in turn, each on ranks forked from this process):

* ``equal`` (2 ranks): every variant trained for 10 optimizer steps under ZeRO-2 and under ZeRO-3 from the same
  weights; rank 0 reports both loss curves. Then the layout-change chain starts: asymoe under ZeRO-3 with the LM
  loss only (auxiliary losses are formed per rank here, so they differ between world sizes), steps 1-6, a
  checkpoint after step 3 and the reference optimizer state (DeepSpeed's ``safe_get_full_*`` API);
* ``zero2`` (1 rank, ZeRO-2): resumes that checkpoint, trains steps 4-6, checkpoints after step 4; then asymoe in
  bf16 under ZeRO-2 and ZeRO-3, 4 steps each;
* ``zero3`` (2 ranks, ZeRO-3): resumes the ZeRO-2 checkpoint, trains steps 5-6.

After each resume the optimizer state is compared with the writer's reference, and the losses with the uninterrupted
chain run's.

# B sequences, T positions
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from ep_worker import fork_ranks, variant, warm_imports
from reshard_worker import compare, reference_state
from safetensors.torch import load_file, save_file

from asymoe_train.checkpoint.engine_checkpoint import load_checkpoint, save_checkpoint
from asymoe_train.checkpoint.store import TrainerState
from asymoe_train.config.schema import EngineConfig, LMConfig, ModelConfig, StageConfig, VisionConfig
from asymoe_train.distributed.engine import build_engine, init_distributed
from asymoe_train.modality import IMAGE, PAD, TEXT
from asymoe_train.models.vlm import build_model

VOCAB, B, T, STEPS, ACCUM = 300, 4, 12, 10, 2
VARIANTS = ("vanilla", "moiie", "asymoe")
SAVE_AT = {"equal": 3, "zero2": 4}
RESUME = {"zero2": ("equal", 3), "zero3": ("zero2", 4)}
PHASES = {"equal": (2, 3), "zero2": (1, 2), "zero3": (2, 3)}  # phase -> (ranks, ZeRO stage)
AUX_WEIGHT = 0.05


def batch(step: int, micro: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's sequences of micro-batch ``micro`` of ``step``: rank 0 of 2 takes three of four, rank 1 one;
    rank 1's has no image in micro-batch 0 of odd steps and is all padding in micro-batch 1 of steps divisible by 3."""
    g = torch.Generator().manual_seed(1000 + 10 * step + micro)
    ids_BT = torch.randint(1, VOCAB, (B, T), generator=g)
    pixels = torch.randn(B, 3, 32, 32, generator=g)
    modality_BT = torch.full((B, T), TEXT)
    modality_BT[:, 1:5] = IMAGE  # 4 image tokens per image
    image_B = torch.arange(B)
    rows = range(B) if world_size == 1 else (range(0, 3), range(3, 4))[rank]
    if 3 in rows:  # rank 1's sequence (row 3), on whatever rank holds it
        if step % 2 == 1 and micro == 0:
            modality_BT[3, 1:5] = TEXT
            image_B[3] = -1
        if step % 3 == 0 and micro == 1:
            modality_BT[3] = PAD
            ids_BT[3] = 0
            image_B[3] = -1
    rows = list(rows)
    images = [int(i) for i in image_B[rows] if i >= 0]
    index = torch.full((len(rows),), -1)
    for n, r in enumerate(rows):
        if image_B[r] >= 0:
            index[n] = images.index(int(image_B[r]))
    modality = modality_BT[rows]
    context = (modality != PAD) & (torch.arange(T) < 8)  # image and prompt tokens
    return {"input_ids_BT": ids_BT[rows], "modality_BT": modality, "pixel_values_NCHW": pixels[images],
            "image_index_B": index, "context_BT": context}


def build(name: str, zero_stage: int, world_size: int, precision: str = "fp32"):
    torch.manual_seed(0)
    vision = VisionConfig(image_size=32, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, merge=2)
    lm = LMConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64)
    model = build_model(ModelConfig(vision=vision, lm=lm, moe=variant(name)), VOCAB, 0)
    model.upcycle(torch.Generator().manual_seed(1))
    engine = EngineConfig(zero_stage=zero_stage, precision=precision, grad_clip=0.5)
    stage = StageConfig(source="qa", steps=STEPS, lr=1e-2, warmup_steps=2, batch_size=B // world_size,
                        grad_accum=ACCUM)
    return model, build_engine(model, engine, stage, STEPS, None)


def train_step(engine, step: int, rank: int, world_size: int, aux_weight: float) -> float:
    """One optimizer step (ACCUM micro-batches); the loss averaged over micro-batches and ranks. The LM loss is the
    sum over this rank's text tokens over the global batch's positions, times the ranks (DeepSpeed averages
    gradients over them), so without auxiliary losses every layout computes the same gradient."""
    total = torch.zeros(())
    for micro in range(ACCUM):
        inputs = batch(step, micro, rank, world_size)
        inputs["pixel_values_NCHW"] = inputs["pixel_values_NCHW"].to(next(engine.module.parameters()).dtype)
        out = engine(**inputs)
        ids_BT = inputs["input_ids_BT"]
        labels = torch.where(inputs["modality_BT"] == TEXT, ids_BT, -100)[:, 1:]
        logits = out.logits_BTV[:, :-1].float().reshape(-1, VOCAB)
        lm = torch.nn.functional.cross_entropy(logits, labels.reshape(-1), reduction="sum") * world_size / (B * T)
        aux = sum((v for o in out.moe.values() for v in o.losses.values()), torch.zeros(()))
        loss = lm + aux_weight * aux
        engine.backward(loss)
        engine.step()
        total += loss.detach()
    if world_size > 1:
        dist.all_reduce(total)
    return float(total) / (ACCUM * world_size)


def checkpoint_dir(workdir: str, phase: str, step: int) -> str:
    return os.path.join(workdir, phase, "checkpoints", f"s-step{step:07d}")


def run(phase: str, workdir: str, name: str, zero_stage: int, rank: int, world_size: int, chain: bool) -> dict:
    """Train one variant on one ZeRO stage; ``chain``: the layout-change run (asymoe, LM loss only), which
    checkpoints and resumes."""
    model, engine = build(name, zero_stage, world_size)
    layout = {"world_size": world_size, "ep_size": 1, "zero_stage": zero_stage, "precision": "fp32"}
    result: dict = {"layout": layout}
    first = 0
    if phase in RESUME and chain:
        source, first = RESUME[phase]
        path = checkpoint_dir(workdir, source, first)
        load_checkpoint(engine, model, path, rank, TrainerState.load(path).layout, layout)
        state = reference_state(engine, model, None)
        if rank == 0:
            result["state_diff"] = compare(state, load_file(os.path.join(workdir, f"{source}.safetensors")))
    losses = {}
    last = STEPS if not chain else 6
    for step in range(first + 1, last + 1):
        losses[step] = train_step(engine, step, rank, world_size, 0.0 if chain else AUX_WEIGHT)
        if chain and step == SAVE_AT.get(phase):
            state = TrainerState(stage="s", stage_index=0, step=step, global_step=step, stage_done=False,
                                 layout=layout)
            save_checkpoint(engine, model, os.path.join(workdir, phase), state, rank, world_size)
            reference = reference_state(engine, model, None)
            if rank == 0:
                save_file(reference, os.path.join(workdir, f"{phase}.safetensors"))
    result["losses"] = losses
    return result


def rank_main(phase: str, workdir: str) -> dict | None:
    torch.set_num_threads(1)
    init_distributed(EngineConfig(dist_timeout_s=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    _, zero_stage = PHASES[phase]
    results = {}
    if phase == "equal":
        results = {f"{name}-zero{z}": run(phase, workdir, name, z, rank, world_size, chain=False)
                   for name in VARIANTS for z in (2, 3)}
    results["chain"] = run(phase, workdir, "asymoe", zero_stage, rank, world_size, chain=True)
    if phase == "zero2":  # bf16 on one rank: ZeRO-3 against ZeRO-2, 4 steps with every auxiliary loss
        for z in (2, 3):
            model, engine = build("asymoe", z, world_size, "bf16")
            results[f"bf16-zero{z}"] = {"losses": {s: train_step(engine, s, rank, world_size, AUX_WEIGHT)
                                                   for s in range(1, 5)}}
    return results if rank == 0 else None


def main() -> None:
    workdir = sys.argv[1]
    warm_imports()
    for phase, (nproc, _) in PHASES.items():
        results = fork_ranks(nproc, rank_main, phase, workdir)[0]
        print(f"RESULT {phase} " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
