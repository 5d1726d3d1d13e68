"""GPU efficiency switches on the tiny model, fp32 on CPU: activation checkpointing (same losses, statistics and
gradients, and the layers really run twice) and torch.compile of the MoE blocks (same numbers as eager)."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
from omegaconf import OmegaConf

from asymoe_train.config.moe_schema import MoEConfig
from asymoe_train.config.schema import (
    LMConfig,
    LossConfig,
    ModelConfig,
    VisionConfig,
)
from asymoe_train.modality import IMAGE, PAD, TEXT
from asymoe_train.models.vlm import build_model
from asymoe_train.moe.block import MoEBlock
from asymoe_train.training.losses import host_metrics, total_loss

VOCAB = 50
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
# every auxiliary term on, so each one's gradient goes through the recomputation
LOSSES = LossConfig(balance=0.1, z=0.01, order=0.2, evd=0.05)


def moe_config(name: str) -> MoEConfig:
    """A variant of conf/model/moe, with routers random enough to send tokens everywhere."""
    cfg = OmegaConf.merge(OmegaConf.structured(MoEConfig), OmegaConf.load(os.path.join(CONF, "model", "moe",
                                                                                       f"{name}.yaml")))
    cfg.router_init_std = 0.5
    return OmegaConf.to_object(cfg)


def tiny(moe: MoEConfig, **switches) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                            intermediate_size=64, merge=2),
        lm=LMConfig(hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=48),
        moe=moe, **switches,
    )


def batch(lengths=(12, 9, 7), seed: int = 0):
    """Two sequences with the image (4 tokens), one text-only, right-padded; the last 3 tokens are the answer."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mod = torch.full((len(lengths), t), PAD)
    labels = torch.full((len(lengths), t), -100)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(4, VOCAB, (n,), generator=g)
        mod[row, :n] = TEXT
        if row < 2:
            mod[row, 2:6] = IMAGE
        labels[row, n - 3 : n] = ids[row, n - 3 : n]
    context = (mod != PAD) & (labels == -100)  # image and prompt tokens
    pixels = torch.randn(1, 3, 32, 32, generator=g)
    index = torch.tensor([0, 0] + [-1] * (len(lengths) - 2))
    return (ids, mod, pixels, index, context), labels


def step(model, inputs, labels):
    """Loss terms, routing statistics and every parameter's gradient of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    loss, metrics = total_loss(out, labels, LOSSES)
    metrics = host_metrics(metrics)
    loss.backward()
    stats = {i: (o.stats, {k: v.tolist() for k, v in o.expert_counts.items()}, o.router_tokens)
             for i, o in out.moe.items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits_BTV.detach(), metrics, stats, grads


def tower_layer(tower: torch.nn.Module) -> torch.nn.Module:
    """The vision tower's first encoder layer (where it sits differs between transformers versions)."""
    return next(m for name, m in tower.named_modules() if name.endswith("layers.0"))


def upcycled(cfg: ModelConfig):
    model = build_model(cfg, VOCAB, 0, seed=0)
    torch.manual_seed(1)  # evidence branches are not copies of the MLP: drawn from the global generator
    model.upcycle(torch.Generator().manual_seed(1))
    return model.train()


@pytest.mark.parametrize("variant", ["moiie", "asymoe"])
def test_activation_checkpointing_keeps_losses_statistics_and_gradients(variant):
    plain = upcycled(tiny(moe_config(variant)))
    ckpt = upcycled(tiny(moe_config(variant), activation_checkpointing=True))
    calls: dict[str, int] = {}
    # Pre-hooks count calls: the recomputation stops once it has rebuilt what backward needs, before a module's
    # forward hooks would run, and Hugging Face checkpoints a layer's forward, so count a module inside it.
    watched = [*ckpt.moe_blocks().items(), ("tower layer 0", next(tower_layer(ckpt.vision).children()))]
    for name, module in watched:
        module.register_forward_pre_hook(lambda *_, key=str(name): calls.__setitem__(key, calls.get(key, 0) + 1))
    inputs, labels = batch()
    logits, metrics, stats, grads = step(plain, inputs, labels)
    logits_c, metrics_c, stats_c, grads_c = step(ckpt, inputs, labels)
    # every MoE block and the tower's layers ran twice: forward, then recomputed in backward
    assert calls == {"1": 2, "3": 2, "tower layer 0": 2}
    assert {"loss/balance", "loss/z"} <= set(metrics)
    if variant == "asymoe":
        assert {"loss/order", "loss/evd"} <= set(metrics)
    assert metrics.keys() == metrics_c.keys()
    for key, value in metrics.items():
        assert abs(metrics_c[key] - value) <= 1e-6, key
    assert stats_c == stats
    torch.testing.assert_close(logits_c, logits, atol=1e-6, rtol=0)
    assert grads_c.keys() == grads.keys()
    moe_params = {n for n, _ in plain.named_parameters() if ".mlp.pools." in n or ".mlp.routers." in n}
    assert moe_params and moe_params <= grads.keys()  # every expert and router parameter gets a gradient
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, atol=1e-6, rtol=0, msg=name)
    # eval and generation do not recompute (nothing to save memory for)
    calls.clear()
    with torch.no_grad():
        ckpt.eval()(*inputs)
    assert calls == {"1": 1, "3": 1, "tower layer 0": 1}


def has_cxx() -> bool:
    return any(c and shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++"))


def test_compile_moe_without_a_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    model = build_model(tiny(moe_config("vanilla"), compile_moe=True), VOCAB, 0, seed=0)
    with pytest.raises(ValueError, match="model.compile_moe=true: torch.compile needs a C.. compiler.*"
                                         "set model.compile_moe=false"):
        model.upcycle()


@pytest.mark.slow
@pytest.mark.skipif(not has_cxx(), reason="torch.compile on CPU needs a C++ compiler (none of $CXX, c++, g++, "
                                          "clang++ on PATH); the error for it is tested above")
def test_compile_moe_matches_eager():
    """Compiled pools and routers (dynamic shapes: three batches of different lengths, no recompiling) give eager's
    logits, losses and gradients within 1e-5."""
    eager = upcycled(tiny(moe_config("moiie")))
    compiled = upcycled(tiny(moe_config("moiie"), compile_moe=True))
    block = compiled.moe_blocks()[1]
    assert isinstance(block, MoEBlock)
    assert all(m._compiled_call_impl is not None for m in (*block.pools.values(), *block.routers.values()))
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints do not see the compilation
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    graphs = []
    for n, lengths in enumerate([(12, 9, 7), (20, 11, 5, 16), (9, 9, 9)]):
        inputs, labels = batch(lengths, seed=n)
        started = time.perf_counter()
        logits_c, metrics_c, stats_c, grads_c = step(compiled, inputs, labels)
        graphs.append(counters["stats"]["unique_graphs"])
        print(f"compiled step {n}: {time.perf_counter() - started:.2f}s, {graphs[-1]} graphs compiled so far")
        logits, metrics, stats, grads = step(eager, inputs, labels)
        torch.testing.assert_close(logits_c, logits, atol=1e-5, rtol=1e-5)
        for key, value in metrics.items():
            assert abs(metrics_c[key] - value) <= 1e-5, key
        assert {i: s[1] for i, s in stats_c.items()} == {i: s[1] for i, s in stats.items()}  # same routing
        for name, grad in grads.items():
            torch.testing.assert_close(grads_c[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    assert graphs[0] > 0 and graphs[-1] == graphs[0]  # compiled code ran, and new token counts did not recompile
