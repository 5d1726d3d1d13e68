"""One rank of the expert-parallel tests (tests/test_ep.py starts two with torchrun, gloo, CPU).

``numerics``: for vanilla, moiie and asymoe, an EP=2 block (all-to-all dispatch, half the experts per rank) against
the EP=1 block it was cut from, on the same global batch split unevenly over the ranks: outputs, input gradients,
the gradient of every parameter (expert ones gathered, replicated ones summed over ranks) and the global gradient
norm (``grad_norm``, every expert counted once). Then randomized trials of uneven and zero token counts per rank
and per modality (text-only ranks, image-only ranks, ranks with nothing but padding, ranks with no sequence at all),
each checked the same way, DeepSpeed's MoE layer (the deepspeed backend) on uneven batches against the native
vanilla block, and the whole model training with EP=2 and ZeRO-2 while one rank's batches hold no image.

Then ``mismatch``: rank 0 runs one MoE layer more than rank 1; rank 0 must fail within the expert-parallel timeout
with an error naming its rank and the layer. One launch runs both (``ep_worker.py EP_TIMEOUT_S MISMATCH_TIMEOUT_S``),
as every launch costs each rank its imports.

Run with plain ``python``, the script is its own launcher (:func:`fork_ranks`): it imports torch, DeepSpeed and the
package once, then forks the two ranks with the environment torchrun gives them (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ...), so they do not pay those ~10 s of imports again. Under torchrun it runs as one rank.

# B sequences, T positions, D model dim
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from dist_helpers import group_timeout

from asymoe_train.config.moe_schema import EvidenceConfig, HyperbolicConfig, MoEConfig, PoolConfig, RouterConfig
from asymoe_train.config.schema import (
    EngineConfig,
)
from asymoe_train.distributed.engine import init_distributed
from asymoe_train.distributed.expert_parallel import (
    AllToAllDispatcher,
    grad_norm,
    init_expert_parallel,
    mark_expert_parameters,
)
from asymoe_train.modality import IMAGE, PAD, TEXT
from asymoe_train.moe.block import MoEBlock
from asymoe_train.moe.evidence import TokenContext

D, F = 16, 24


def variant(name: str) -> MoEConfig:
    pools = {
        "vanilla": [PoolConfig(name="experts", num_experts=4)],
        "moiie": [PoolConfig(name="vision", num_experts=2), PoolConfig(name="text", num_experts=2),
                  PoolConfig(name="shared", num_experts=4)],
        "asymoe": [PoolConfig(name="vision", num_experts=2),
                   PoolConfig(name="hyperbolic", expert="hyperbolic", num_experts=2),
                   PoolConfig(name="text", num_experts=2), PoolConfig(name="evidence", expert="evidence", num_experts=2)],
    }[name.removesuffix("_paper")]
    routers = {
        "vanilla": [RouterConfig(name="all", modalities=["text", "image"], pools=["experts"])],
        "moiie": [RouterConfig(name="vision", modalities=["image"], pools=["vision", "shared"]),
                  RouterConfig(name="text", modalities=["text"], pools=["text", "shared"])],
        "asymoe": [RouterConfig(name="vision", modalities=["image"], pools=["vision", "hyperbolic"]),
                   RouterConfig(name="text", modalities=["text"], pools=["text", "hyperbolic", "evidence"])],
    }[name.removesuffix("_paper")]
    # asymoe_paper: the asymoe layout (pools of 2, so EP=2 splits them) with the paper's evidence expert, learned
    # score, fixed curvature and cone (conf/model/moe/asymoe_paper.yaml)
    paper = name == "asymoe_paper"
    hyperbolic = HyperbolicConfig(init_scale=0.5, learn_curvature=not paper, cone_form="paper" if paper else "meru")
    evidence = EvidenceConfig(num_heads=2, **({"form": "paper", "score": "learned", "loss_kind": "none"} if paper else {}))
    return MoEConfig(variant=name, top_k=2, pools=pools, routers=routers, router_init_std=0.5,
                     hyperbolic=hyperbolic, evidence=evidence)


def reference_block(cfg: MoEConfig, seed: int) -> MoEBlock:
    torch.manual_seed(seed)
    block = MoEBlock(cfg, D, F, "silu")
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "curvature" not in name:
                p.normal_(std=0.3)
    block.active_losses = set()
    return block


def parallel_block(reference: MoEBlock, cfg: MoEConfig, dispatcher, block_type=MoEBlock) -> MoEBlock:
    """A block of this rank's experts, its weights cut from the reference's (as a consolidated checkpoint loads)."""
    block = block_type(cfg, D, F, "silu", dispatcher)
    block.name = f"{cfg.variant}-block"
    state = reference.state_dict()
    experts = dict(block.expert_parameters())
    with torch.no_grad():
        for name, p in block.named_parameters():
            full = state[name]
            if name in experts:
                held = p.shape[0]
                full = full[dispatcher.ep_rank * held : (dispatcher.ep_rank + 1) * held]
            p.copy_(full)
    block.active_losses = set()
    return block


def random_batch(g: random.Random, num_seqs: int, length: int, kind: str):
    """Sequences of [text prefix, image tokens, prompt, answer, padding]; ``kind`` biases the modality mix."""
    modality = torch.full((num_seqs, length), PAD)
    context = torch.zeros(num_seqs, length, dtype=torch.bool)
    for b in range(num_seqs):
        real = 0 if kind == "pad" else g.randint(1, length)
        modality[b, :real] = TEXT if kind != "image" else IMAGE
        if kind == "mixed" and real > 2:
            start = g.randint(0, real - 2)
            modality[b, start : start + g.randint(1, real - start - 1)] = IMAGE
        context[b, : max(0, real - g.randint(0, 2))] = True
    return modality, context & (modality != PAD)


def run(block: MoEBlock, x_TD, modality_BT, context_BT, r_TD):
    x_TD = x_TD.clone().requires_grad_(True)
    b, t = modality_BT.shape
    out = block(x_TD, modality_BT.reshape(-1), TokenContext((b, t), context_BT, modality_BT))
    (out.hidden_TD * r_TD).sum().backward()
    return out.hidden_TD.detach(), x_TD.grad


def compare(reference: MoEBlock, block: MoEBlock, batch: dict, rows: slice, ep) -> dict[str, float]:
    """Max abs difference of outputs, input gradients and every parameter gradient between the EP=1 reference on the
    global batch and the EP=2 block on this rank's rows."""
    x, modality, context, r = batch["x"], batch["modality"], batch["context"], batch["r"]
    t = modality.shape[1]
    ref_y, ref_dx = run(reference, x, modality, context, r)
    seqs = slice(rows.start // t, rows.stop // t)
    y, dx = run(block, x[rows], modality[seqs], context[seqs], r[rows])
    diffs = {"output": (y - ref_y[rows]).abs().max().item() if y.numel() else 0.0,
             "input_grad": (dx - ref_dx[rows]).abs().max().item() if dx.numel() else 0.0}
    experts = dict(block.expert_parameters())
    mark_expert_parameters(experts.values(), ep)
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    worst, missing = 0.0, []
    for name, p in block.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        ref = ref_grads[name] if ref_grads[name] is not None else torch.zeros_like(p)
        if name in experts:
            ref = ref[ep.rank * p.shape[0] : (ep.rank + 1) * p.shape[0]]
        else:
            grad = grad.clone()
            dist.all_reduce(grad)  # each rank holds the gradient of its own tokens
            p.grad = grad  # reduced, as DeepSpeed leaves it for clipping
        if p.grad is None and ref.abs().max() > 0:
            missing.append(name)
        worst = max(worst, (grad - ref).abs().max().item())
    diffs["param_grad"] = worst
    diffs["params"] = len(ref_grads)
    assert not missing, missing
    # the global gradient norm (clipping, logging) counts every expert once, as on one rank
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters() if p.grad is not None]).item()
    diffs["grad_norm"] = abs(grad_norm(block.parameters(), ep).item() - ref_norm) / max(ref_norm, 1.0)
    reference.zero_grad(set_to_none=True)
    block.zero_grad(set_to_none=True)
    return diffs


def global_batch(seed: int, seqs: list[int], length: int, kinds: list[str]) -> dict:
    """The same global batch on every rank: rank r's sequences come after those of ranks < r."""
    g = random.Random(seed)
    parts = [random_batch(g, n, length, kind) for n, kind in zip(seqs, kinds)]
    modality = torch.cat([m for m, _ in parts])
    context = torch.cat([c for _, c in parts])
    gen = torch.Generator().manual_seed(seed)
    num = modality.numel()
    return {"modality": modality, "context": context, "x": torch.randn(num, D, generator=gen),
            "r": torch.randn(num, D, generator=gen)}


def numerics(ep) -> dict:
    rank = ep.rank
    dispatcher = AllToAllDispatcher(ep)
    result: dict = {"rank": dist.get_rank(), "ep_timeout_s": group_timeout(ep.group).total_seconds(),
                    "edp_timeout_s": group_timeout(ep.data_group).total_seconds()}
    # 1. EP=2 against EP=1, same global batch, uneven split (3 sequences on rank 0, 1 on rank 1)
    length = 9
    for name in ("vanilla", "moiie", "asymoe", "asymoe_paper"):
        cfg = variant(name)
        reference = reference_block(cfg, seed=1)
        block = parallel_block(reference, cfg, dispatcher)
        batch = global_batch(7, [3, 1], length, ["mixed", "mixed"])
        start = 0 if rank == 0 else 3 * length
        rows = slice(start, start + (3 if rank == 0 else 1) * length)
        result[name] = compare(reference, block, batch, rows, ep)
    # 2. randomized uneven and zero token counts per rank and per modality
    g = random.Random(2026)
    kinds = ["mixed", "text", "image", "pad", "mixed"]
    trials, worst = [], 0.0
    for trial in range(20):
        name = ("vanilla", "moiie", "asymoe")[trial % 3]
        cfg = variant(name)
        seqs = [g.randint(0, 4), g.randint(0, 4)]
        trial_kinds = [g.choice(kinds), g.choice(kinds)]
        length = g.randint(3, 12)
        reference = reference_block(cfg, seed=100 + trial)
        block = parallel_block(reference, cfg, dispatcher)
        batch = global_batch(trial, seqs, length, trial_kinds)
        start = 0 if rank == 0 else seqs[0] * length
        rows = slice(start, start + seqs[rank] * length)
        diffs = compare(reference, block, batch, rows, ep)
        worst = max(worst, diffs["output"], diffs["input_grad"], diffs["param_grad"], diffs["grad_norm"])
        counts = {k: int((batch["modality"][rows.start // length : rows.stop // length] == v).sum())
                  for k, v in (("text", TEXT), ("image", IMAGE))}
        trials.append({"variant": name, "seqs": seqs, "kinds": trial_kinds, "length": length, **counts})
    result["trials"] = trials
    result["trials_max_diff"] = worst
    # asymoe_paper on uneven and zero token counts (a rank without tokens, a text-only rank)
    paper_worst = 0.0
    for trial, (seqs, trial_kinds) in enumerate((([0, 2], ["mixed", "mixed"]), ([2, 0], ["text", "mixed"]),
                                                 ([1, 3], ["text", "image"]))):
        cfg = variant("asymoe_paper")
        reference = reference_block(cfg, seed=400 + trial)
        block = parallel_block(reference, cfg, dispatcher)
        batch = global_batch(500 + trial, seqs, 8, trial_kinds)
        start = 0 if rank == 0 else seqs[0] * 8
        diffs = compare(reference, block, batch, slice(start, start + seqs[rank] * 8), ep)
        paper_worst = max(paper_worst, diffs["output"], diffs["input_grad"], diffs["param_grad"], diffs["grad_norm"])
    result["asymoe_paper_trials_max_diff"] = paper_worst
    # 3. DeepSpeed's MoE layer (backend=deepspeed) on uneven batches: no crash, and the native block's outputs
    from asymoe_train.distributed.deepspeed_moe import DeepSpeedMoEBlock

    cfg = variant("vanilla")
    ds_worst = 0.0
    for trial, seqs in enumerate(([3, 1], [0, 2], [2, 0], [1, 4])):
        reference = reference_block(cfg, seed=200 + trial)
        block = parallel_block(reference, cfg, dispatcher, DeepSpeedMoEBlock)
        batch = global_batch(300 + trial, seqs, 7, ["mixed", "text"])
        start = 0 if rank == 0 else seqs[0] * 7
        rows = slice(start, start + seqs[rank] * 7)
        t = 7
        ref_y, _ = run(reference, batch["x"], batch["modality"], batch["context"], batch["r"])
        seq = slice(rows.start // t, rows.stop // t)
        y, _ = run(block, batch["x"][rows], batch["modality"][seq], batch["context"][seq], batch["r"][rows])
        if y.numel():
            ds_worst = max(ds_worst, (y - ref_y[rows]).abs().max().item())
    result["deepspeed_backend_max_diff"] = ds_worst
    result["text_only_losses"] = text_only_rank(ep)
    return result


def text_only_rank(ep) -> list[float]:
    """The whole model (tiny VLM, moiie) in a DeepSpeed engine with EP=2 and ZeRO-2; rank 1's batches hold no image
    in the first two steps. Returns the losses of 3 steps."""
    from asymoe_train.config.schema import ModelConfig, StageConfig
    from asymoe_train.distributed.engine import build_engine
    from asymoe_train.models.vlm import build_model

    model = build_model(ModelConfig(moe=variant("moiie")), 300, 0)
    model.dispatcher = AllToAllDispatcher(ep)
    model.upcycle(torch.Generator().manual_seed(1))
    stage = StageConfig(source="qa", steps=3, lr=1e-3, batch_size=2)
    engine = build_engine(model, EngineConfig(ep_size=2, zero_stage=2), stage, 3, ep)
    g = torch.Generator().manual_seed(ep.rank)
    losses = []
    for step in range(3):
        ids = torch.randint(1, 300, (2, 12), generator=g)
        modality = torch.full((2, 12), TEXT)
        if ep.rank == 0 or step == 2:
            modality[:, 1:5] = IMAGE  # 4 image tokens per 64-px image
            pixels, index = torch.randn(2, 3, 64, 64, generator=g), torch.arange(2)
        else:
            pixels, index = torch.zeros(0, 3, 1, 1), torch.full((2,), -1)
        out = engine(ids, modality, pixels, index)
        loss = torch.nn.functional.cross_entropy(out.logits_BTV[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def mismatch(ep, timeout_s: int) -> dict:
    # on an expert-parallel group of its own, with a short timeout (the numerics check that init_expert_parallel
    # gives its groups engine.ep_timeout_s)
    ep = dataclasses.replace(ep, group=dist.new_group(list(range(ep.size)), timeout=timedelta(seconds=timeout_s)))
    cfg = variant("moiie")
    block = parallel_block(reference_block(cfg, seed=3), cfg, AllToAllDispatcher(ep))
    block.name = "lm.model.layers.3.mlp"
    batch = global_batch(5, [2, 2], 6, ["mixed", "mixed"])
    rows = slice(ep.rank * 12, ep.rank * 12 + 12)
    x, modality = batch["x"][rows], batch["modality"][ep.rank * 2 : ep.rank * 2 + 2]
    ctx = TokenContext((2, 6), batch["context"][ep.rank * 2 : ep.rank * 2 + 2], modality)
    block(x, modality.reshape(-1), ctx)  # both ranks
    store = dist.distributed_c10d._get_default_store()  # not the group under test: tells rank 1 when to leave
    if ep.rank == 1:
        # skips the next layer and stays alive meanwhile (so rank 0 meets the timeout, not a closed connection):
        # until rank 0 has failed, at most 1.5 timeouts
        with contextlib.suppress(RuntimeError):
            store.wait(["mismatch/rank0-done"], timedelta(seconds=1.5 * group_timeout(ep.group).total_seconds()))
        return {"rank": 1}
    start = time.perf_counter()
    try:
        block(x, modality.reshape(-1), ctx)
    except RuntimeError as exn:
        return {"rank": 0, "error": str(exn)[:600], "seconds": time.perf_counter() - start}
    finally:
        store.set("mismatch/rank0-done", "1")
    return {"rank": 0, "error": None}


# Imported by the launching parent before it forks, so that no rank imports them again: what the ranks use, and what
# DeepSpeed imports lazily when it builds its first engine (its Muon optimizer check compiles with torch.compile).
WARM_IMPORTS = ("deepspeed", "deepspeed.ops", "deepspeed.runtime.engine", "deepspeed.moe.utils", "deepspeed.utils",
                "deepspeed.runtime.zero.muon.muon_optimizer", "torch._dynamo", "torch._inductor.compile_fx",
                "asymoe_train.models.vlm", "asymoe_train.distributed.deepspeed_moe", "asymoe_train.checkpoint.engine_checkpoint",
                "asymoe_train.training.schedule", "safetensors.torch")


def warm_imports() -> None:
    """Import :data:`WARM_IMPORTS` (best effort: a module another DeepSpeed version lacks is skipped)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name in WARM_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, nproc: int, port: int, scratch: str, rank_main: Callable[..., object], args: tuple) -> None:
    """One forked rank: torchrun's environment, ``rank_main(*args)``, its result to ``scratch/rank<r>.json``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result = rank_main(*args)
    with open(os.path.join(scratch, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()


def fork_ranks(nproc: int, rank_main: Callable[..., object], *args) -> list:
    """torchrun --standalone without the imports: ``torch.multiprocessing.start_processes`` forks ``nproc`` ranks of
    one job from this process (which has imported what they need, and must hold no process group and no threads),
    each with torchrun's environment; each runs ``rank_main(*args)``, and their JSON-able results come back by rank.
    When a rank fails, torch terminates the others (they would wait for it in a collective) and raises. The
    launcher's hard timeout covers the ranks: they stay in this process's process group."""
    sys.stdout.flush()  # or each rank would write the parent's buffered output again
    sys.stderr.flush()
    with tempfile.TemporaryDirectory(prefix="ranks-") as scratch:
        torch.multiprocessing.start_processes(_rank, (nproc, _free_port(), scratch, rank_main, args), nprocs=nproc,
                                              start_method="fork")
        results = []
        for rank in range(nproc):
            with open(os.path.join(scratch, f"rank{rank}.json")) as f:
                results.append(json.load(f))
        return results


def rank_main(ep_timeout: int, mismatch_timeout: int) -> dict:
    """One rank: the numerics, then the mismatch (last: it leaves a collective unmatched)."""
    torch.set_num_threads(1)
    engine = EngineConfig(ep_size=2, ep_timeout_s=ep_timeout, dist_timeout_s=120)
    init_distributed(engine)
    ep = init_expert_parallel(engine)
    result = numerics(ep)
    result["mismatch"] = mismatch(ep, mismatch_timeout)
    return result


def main() -> None:
    ep_timeout, mismatch_timeout = int(sys.argv[1]), int(sys.argv[2])
    if "RANK" in os.environ:  # one rank of a torchrun job
        results = [rank_main(ep_timeout, mismatch_timeout)]
    else:
        warm_imports()
        results = fork_ranks(2, rank_main, ep_timeout, mismatch_timeout)
    for result in results:
        print("RESULT " + json.dumps(result), flush=True)
    # leave without tearing the groups down: after a mismatch the peer may be gone
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
