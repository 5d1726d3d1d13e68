"""MoE block numerics, pinned by references: a plain per-token loop, transformers' Mixtral block, the dense MLP."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from asymoe_train.config.moe_schema import MoEConfig, PoolConfig, RouterConfig
from asymoe_train.config.schema import LossConfig
from asymoe_train.data.conversation import IGNORE
from asymoe_train.modality import IMAGE, PAD, TEXT
from asymoe_train.models.vlm import VLMOutput
from asymoe_train.moe.block import MoEBlock
from asymoe_train.moe.router import Routing, balance_loss
from asymoe_train.training.losses import host_metrics, total_loss

D, F = 32, 48


def variant(name: str) -> MoEConfig:
    pools = {
        "vanilla": [PoolConfig(name="experts", num_experts=4)],
        "modality": [PoolConfig(name="vision", num_experts=2), PoolConfig(name="text", num_experts=3)],
        "moiie": [PoolConfig(name="vision", num_experts=2), PoolConfig(name="text", num_experts=1),
                  PoolConfig(name="shared", num_experts=3)],
    }[name]
    routers = {
        "vanilla": [RouterConfig(name="all", modalities=["text", "image"], pools=["experts"])],
        "modality": [RouterConfig(name="vision", modalities=["image"], pools=["vision"]),
                     RouterConfig(name="text", modalities=["text"], pools=["text"])],
        "moiie": [RouterConfig(name="vision", modalities=["image"], pools=["vision", "shared"]),
                  RouterConfig(name="text", modalities=["text"], pools=["text", "shared"])],
    }[name]
    return MoEConfig(variant=name, top_k=2, pools=pools, routers=routers, router_init_std=0.5)


def random_block(cfg: MoEConfig, seed: int = 0) -> MoEBlock:
    torch.manual_seed(seed)
    block = MoEBlock(cfg, D, F, "silu")
    for pool in block.pools.values():
        for p in pool.parameters():
            torch.nn.init.normal_(p, std=0.2)
    return block


def tokens(num: int = 50, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num, D, generator=g)
    modality = torch.randint(0, 3, (num,), generator=g)  # text, image and pad mixed
    return x, modality


def reference_loop(block: MoEBlock, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """Token by token: pick the router of the token's modality, its top-k, weighted sum of expert outputs."""
    experts = [(pool, e) for pool in block.pools.values() for e in range(pool.num_experts)]
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for name, router in block.routers.items():
            if int(modality[t]) not in block.router_modalities[name]:
                continue
            probs = torch.softmax(x[t].float() @ router.weight_RD.float().T, -1)
            top, idx = probs.topk(block.top_k)
            top = top / top.sum()
            for w, i in zip(top, idx):
                pool, e = experts[int(block.reach(name)[i])]
                y[t] += w * pool.expert(e, x[t : t + 1])[0]
    return y


@pytest.mark.parametrize("name", ["vanilla", "modality", "moiie"])
def test_sorted_dispatch_equals_per_token_loop(name):
    block = random_block(variant(name))
    x, modality = tokens()
    out = block(x, modality)
    torch.testing.assert_close(out.hidden_TD, reference_loop(block, x, modality), atol=1e-5, rtol=1e-5)
    assert out.hidden_TD[modality == PAD].abs().max() == 0  # pad tokens reach no expert
    for router, counts in out.expert_counts.items():
        served = sum(int((modality == m).sum()) for m in block.router_modalities[router])
        assert int(counts.sum()) == served * block.top_k


def test_vanilla_equals_transformers_mixtral_block():
    cfg = variant("vanilla")
    block = random_block(cfg)
    mixtral = MixtralSparseMoeBlock(MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=4,
                                                  num_experts_per_tok=2, router_jitter_noise=0.0))
    pool = block.pools["experts"]
    with torch.no_grad():
        mixtral.gate.weight.copy_(block.routers["all"].weight_RD)
        mixtral.experts.gate_up_proj.copy_(torch.cat([pool.gate_EFD, pool.up_EFD], dim=1))
        mixtral.experts.down_proj.copy_(pool.down_EDF)
    x, _ = tokens(64)
    modality = torch.full((64,), TEXT)
    modality[::3] = IMAGE
    ours = block(x, modality).hidden_TD
    theirs = mixtral(x.unsqueeze(0))[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vanilla", "modality", "moiie"])
def test_upcycled_block_reproduces_dense_mlp(name):
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F, hidden_act="silu"))
    block = MoEBlock.upcycle(mlp, variant(name), D, F, "silu")
    x, modality = tokens()
    keep = modality != PAD
    torch.testing.assert_close(block(x, modality).hidden_TD[keep], mlp(x)[keep], atol=1e-5, rtol=1e-5)


def test_zero_tokens_for_a_modality_and_gradients_reach_routers():
    block = random_block(variant("moiie"))
    x, _ = tokens(20)
    x.requires_grad_(True)
    modality = torch.full((20,), TEXT)  # no image tokens at all: the vision router serves nobody
    out = block(x, modality)
    assert out.router_tokens == {"vision": 0, "text": 20}
    (out.hidden_TD.square().sum() + out.losses["balance"]).backward()
    assert block.routers["text"].weight_RD.grad.abs().sum() > 0
    assert block.routers["vision"].weight_RD.grad is None or block.routers["vision"].weight_RD.grad.abs().sum() == 0
    assert torch.isfinite(out.losses["balance"])


def test_balance_loss_is_one_when_uniform_and_larger_when_collapsed():
    n, r, k = 64, 4, 2
    uniform = torch.full((n, r), 1 / r)
    experts = torch.stack([torch.arange(n) % r, (torch.arange(n) + 1) % r], dim=1)
    balanced = Routing(torch.full((n, k), 0.5), experts, uniform, uniform.log())
    assert balance_loss(balanced).item() == pytest.approx(1.0, abs=1e-6)
    collapsed_probs = torch.tensor([[0.9, 0.1, 0.0, 0.0]]).expand(n, r)
    collapsed = Routing(torch.full((n, k), 0.5), torch.tensor([[0, 1]]).expand(n, k), collapsed_probs,
                        collapsed_probs.clamp_min(1e-9).log())
    assert balance_loss(collapsed).item() == pytest.approx(4 * (0.5 * 0.9 + 0.5 * 0.1), abs=1e-6)


def test_balance_loss_gradient_reaches_only_the_router():
    block = random_block(variant("vanilla"))
    x, modality = tokens()
    block(x, modality).losses["balance"].backward()
    assert block.routers["all"].weight_RD.grad.abs().sum() > 0
    assert all(p.grad is None for p in block.pools.parameters())


def test_balance_loss_over_two_ranks_equals_one_process_on_the_global_batch(monkeypatch):
    """``total_loss`` on 2 data-parallel ranks, its all-reduce simulated in one process (each rank's statistics plus
    the other's): the logged balance and LM losses are those of 1 process on the concatenated batch, and the
    rank-averaged gradient of every parameter (what DeepSpeed applies) is the 1-process gradient."""
    block = random_block(variant("moiie"))
    head = torch.nn.Linear(D, 11)
    params = [*block.parameters(), *head.parameters()]
    b, t = 3, 20
    x, modality = tokens(b * t)
    modality[:t] = TEXT  # rank 0's one sequence has no image token: its vision router serves nobody
    g = torch.Generator().manual_seed(2)
    labels_BT = torch.randint(0, 11, (b, t), generator=g)
    labels_BT[torch.rand(b, t, generator=g) < 0.5] = IGNORE
    weights = LossConfig(balance=1.0)  # large, so the balance term's share of the gradient shows

    def forward(rows: slice) -> VLMOutput:
        """Two MoE layers (the block twice) and a head over the sequences ``rows``."""
        mod_T = modality.reshape(b, t)[rows].reshape(-1)
        first = block(x.reshape(b, t, D)[rows].reshape(-1, D), mod_T)
        second = block(first.hidden_TD.tanh(), mod_T)
        return VLMOutput(head(second.hidden_TD).reshape(-1, t, 11), {1: first, 3: second})

    def step(rows: slice, world_size: int = 1) -> tuple[dict, list[torch.Tensor], VLMOutput]:
        for p in params:
            p.grad = None
        out = forward(rows)
        loss, metrics = total_loss(out, labels_BT[rows], weights, world_size)
        metrics = host_metrics(metrics)
        loss.backward()
        return metrics, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params], out

    reference, reference_grads, _ = step(slice(None))
    ranks = [slice(0, 1), slice(1, b)]  # uneven: 1 sequence and 2
    sent = {}
    for rank, rows in enumerate(ranks):  # what each rank sends to the all-reduce
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda v, rank=rank: sent.__setitem__(rank, v.clone()))
        total_loss(forward(rows), labels_BT[rows], weights, world_size=2)
    metrics, grads, outs = [], [], []
    for rank, rows in enumerate(ranks):
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda v, rank=rank: v.add_(sent[1 - rank]))
        m, grad, out = step(rows, world_size=2)
        metrics.append(m)
        grads.append(grad)
        outs.append(out)
    for m in metrics:
        assert m["loss/balance"] == pytest.approx(reference["loss/balance"], rel=1e-6)
        assert m["loss/lm"] == pytest.approx(reference["loss/lm"], rel=1e-6)
        assert m["loss/total"] == pytest.approx(reference["loss/total"], rel=1e-6)
    names = [*(f"block.{n}" for n, _ in block.named_parameters()), *(f"head.{n}" for n, _ in head.named_parameters())]
    for name, want, *got in zip(names, reference_grads, *grads):
        torch.testing.assert_close((got[0] + got[1]) / 2, want, atol=1e-6, rtol=1e-5, msg=name)
    # the per-rank loss this replaces is another objective here
    per_rank = sum(float(o.moe[i].losses["balance"].detach()) for o in outs for i in (1, 3)) / 4
    assert abs(per_rank - reference["loss/balance"]) > 1e-2


def test_widened_dense_expert_equals_the_dense_mlp():
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F, hidden_act="silu"))
    cfg = MoEConfig(variant="dense_matched", top_k=1, pools=[PoolConfig(name="ffn", num_experts=1, width=2)],
                    routers=[RouterConfig(name="all", modalities=["text", "image"], pools=["ffn"])])
    block = MoEBlock.upcycle(mlp, cfg, D, F, "silu")
    assert block.pools["ffn"].gate_EFD.shape == (1, 2 * F, D)
    x, modality = tokens()
    keep = modality != PAD
    torch.testing.assert_close(block(x, modality).hidden_TD[keep], mlp(x)[keep], atol=1e-5, rtol=1e-5)
