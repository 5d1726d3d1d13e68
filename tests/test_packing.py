"""Sequence packing (``data.packing``): a packed batch trains exactly as its unpacked twin. Per-sequence losses,
every gradient and the routing statistics of dense, vanilla, moiie and asymoe (evidence context and the order loss
included) agree within fp32 rounding; the collator packs first-fit and reports the padding it saved."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_efficiency import LOSSES, VOCAB, moe_config, tiny, upcycled

from asymoe_train.data.batch import Sequence, collate, pack_layout, pack_rows
from asymoe_train.data.conversation import IGNORE, Encoded
from asymoe_train.modality import IMAGE, TEXT
from asymoe_train.training.losses import host_metrics, lm_loss_sum, total_loss

IMAGE_TOKENS = 4  # the tiny model's tokens per image
LENGTHS = (14, 6, 11, 9, 5, 12)  # packed into rows of 20: [14, 6], [12, 5], [11, 9]


def sequences(lengths=LENGTHS, seed: int = 0) -> tuple[list[Sequence], list[torch.Tensor]]:
    """Sequences [bos, image x4 (every other one), prompt..., answer x3]; odd ones text-only; the third carries
    answer weight 2 (answer balancing)."""
    g = torch.Generator().manual_seed(seed)
    seqs, images = [], []
    for i, n in enumerate(lengths):
        ids = torch.randint(4, VOCAB, (n,), generator=g).tolist()
        modality = [TEXT] * n
        row = -1
        if i % 2 == 0:
            modality[1 : 1 + IMAGE_TOKENS] = [IMAGE] * IMAGE_TOKENS
            row = len(images)
            images.append(torch.randn(3, 32, 32, generator=g))
        labels = [IGNORE] * (n - 3) + ids[n - 3 :]
        seqs.append(Sequence(Encoded(ids, labels, modality), row, weight=2.0 if i == 2 else 1.0))
    return seqs, images


def test_pack_rows_is_first_fit_decreasing():
    assert pack_rows(list(LENGTHS), 20) == [[0, 1], [5, 4], [2, 3]]
    assert pack_rows([5, 5, 5], 10) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="data.max_length"):
        pack_rows([21], 20)
    # the layout takes the capacity with the fewest positions: 3 rows of 20 here, not 5 of 14 ...
    assert pack_layout(list(LENGTHS), 20) == pack_rows(list(LENGTHS), 20)
    # ... and never more than one row per sequence: two long ones and a short one fit two rows of the longest
    assert pack_layout([80, 75, 5], 128) == [[0], [1, 2]]


def test_packed_batch_layout_and_padding_shares():
    seqs, images = sequences()
    plain = collate(seqs, images, 3, {}, pad_id=0)
    packed = collate(seqs, images, 3, {}, pad_id=0, pack_length=20)
    assert plain.input_ids_BT.shape == (6, 14) and packed.input_ids_BT.shape == (3, 20)
    # row-major sequence numbering: row 0 holds sequences 0 and 1 (14 + 6 tokens), row 1 holds 5 then 4
    assert packed.segment_BT[0].tolist() == [0] * 14 + [1] * 6
    assert packed.segment_BT[1].tolist() == [2] * 12 + [3] * 5 + [-1] * 3
    assert packed.image_index_B.tolist() == [0, -1, -1, 2, 1, -1]  # sequences 0, 1, 5, 4, 2, 3 of the input
    assert packed.weight_B.tolist() == [1, 1, 1, 1, 2, 1]
    real = sum(LENGTHS)
    shares = packed.padding_shares()
    assert shares["data/padding_share"] == pytest.approx((60 - real) / 60)
    assert shares["data/padding_share_unpacked"] == pytest.approx((84 - real) / 84)
    assert plain.padding_shares() == {"data/padding_share": pytest.approx((84 - real) / 84)}
    assert ((packed.labels_BT != IGNORE).sum() == (plain.labels_BT != IGNORE).sum()).item()


def per_sequence_losses(out, batch, order: list[int]) -> torch.Tensor:
    """Each input sequence's summed answer-token loss, in input order (``order``: batch sequence -> input index)."""
    targets = batch.labels_BT[:, 1:]
    ce = torch.nn.functional.cross_entropy(out.logits_BTV[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE,
                                           reduction="none")
    if batch.segment_BT is None:
        seq = torch.arange(batch.labels_BT.shape[0])[:, None].expand_as(targets)
    else:
        seq = batch.segment_BT[:, 1:].clamp_min(0)
    sums = ce.new_zeros(len(order)).index_add_(0, seq.reshape(-1), ce.reshape(-1))
    result = ce.new_zeros(len(order))
    result[torch.tensor(order)] = sums
    return result


# Gradients of the hyperbolic pools' scalars (curvature, pre-scales) sum many large terms into a small one: in fp32
# they move by up to 10 % of their value with the order of summation, so they are compared in the fp64 run only
# (where they agree to 1e-6 like everything else).
SCALARS = ("curvature.log_c", "log_scale_E")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["dense", "vanilla", "moiie", "asymoe"])
def test_packed_batch_trains_as_the_unpacked_one(variant, dtype):
    model = upcycled(tiny(moe_config(variant))).to(dtype)
    rel = 1e-5 if dtype == torch.float32 else 1e-6  # fp64: the LM loss and routers still compute in fp32
    seqs, images = sequences()
    order = [i for row in pack_layout(list(LENGTHS), 20) for i in row]
    results = []
    for pack in (0, 20):
        run = copy.deepcopy(model)
        batch = collate(copy.deepcopy(seqs), images, 3, {}, pad_id=0, pack_length=pack)
        batch.pixel_values_NCHW = batch.pixel_values_NCHW.to(dtype)
        out = run(**batch.model_inputs())
        loss, metrics = total_loss(out, batch.labels_BT, LOSSES, 1, batch.weight_B, batch.segment_BT)
        metrics = host_metrics(metrics)
        loss.backward()
        grads = {n: p.grad for n, p in run.named_parameters() if p.grad is not None}
        counts = {(i, r): c for i, o in out.moe.items() for r, c in o.expert_counts.items()}
        tokens = {(i, r): int(c) for i, o in out.moe.items() for r, c in o.router_tokens.items()}
        losses = per_sequence_losses(out, batch, order if pack else list(range(len(seqs))))
        results.append((losses, metrics, grads, counts, tokens, {(i, k) for i, o in out.moe.items() for k in o.losses}))
    (l_plain, m_plain, g_plain, c_plain, t_plain, k_plain), (l_pack, m_pack, g_pack, c_pack, t_pack, k_pack) = results
    torch.testing.assert_close(l_pack, l_plain, rtol=rel, atol=rel / 10)
    for key, value in m_plain.items():
        assert m_pack[key] == pytest.approx(value, rel=rel, abs=rel / 100), key
    assert g_pack.keys() == g_plain.keys() and g_plain
    for name, grad in g_plain.items():
        if dtype == torch.float32 and name.endswith(SCALARS):
            continue
        # relative, with a floor for gradients that are zero in exact arithmetic (attention key biases: ~1e-10)
        assert (g_pack[name] - grad).abs().max() <= rel * grad.abs().max() + rel / 1000, name
    assert k_pack == k_plain
    assert c_pack.keys() == c_plain.keys()
    for key, counts in c_plain.items():
        assert torch.equal(c_pack[key], counts), key
    assert t_pack == t_plain
    if variant == "asymoe":
        assert {"order", "evd"} <= {k for _, k in k_plain}


def test_answer_weights_follow_packed_sequences():
    seqs, images = sequences()
    plain = collate(seqs, images, 3, {}, pad_id=0)
    packed = collate(seqs, images, 3, {}, pad_id=0, pack_length=20)
    g = torch.Generator().manual_seed(3)
    # logits that depend only on the current token: both layouts score each (token, next token) pair alike
    table = torch.randn(VOCAB, VOCAB, generator=g)
    loss_plain, n_plain = lm_loss_sum(table[plain.input_ids_BT], plain.labels_BT, plain.weight_B)
    loss_packed, n_packed = lm_loss_sum(table[packed.input_ids_BT], packed.labels_BT, packed.weight_B,
                                        packed.segment_BT)
    assert n_plain == n_packed
    torch.testing.assert_close(loss_packed, loss_plain)


@pytest.mark.slow
def test_packed_run_resumes_exactly_after_a_kill(tmp_path, demo_data):
    """The SIGKILL exact-resume check of tests/test_resume.py with data.packing=true: same losses at every step and
    the same samples, none skipped or seen twice; the packed run logs the padding it saved."""
    import test_resume

    test_resume.DATA_ROOT[:] = [demo_data]
    reference_dir = tmp_path / "uninterrupted"
    test_resume.train(reference_dir, "data.packing=true")
    reference = test_resume.history(reference_dir)
    run_dir = tmp_path / "run"
    test_resume.train_until(run_dir, lambda: 5 in test_resume.logged_steps(run_dir, "instruct"), "data.packing=true")
    test_resume.train(run_dir, "resume=auto", "data.packing=true")
    test_resume.assert_same_run(run_dir, reference)
    with open(reference_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    shares = [(r["data/padding_share"], r["data/padding_share_unpacked"]) for r in records if "data/padding_share" in r]
    assert shares and all(0 <= packed <= unpacked for packed, unpacked in shares)
    assert any(packed < unpacked for packed, unpacked in shares)


def test_flops_of_a_packed_batch_are_those_of_its_sequences():
    """The FLOP counter runs a packed batch as one row per sequence: the same count as the unpacked batch, so
    packing cannot inflate model FLOPs with the attention it masks between sequences."""
    from asymoe_train.data.batch import unpack_inputs
    from asymoe_train.observability.flops import train_flops_per_token

    model = upcycled(tiny(moe_config("vanilla")))
    seqs, images = sequences()
    plain = collate(copy.deepcopy(seqs), images, 3, {}, pad_id=0)
    packed = collate(copy.deepcopy(seqs), images, 3, {}, pad_id=0, pack_length=20)
    unpacked = unpack_inputs(packed.model_inputs())
    order = [i for row in pack_layout(list(LENGTHS), 20) for i in row]
    for name in ("input_ids_BT", "modality_BT", "context_BT"):
        assert torch.equal(unpacked[name], plain.model_inputs()[name][order]), name
    assert train_flops_per_token(model, packed.model_inputs()) == train_flops_per_token(model, plain.model_inputs())
