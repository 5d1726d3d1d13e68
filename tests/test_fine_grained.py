"""Fine-grained experts (``model.moe.pools.*.width`` = 1/S) and segment upcycling: the dense FFN's hidden units cut
into S segments that the experts take in turn, each scaled so that the S segments with equal combine weights sum to
the FFN. Pinned by the dense MLP itself (transformers' LlamaMLP and Phi-3's fused one)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.phi3.modeling_phi3 import Phi3MLP

from asymoe_train.config.errors import ConfigError
from asymoe_train.config.moe_schema import EvidenceConfig, HyperbolicConfig, MoEConfig, PoolConfig, RouterConfig
from asymoe_train.config.schema import (
    LMConfig,
    ModelConfig,
    StageConfig,
    VisionConfig,
)
from asymoe_train.config.validate_moe import validate_width
from asymoe_train.modality import IMAGE, PAD, TEXT
from asymoe_train.moe.block import MoEBlock
from asymoe_train.moe.evidence import TokenContext
from asymoe_train.moe.experts import mlp_weights
from asymoe_train.training.params import stage_params

D, F = 32, 48


def segment_block(segments: int, copies: int = 1, top_k: int | None = None, expert: str = "ffn") -> MoEConfig:
    pools = [PoolConfig(name="experts", expert=expert, num_experts=segments * copies, width=1 / segments)]
    return MoEConfig(variant="vanilla", top_k=top_k or segments, pools=pools, router_init_std=0.0,
                     routers=[RouterConfig(name="all", modalities=["text", "image"], pools=["experts"])],
                     hyperbolic=HyperbolicConfig(init_scale=0.5), evidence=EvidenceConfig(num_heads=2))


def tokens(num: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num, D, generator=g), torch.randint(0, 3, (num,), generator=g)


@pytest.mark.parametrize("segments", [2, 4, 8])
def test_all_segments_with_equal_weights_reproduce_the_dense_mlp(segments):
    """S experts of width 1/S, top-k = S, a zero router (equal logits: every combine weight 1/S): the block equals
    the dense MLP it was upcycled from."""
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F, hidden_act="silu"))
    block = MoEBlock.upcycle(mlp, segment_block(segments), D, F, "silu")
    assert block.pools["experts"].gate_EFD.shape == (segments, F // segments, D)
    x, modality = tokens()
    keep = modality != PAD
    torch.testing.assert_close(block(x, modality).hidden_TD[keep], mlp(x)[keep], atol=1e-5, rtol=1e-5)


def test_segments_are_taken_in_turn_and_cover_the_ffn():
    """8 experts of width 1/4 (Phi-3's fused gate/up MLP): expert e holds segment e mod 4, its output projection
    times 4; experts 0-3 together hold every hidden unit once, experts 4-7 the same again."""
    torch.manual_seed(0)
    mlp = Phi3MLP(Phi3Config(hidden_size=D, intermediate_size=F, hidden_act="silu"))
    block = MoEBlock.upcycle(mlp, segment_block(4, copies=2, top_k=2), D, F, "silu")
    pool = block.pools["experts"]
    gate_FD, up_FD, down_DF = mlp_weights(mlp)
    h = F // 4
    for e in range(8):
        s = e % 4
        torch.testing.assert_close(pool.gate_EFD[e], gate_FD[s * h : (s + 1) * h], rtol=0, atol=0)
        torch.testing.assert_close(pool.up_EFD[e], up_FD[s * h : (s + 1) * h], rtol=0, atol=0)
        torch.testing.assert_close(pool.down_EDF[e], 4 * down_DF[:, s * h : (s + 1) * h], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(list(pool.gate_EFD[:4])), gate_FD, rtol=0, atol=0)
    # expert by expert: the mean of the four segment experts is the MLP
    x, _ = tokens()
    mean = sum(pool.expert(e, x) for e in range(4)) / 4
    torch.testing.assert_close(mean, mlp(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("expert", ["evidence", "hyperbolic"])
def test_memory_and_hyperbolic_experts_take_segments_too(expert):
    """Evidence experts (their memory branch) and hyperbolic experts (their space weights) upcycle segment-wise;
    an upcycled evidence expert still equals its memory branch, so 4 quarter-width ones reproduce the MLP."""
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F, hidden_act="silu"))
    block = MoEBlock.upcycle(mlp, segment_block(4, expert=expert), D, F, "silu")
    pool = block.pools["experts"]
    weights = pool.memory if expert == "evidence" else pool
    gate_FD, _, down_DF = mlp_weights(mlp)
    assert weights.gate_EFD.shape == (4, F // 4, D)
    for e in range(4):
        torch.testing.assert_close(weights.gate_EFD[e], gate_FD[e * 12 : (e + 1) * 12], rtol=0, atol=0)
        torch.testing.assert_close(weights.down_EDF[e], 4 * down_DF[:, e * 12 : (e + 1) * 12], rtol=0, atol=0)
    if expert == "evidence":
        x, _ = tokens()
        modality = torch.full((x.shape[0],), TEXT)
        modality[:5] = IMAGE
        ctx = TokenContext((1, x.shape[0]), torch.ones(1, x.shape[0], dtype=torch.bool), modality[None])
        torch.testing.assert_close(block(x, modality, ctx).hidden_TD, mlp(x), atol=1e-5, rtol=1e-5)


def test_widths_are_whole_multiples_or_segments():
    for good in (1, 2, 0.5, 0.25, 0.125):
        validate_width("model.moe.pools.0.width", good, 64)
    for bad, message in ((0.3, "0.25"), (1.5, "whole multiples"), (0, "must be"), (1 / 3, "do not split")):
        with pytest.raises(ConfigError, match=message) as info:
            validate_width("model.moe.pools.0.width", bad, 64)
        assert "model.moe.pools.0.width" in str(info.value)


def test_activated_parameters_follow_the_width():
    """Top-2 of half-width experts activates the expert parameters top-1 of whole ones does; the totals follow the
    pool sizes (the routers grow with the number of experts: they count as dense parameters)."""
    vision = VisionConfig(image_size=32, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, merge=2)
    lm = LMConfig(hidden_size=D, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=F, vocab_size=300)
    stages = {"s": StageConfig(source="qa", steps=1, upcycle=True, trainable=["experts", "routers"])}
    counts = {}
    for width, top_k, num in ((1.0, 1, 4), (0.5, 2, 8), (0.25, 4, 16), (0.25, 2, 16)):
        moe = MoEConfig(variant="vanilla", top_k=top_k, pools=[PoolConfig(name="e", num_experts=num, width=width)],
                        routers=[RouterConfig(name="all", modalities=["text", "image"], pools=["e"])])
        _, (stage,) = stage_params(ModelConfig(vision=vision, lm=lm, moe=moe), stages, 300)
        counts[width, top_k] = stage
    whole, half, quarter, quarter_top2 = counts.values()
    expert_params = 3 * D * F  # one whole-width SwiGLU expert, one MoE layer (layer 1)
    def experts_per_token(stage):
        return stage.activated - stage.params.dense

    assert experts_per_token(whole) == experts_per_token(half) == experts_per_token(quarter) == expert_params
    assert experts_per_token(quarter_top2) == expert_params // 2
    assert whole.params.expert == half.params.expert == quarter.params.expert == 4 * expert_params  # 4 FFNs
    assert half.params.dense - whole.params.dense == 4 * D  # four more router rows
