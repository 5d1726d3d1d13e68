"""The vision-language model: upcycling equivalence end to end, padding invariance, trainable groups."""

from __future__ import annotations

import pytest
import torch

from asymoe_train.config.moe_schema import MoEConfig, PoolConfig, RouterConfig
from asymoe_train.config.schema import LMConfig, ModelConfig, VisionConfig
from asymoe_train.modality import IMAGE, PAD, TEXT
from asymoe_train.models.vlm import build_model
from asymoe_train.training.groups import GROUPS, parameter_groups, set_trainable

VOCAB = 50


def tiny(moe: MoEConfig, vision_type: str = "siglip") -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(type=vision_type, image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                            intermediate_size=64, merge=2),
        lm=LMConfig(hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=48,
                    attn_implementation="eager"),
        moe=moe,
    )


MOIIE = MoEConfig(variant="moiie", top_k=2, router_init_std=0.5, pools=[
    PoolConfig(name="vision", num_experts=2), PoolConfig(name="text", num_experts=2),
    PoolConfig(name="shared", num_experts=2)], routers=[
    RouterConfig(name="vision", modalities=["image"], pools=["vision", "shared"]),
    RouterConfig(name="text", modalities=["text"], pools=["text", "shared"])])


def batch(left_pad: bool = False):
    """Two sequences sharing one image, one text-only, with padding; 4 image tokens each (32 px, patch 8, merge 2)."""
    g = torch.Generator().manual_seed(0)
    lengths = [12, 9, 7]
    images = [True, True, False]
    t = max(lengths)
    ids = torch.zeros(3, t, dtype=torch.long)
    mod = torch.full((3, t), PAD)
    for row, (n, has_image) in enumerate(zip(lengths, images)):
        cols = slice(t - n, t) if left_pad else slice(0, n)
        seq_mod = torch.full((n,), TEXT)
        if has_image:
            seq_mod[2:6] = IMAGE
        ids[row, cols] = torch.randint(4, VOCAB, (n,), generator=g)
        mod[row, cols] = seq_mod
    pixels = torch.randn(1, 3, 32, 32, generator=g)
    return ids, mod, pixels, torch.tensor([0, 0, -1])


@pytest.mark.parametrize("vision_type", ["siglip", "clip"])
def test_upcycled_model_reproduces_dense_model(vision_type):
    model = build_model(tiny(MOIIE, vision_type), VOCAB, 0, seed=0).eval()
    ids, mod, pixels, index = batch()
    dense = model(ids, mod, pixels, index).logits_BTV
    model.upcycle()
    assert model.is_upcycled and sorted(model.moe_blocks()) == [1, 3]
    out = model(ids, mod, pixels, index)
    keep = mod != PAD
    torch.testing.assert_close(out.logits_BTV[keep], dense[keep], atol=1e-5, rtol=1e-5)
    assert set(out.moe) == {1, 3}
    assert out.moe[1].router_tokens == {"vision": 8, "text": int((mod == TEXT).sum())}


def test_left_and_right_padding_give_the_same_logits():
    model = build_model(tiny(MOIIE), VOCAB, 0, seed=0).eval()
    model.upcycle()
    right = model(*batch(left_pad=False)).logits_BTV
    left = model(*batch(left_pad=True)).logits_BTV
    _, mod_r, _, _ = batch(False)
    _, mod_l, _, _ = batch(True)
    torch.testing.assert_close(left[mod_l != PAD], right[mod_r != PAD], atol=1e-5, rtol=1e-5)


def test_every_parameter_has_exactly_one_group_and_freezing_works():
    model = build_model(tiny(MOIIE), VOCAB, 0)
    model.upcycle()
    groups = parameter_groups(model)
    assert {g.split(".")[0] for g in groups} <= set(GROUPS)
    assert {"experts.vision", "experts.text", "experts.shared", "routers", "mlp"} <= set(groups)
    all_ids = [id(p) for members in groups.values() for _, p in members]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    counts = set_trainable(model, ["projector", "experts"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector") or ".mlp.pools." in n for n in trainable)
    assert set(counts) == {"projector", "experts.vision", "experts.text", "experts.shared"}


def test_activated_parameters_count_top_k_experts():
    model = build_model(tiny(MOIIE), VOCAB, 0)
    dense_total, dense_active = model.parameter_counts()
    assert dense_total == dense_active
    model.upcycle()
    total, active = model.parameter_counts()
    per_expert = 3 * 32 * 48
    assert total == dense_total + 2 * (6 - 1) * per_expert + 2 * 2 * 4 * 32  # 2 MoE layers, routers 2 x (4 x 32)
    assert active == dense_total + 2 * (2 - 1) * per_expert + 2 * 2 * 4 * 32


def test_asymoe_model_upcycles_close_to_dense_and_returns_its_losses():
    from test_asymoe import asymoe_cfg

    cfg = tiny(asymoe_cfg())
    cfg.lm.num_layers = 4
    model = build_model(cfg, VOCAB, 0, seed=0).eval()
    ids, mod, pixels, index = batch()
    context = mod != PAD
    context[:, -2:] = False  # the last two positions of the longest row are answers
    dense = model(ids, mod, pixels, index, context).logits_BTV
    model.upcycle()
    assert model.has_evidence_experts
    out = model(ids, mod, pixels, index, context)
    keep = mod != PAD
    error = (out.logits_BTV[keep] - dense[keep]).norm() / dense[keep].norm()
    assert error < 1e-3
    for layer in (1, 3):
        assert {"balance", "evd", "order"} <= set(out.moe[layer].losses)
        assert all(torch.isfinite(v) for v in out.moe[layer].losses.values())


def test_evidence_layers_deep_half_keeps_ep_experts_out_of_shallow_layers():
    from test_asymoe import asymoe_cfg

    cfg = tiny(asymoe_cfg())
    cfg.moe.evidence.layers = "deep_half"
    model = build_model(cfg, VOCAB, 0)
    model.upcycle()
    blocks = model.moe_blocks()
    assert "evidence" not in blocks[1].pools and "evidence" in blocks[3].pools
    assert len(blocks[1].reach("text")) == 3 and len(blocks[3].reach("text")) == 4


@pytest.mark.parametrize("variant", ["moiie", "asymoe"])
def test_parameter_counts_on_the_meta_device(variant):
    """The trainer counts parameters of the upcycled model before training, on the meta device (no memory)."""
    from test_asymoe import asymoe_cfg

    cfg = tiny(asymoe_cfg() if variant == "asymoe" else MOIIE)
    with torch.device("meta"):
        meta = build_model(cfg, VOCAB, 0)
        meta.upcycle()
        counted = meta.parameter_counts()
    real = build_model(cfg, VOCAB, 0)
    real.upcycle()
    assert counted == real.parameter_counts()


@pytest.mark.parametrize("variant", ["moiie", "asymoe"])
def test_upcycling_is_reproducible_from_its_generator(variant):
    """Routers, expert noise and the evidence experts' q/k/v come from the generator, not the global RNG, so a resumed
    or rebuilt stage model is the same model (exact resume depends on it) and runs repeat exactly."""
    from dataclasses import replace

    from test_asymoe import asymoe_cfg

    cfg = tiny(replace(MOIIE if variant == "moiie" else asymoe_cfg(), upcycle_noise_std=0.01))
    models = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model = build_model(cfg, VOCAB, 0, seed=0)
        model.upcycle(torch.Generator().manual_seed(7))
        models.append(model.state_dict())
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_grounding_probe_equals_the_attention_transformers_returns():
    """The probe's per-layer image attention mass, against the attention probabilities transformers' own Llama returns
    (``output_attentions``) on the same embeddings, positions and padding; sdpa models are probed in eager mode and
    left as they were."""
    from asymoe_train.data.batch import Batch
    from asymoe_train.data.conversation import IGNORE
    from asymoe_train.evaluation.probe import grounding_probe

    cfg = tiny(MOIIE)
    cfg.lm.attn_implementation = "sdpa"
    model = build_model(cfg, VOCAB, 0, seed=0).eval()
    ids, mod, pixels, index = batch()
    labels = torch.full_like(ids, IGNORE)
    labels[0, 10:12], labels[1, 7:9], labels[2, 6] = ids[0, 10:12], ids[1, 7:9], ids[2, 6]  # answers at the ends
    data = Batch(ids, labels, mod, pixels, index, mod != PAD, num_samples=3)
    before = model(**data.model_inputs()).logits_BTV
    probe = grounding_probe(model, [data])
    assert model.lm.config._attn_implementation == "sdpa"
    assert torch.equal(model(**data.model_inputs()).logits_BTV, before)

    model.lm.config._attn_implementation = "eager"
    keep = mod != PAD
    with torch.no_grad():
        attentions = model.lm.model(inputs_embeds=model.embed(ids, mod, pixels, index), attention_mask=keep.long(),
                                    position_ids=(keep.long().cumsum(-1) - 1).clamp_min(0),
                                    output_attentions=True).attentions
    predicts = torch.zeros_like(keep)
    predicts[:, :-1] = labels[:, 1:] != IGNORE
    expected = [(a.mean(1) * (mod == IMAGE)[:, None, :]).sum(-1)[predicts].mean().item() for a in attentions]
    assert probe["positions"] == int(predicts.sum()) == 5
    assert probe["image_mass_per_layer"] == pytest.approx(expected, abs=1e-6)
    assert all(0.0 < m < 1.0 for m in expected)  # the probed positions see the image and other tokens
