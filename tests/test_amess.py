"""The classification task mode (A-MESS): triplet loss, anchor fusion, description refresh, metrics, labels."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from test_asymoe import asymoe_cfg
from test_model import VOCAB, batch, tiny
from test_moe import variant

from asymoe_train.config.classify_schema import HeadConfig, SyncConfig
from asymoe_train.config.errors import ConfigError
from asymoe_train.config.labels import LabelSet, load_labels
from asymoe_train.config.moe_schema import MoEConfig
from asymoe_train.data.conversation import ConversationEncoder
from asymoe_train.data.decode import SampleDecoder
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.evaluation.classify import choose_threshold, f1_scores, split_report
from asymoe_train.modality import IMAGE, PAD, TEXT
from asymoe_train.models.fusion import AnchorCrossAttention, AnchorFusion, MeanFusion
from asymoe_train.models.vlm import build_model
from asymoe_train.training.sync import ClassifyObjective, cosine_distance, description_inputs, triplet_loss

S2 = math.sqrt(2.0)


# ------------------------------------------------------------------------------------------------- the triplet loss
def test_triplet_loss_equals_a_hand_computation():
    """Cosine distances by hand: z0=[1,0], z1=[0,1], z2=[1,1] against e0=[1,0], e1=[0,1], e2=[-1,0], e3=[1,1]."""
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    labels = torch.tensor([0, 2, 3])
    d = 1 - 1 / S2  # distance at 45 degrees
    assert torch.allclose(cosine_distance(z, e), torch.tensor([[0, 1, 2, d], [1, 0, 1, d], [d, d, 1 + 1 / S2, 0]]), atol=1e-6)
    m = 0.5
    # hardest: z0 pos 0 vs e3 (d); z1 pos 1 (e2) vs e1 (0); z2 pos 0 vs e0/e1 (d)
    hardest = (max(0, 0 - d + m) + max(0, 1 - 0 + m) + max(0, 0 - d + m)) / 3
    assert triplet_loss(z, e, labels, m, "hardest").item() == pytest.approx(hardest, abs=1e-6)
    every = (sum(max(0, 0 - x + m) for x in (1, 2, d)) / 3 + sum(max(0, 1 - x + m) for x in (1, 0, d)) / 3
             + sum(max(0, 0 - x + m) for x in (d, d, 1 + 1 / S2)) / 3) / 3
    assert triplet_loss(z, e, labels, m, "all").item() == pytest.approx(every, abs=1e-6)
    # cosine: the scale of z and of the descriptions does not matter; margin 0 leaves only violated triplets
    assert triplet_loss(3 * z, 0.5 * e, labels, m).item() == pytest.approx(hardest, abs=1e-6)
    assert triplet_loss(z, e, labels, 0.0).item() == pytest.approx(1 / 3, abs=1e-6)


@pytest.mark.parametrize("negatives", ["hardest", "all"])
def test_triplet_loss_equals_a_per_sample_loop(negatives):
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(9, 6, generator=g), torch.randn(5, 6, generator=g)
    labels = torch.randint(0, 5, (9,), generator=g)
    terms = []
    for b in range(9):
        d = [1 - F.cosine_similarity(z[b], e[c], dim=0).item() for c in range(5)]
        others = [d[c] for c in range(5) if c != labels[b]]
        pos = d[labels[b]]
        if negatives == "hardest":
            terms.append(max(0.0, pos - min(others) + 0.3))
        else:
            terms.append(sum(max(0.0, pos - x + 0.3) for x in others) / len(others))
    assert triplet_loss(z, e, labels, 0.3, negatives).item() == pytest.approx(sum(terms) / 9, abs=1e-5)


# ---------------------------------------------------------------------------------------------------- anchor fusion
def fusion_inputs(seed: int = 0):
    """Rows: left-padded with image + text, right-padded with image + text, text only (no image token)."""
    g = torch.Generator().manual_seed(seed)
    modality = torch.full((3, 10), PAD)
    modality[0, 3:] = TEXT
    modality[0, 4:8] = IMAGE
    modality[1, :7] = TEXT
    modality[1, 1:5] = IMAGE
    modality[2, :5] = TEXT
    return torch.randn(3, 10, 16, generator=g), modality


def reference_anchor_attention(attend: AnchorCrossAttention, h_BTD, allowed_BT):
    """Per row, torch's scaled_dot_product_attention over the allowed positions only; the output bias for none."""
    b, t, d = h_BTD.shape
    heads, k = attend.num_heads, attend.anchors_KD.shape[0]
    rows = []
    for row in range(b):
        keep = allowed_BT[row].nonzero().squeeze(-1)
        if len(keep) == 0:
            rows.append(attend.out.bias.expand(k, d))
            continue
        key, value = attend.key_value(h_BTD[row, keep]).split(d, dim=-1)
        q = attend.query(attend.anchors_KD).reshape(k, heads, -1).transpose(0, 1)
        out = F.scaled_dot_product_attention(q, key.reshape(-1, heads, d // heads).transpose(0, 1),
                                             value.reshape(-1, heads, d // heads).transpose(0, 1))
        rows.append(attend.out(out.transpose(0, 1).reshape(k, d)))
    return torch.stack(rows)


@pytest.mark.parametrize("combine", ["concat", "attention"])
def test_anchor_fusion_shapes_masking_and_reference(combine):
    torch.manual_seed(0)
    fusion = AnchorFusion(hidden=16, embed_dim=8, num_anchors=3, num_heads=4, combine=combine)
    h, modality = fusion_inputs()
    z = fusion(h, modality)
    assert z.shape == (3, 8) and torch.isfinite(z).all()
    for attend, code in zip(fusion.attend, (IMAGE, TEXT)):
        allowed = modality == code
        weights = attend.weights(h, allowed)
        assert weights.shape == (3, 4, 3, 10)
        assert (weights[~allowed[:, None, None, :].expand_as(weights)] == 0).all()  # never attended
        sums = weights.sum(-1)
        assert torch.allclose(sums[allowed.any(-1)], torch.ones_like(sums[allowed.any(-1)]))
        assert (sums[~allowed.any(-1)] == 0).all()  # the text-only row has no image token to attend to
        torch.testing.assert_close(attend(h, allowed), reference_anchor_attention(attend, h, allowed))
    # whatever padding holds changes nothing, exactly
    noisy = h.clone()
    noisy[modality == PAD] = 1e4 * torch.randn(int((modality == PAD).sum()), 16)
    assert torch.equal(fusion(noisy, modality), z)


def test_mean_fusion_is_the_mean_over_real_positions():
    torch.manual_seed(0)
    fusion = MeanFusion(16, 8)
    h, modality = fusion_inputs()
    expected = torch.stack([fusion.proj(h[b, modality[b] != PAD].mean(0)) for b in range(3)])
    torch.testing.assert_close(fusion(h, modality), expected)
    noisy = h.clone()
    noisy[modality == PAD] = 1e4
    assert torch.equal(fusion(noisy, modality), fusion(h, modality))


def head_model(moe: MoEConfig, fusion: str = "anchors", num_classes: int = 5):
    cfg = replace(tiny(moe), fusion=fusion, head=HeadConfig(num_classes=num_classes, num_anchors=2, num_heads=4))
    return build_model(cfg, VOCAB, 0, seed=0)


@pytest.mark.parametrize("name", ["dense", "vanilla", "modality", "moiie", "asymoe"])
def test_classify_forward_works_with_every_variant_and_padding_changes_nothing(name):
    moe = {"dense": MoEConfig(), "asymoe": asymoe_cfg()}.get(name) or variant(name)
    model = head_model(moe)
    model.upcycle()
    model.eval()
    ids, mod, pixels, index = batch()
    context = mod != PAD
    out = model(ids, mod, pixels, index, context, classify=True)
    assert out.logits_BTV is None and out.head.z_BZ.shape == (3, 32) and out.head.logits_BC.shape == (3, 5)
    assert out.head.descriptions_CZ.shape == (5, 32)
    other = ids.masked_fill(mod == PAD, 7)  # other token ids at the padding positions
    again = model(other, mod, pixels, index, context, classify=True)
    torch.testing.assert_close(again.head.z_BZ, out.head.z_BZ, rtol=0, atol=1e-6)
    # left padding instead of right: the same samples, the same z
    ids_l, mod_l, _, _ = batch(left_pad=True)
    left = model(ids_l, mod_l, pixels, index, mod_l != PAD, classify=True)
    torch.testing.assert_close(left.head.z_BZ, out.head.z_BZ, rtol=1e-5, atol=1e-5)
    # the cross-entropy's gradients reach the fusion and classifier and, through the fused tokens, the experts
    model.train()
    loss = F.cross_entropy(model(ids, mod, pixels, index, context, classify=True).head.logits_BC, torch.arange(3))
    loss.backward()
    head = model.head
    assert all(p.grad is not None for p in [*head.fusion.parameters(), *head.classifier.parameters()])
    if model.moe_blocks():
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for block in model.moe_blocks().values() for p in block.pools.parameters())


# ------------------------------------------------------------------------------------------ descriptions' refresh
LABELS = LabelSet(names=("red", "blue", "circle", "teal"),
                  descriptions=("the colour of fire", "the colour of the sky on a clear day", "a round shape", ""),
                  out_of_scope=(False, False, False, True))


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return TextTokenizer(f"{demo_data}/tokenizer.json")


@pytest.mark.parametrize("refresh_steps,encoded_at", [(2, [0, 2, 4]), (0, [0])])
def test_descriptions_are_encoded_once_per_refresh(tokenizer, refresh_steps, encoded_at):
    model = build_model(replace(tiny(variant("vanilla")), head=HeadConfig(num_classes=3)), tokenizer.vocab_size,
                        tokenizer.pad_id, seed=0)
    model.upcycle()
    objective = ClassifyObjective(model, LABELS, tokenizer, SyncConfig(refresh_steps=refresh_steps), weight=1.0)
    calls = []

    def forward(**inputs):
        calls.append(inputs["input_ids_BT"].shape[0])
        return model(**inputs)

    refreshed = []
    for step in range(6):
        before = model.head.descriptions_CD.clone()
        for _micro in range(3):  # gradient accumulation: one refresh per optimizer step at most
            objective.refresh(forward, step)
        if not torch.equal(before, model.head.descriptions_CD):
            refreshed.append(step)
            # each description's embedding equals the mean of its own final hidden states, encoded alone
            for c, text in enumerate(LABELS.class_descriptions):
                ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(text)]])
                mod = torch.full_like(ids, TEXT)
                with torch.no_grad():
                    alone = model.eval()(ids, mod, torch.zeros(0, 3, 1, 1), torch.tensor([-1]), mod != PAD,
                                         classify=True).hidden_BTD[0].mean(0)
                torch.testing.assert_close(model.head.descriptions_CD[c], alone, rtol=1e-4, atol=1e-5)
            model.train()
        with torch.no_grad():  # the weights move between steps, so a refresh changes the encodings
            model.lm.model.embed_tokens.weight.add_(0.01)
    assert refreshed == encoded_at
    assert objective.num_encodings == len(encoded_at) and calls == [3] * len(encoded_at)  # one forward, all of them
    assert model.training  # encoding ran in eval mode and restored the mode


def test_description_inputs_are_the_in_scope_descriptions(tokenizer):
    inputs = description_inputs(LABELS, tokenizer)
    assert inputs["input_ids_BT"].shape[0] == 3 and (inputs["image_index_B"] == -1).all()
    for c, text in enumerate(LABELS.class_descriptions):
        n = int((inputs["modality_BT"][c] == TEXT).sum())
        assert inputs["input_ids_BT"][c, :n].tolist() == [tokenizer.bos_id, *tokenizer.encode(text)]


# ------------------------------------------------------------------------------------------------------- metrics
def test_f1_scores_equal_a_hand_computation():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    # class 0: tp 2, support 3, predicted 2 -> 0.8; class 1: tp 1, 2, 2 -> 0.5; class 2: tp 1, 1, 2 -> 2/3
    f1 = f1_scores(labels, preds, 3)
    assert f1["per_class"] == pytest.approx([0.8, 0.5, 2 / 3])
    assert f1["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert f1["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)


def test_out_of_scope_threshold_is_chosen_on_validation_and_reported():
    # two classes; out-of-scope samples (-1) have low description scores, in-scope ones high, except one
    outputs = {"labels": [0, 1, 0, 1, -1, -1], "predictions": [0, 1, 1, 1, 0, 1],
               "description": [0.9, 0.8, 0.7, 0.2, 0.1, 0.3], "confidence": [0.9] * 6,
               "meta": [{"family": "f"}] * 6, "num_samples": 6, "skipped": {}}
    # (C+1)-class macro-F1 (classes 0, 1, out-of-scope) of the candidate thresholds, by hand:
    #   none rejected 0.389; < 0.2 rejects sample 4: (2/3 + 2/3 + 2/3) / 3 = 0.667; < 0.3 rejects 3, 4: 0.522;
    #   < 0.7 rejects 3, 4, 5: (2/3 + 1/2 + 4/5) / 3 = 0.656; higher thresholds reject in-scope samples 0-2 too
    assert choose_threshold(outputs, "description", 2) == pytest.approx(0.2)
    labels = LabelSet(("a", "b", "c"), ("x", "y", ""), (False, False, True))
    report = split_report(outputs, labels, 0.7, "description")
    assert report["num_questions"] == 4 and report["num_out_of_scope"] == 2
    assert report["accuracy"] == pytest.approx(3 / 4)  # closed set: in-scope samples, no rejection
    open_set = report["open_set"]
    # predicted out-of-scope: samples 3 (in-scope), 4, 5 -> precision 2/3, recall 1 -> F1 0.8
    assert open_set["oos_f1"] == pytest.approx(0.8) and open_set["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0.8) / 3)
    assert open_set["in_scope_accuracy"] == pytest.approx(2 / 4)


# -------------------------------------------------------------------------------------------------- labels and data
def test_labels_yaml_and_its_errors(tmp_path):
    shipped = load_labels("data_recipes/labels/easy_vqa.yaml")
    assert len(shipped.names) == 13 and set(shipped.names) - set(shipped.classes) == {"triangle", "teal"}
    assert shipped.index("Circle ") == shipped.classes.index("circle") and shipped.index("teal") == -1
    assert shipped.index("purple") is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels:\n  - name: a\n    description: x\n  - name: b\n")
    with pytest.raises(ConfigError, match="'b' has no `description`"):
        load_labels(str(bad))
    bad.write_text("labels:\n  - name: a\n    description: x\n  - name: A\n    description: y\n")
    with pytest.raises(ConfigError, match="more than once"):
        load_labels(str(bad))


def test_decoder_labels_turns_and_leaves_out_of_scope_out_of_training(tokenizer):
    from conftest import image_bytes

    encoder = ConversationEncoder(tokenizer, "plain", 4)
    record = {"conversations": [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "red"},
                                {"from": "human", "value": "what colour again?"}, {"from": "gpt", "value": "teal"},
                                {"from": "human", "value": "what is it?"}, {"from": "gpt", "value": "purple"}]}
    sample = {"png": image_bytes(), "json": json.dumps(record)}
    for prompt_only, expected in ((False, [0]), (True, [0, -1])):
        decoder = SampleDecoder(encoder, 64, 96, split_turns=True)
        decoder.labels = LABELS
        _, sequences = decoder.decode(dict(sample), prompt_only)
        assert [s.label for s in sequences] == expected
        assert decoder.take_skipped() == {"unknown_label": 1}
        assert decoder.out_of_scope_dropped == (0 if prompt_only else 1)
        assert all(all(x == -100 for x in s.encoded.labels) for s in sequences)  # prompts: no answer tokens


def test_describe_labels_writes_descriptions_with_a_local_lm_only(tmp_path):
    """A tiny random Llama saved locally (with a chat-template tokenizer) describes the labels a YAML lacks; a path
    without a checkpoint is refused, nothing is downloaded."""
    from conftest import chat_tokenizer_dir, load_recipe, unload_recipe
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    lm_dir = chat_tokenizer_dir(tmp_path / "lm")
    vocab = len(PreTrainedTokenizerFast.from_pretrained(lm_dir))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(lm_dir)
    given = tmp_path / "in.yaml"
    given.write_text("labels:\n  - name: circle\n  - name: red\n    description: kept as written\n"
                     "  - name: teal\n    out_of_scope: true\n")
    script = load_recipe("describe_labels")
    try:
        out = tmp_path / "labels.yaml"
        assert script.main(["--lm", str(lm_dir), "--labels", str(given), "--out", str(out),
                            "--max-new-tokens", "6"]) == 0
        labels = load_labels(str(out))
        assert labels.names == ("circle", "red", "teal") and labels.out_of_scope == (False, False, True)
        assert labels.descriptions[1] == "kept as written" and labels.descriptions[0] and labels.descriptions[2]
        with pytest.raises(SystemExit, match="not a local Hugging Face checkpoint"):
            script.main(["--lm", str(tmp_path / "missing"), "--names", "a", "b", "--out", str(out)])
    finally:
        unload_recipe(script)


@pytest.mark.parametrize("overrides,message", [
    (["data.labels="], "needs data.labels"),
    (["curriculum.stages.classify.trainable=[projector]"], "lacks 'head'"),
    (["curriculum.stages.align.losses.sync=0.5"], "curriculum.stages.align.losses.sync=0.5"),
    (["data.packing=true"], "data.packing=true with a classify stage"),
    (["data.split_turns=false"], "data.split_turns=false"),
    (["classify.oos_split=val"], "classify.oos_split='val' is not in data.eval_sources"),
    (["model.head.num_heads=3"], "model.head.num_heads=3 does not divide"),
    (["data.labels=missing.yaml"], "missing.yaml does not exist"),
    (["eval.every_steps=10"], "eval.every_steps=10 evaluates generative stages only"),
])
def test_classify_config_mistakes_fail_at_start_naming_the_key(overrides, message, demo_data):
    from test_config import load

    from asymoe_train.config import validate

    validate(load(demo_data, "experiment=amess_demo"))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        validate(load(demo_data, "experiment=amess_demo", *overrides))


def test_description_embeddings_are_centred_and_scaled_before_projection():
    """What every description shares is removed and each has unit RMS: adding one vector to all of them, or scaling
    them, changes no projected description."""
    from asymoe_train.models.fusion import ClassifyHead

    torch.manual_seed(0)
    head = ClassifyHead(HeadConfig(num_classes=4), "mean", hidden=16)
    head.descriptions_CD.copy_(torch.randn(4, 16))
    h, modality = fusion_inputs()
    out = head(h, modality)
    centred = head.descriptions_CD - head.descriptions_CD.mean(0)
    expected = head.describe(centred / centred.pow(2).mean(-1, keepdim=True).sqrt())
    torch.testing.assert_close(out.descriptions_CZ, expected)
    head.descriptions_CD.add_(5 * torch.randn(16)).mul_(3.0)
    torch.testing.assert_close(head(h, modality).descriptions_CZ, out.descriptions_CZ, rtol=1e-5, atol=1e-5)
