"""Conversation encoding, masking and the webdataset pipeline on shards the test writes itself."""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from asymoe_train.config.schema import DataConfig
from asymoe_train.data.conversation import IGNORE, ConversationEncoder, MalformedSample, turns
from asymoe_train.data.pipeline import SampleDecoder, eval_batches, train_loader
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.modality import IMAGE, PAD, TEXT

NUM_IMAGE_TOKENS = 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TextTokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["USER: what color is the shape?\nASSISTANT: blue red circle yes no"] * 10, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return TextTokenizer(str(path))


def png(color=(255, 0, 0), size=64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def conversation(*pairs):
    msgs = []
    for n, (q, a) in enumerate(pairs):
        msgs += [{"from": "human", "value": ("<image>\n" if n == 0 else "") + q}, {"from": "gpt", "value": a}]
    return msgs


def test_labels_cover_exactly_the_answer_tokens(tokenizer):
    enc = ConversationEncoder(tokenizer, "plain", NUM_IMAGE_TOKENS)
    seq = enc.encode([("<image>\nwhat color is the shape?", "blue")])
    answer = tokenizer.encode("blue") + [tokenizer.eos_id]
    supervised = [t for t in seq.labels if t != IGNORE]
    assert supervised == answer
    assert seq.input_ids[-len(answer):] == answer  # the supervised tokens are the last ones, in order
    assert seq.modality.count(IMAGE) == NUM_IMAGE_TOKENS
    image_positions = [i for i, m in enumerate(seq.modality) if m == IMAGE]
    assert all(seq.input_ids[i] == tokenizer.image_id for i in image_positions)
    assert all(seq.labels[i] == IGNORE for i in image_positions)
    assert tokenizer.decode([t for t, m in zip(seq.input_ids, seq.modality) if m == TEXT]).startswith("USER: ")
    prompt = enc.encode([("<image>\nwhat color is the shape?", "blue")], with_last_answer=False)
    assert prompt.input_ids == seq.input_ids[: -len(answer)]


def test_multi_turn_supervises_every_answer(tokenizer):
    enc = ConversationEncoder(tokenizer, "plain", NUM_IMAGE_TOKENS)
    seq = enc.encode([("<image>\nq one", "red"), ("q two", "circle")])
    expected = tokenizer.encode("red") + [tokenizer.eos_id] + tokenizer.encode("circle") + [tokenizer.eos_id]
    assert [t for t in seq.labels if t != IGNORE] == expected


def test_malformed_conversations_raise():
    with pytest.raises(MalformedSample):
        turns([{"from": "human", "value": "q"}])
    with pytest.raises(MalformedSample):
        turns([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}])


def write_shards(directory, samples, per_shard=3):
    os.makedirs(directory, exist_ok=True)
    with wds.ShardWriter(os.path.join(directory, "qa-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)


def good_sample(i):
    pairs = [("what color is the shape?", "red"), ("is there a circle?", "yes"), ("what is the red shape?", "circle")]
    return {"__key__": f"s{i:04d}", "png": png(), "json": json.dumps({
        "conversations": conversation(*pairs), "family": ["colour", "yes/no", "shape"],
        "answer": [a for _, a in pairs]}).encode()}


def test_pipeline_splits_turns_shares_images_and_skips_bad_samples(tmp_path, tokenizer):
    samples = [good_sample(i) for i in range(10)]
    samples[3]["png"] = b"not a png"  # unreadable image
    samples[6]["json"] = b"{broken"  # malformed json
    write_shards(tmp_path, samples)
    data = DataConfig(root=str(tmp_path), sources={"qa": "qa-*.tar"})
    decoder = SampleDecoder(ConversationEncoder(tokenizer, "plain", NUM_IMAGE_TOKENS), 32, 96, split_turns=True)
    batches = list(eval_batches(data, "qa-*.tar", decoder, questions_per_batch=6))
    assert sum(b.input_ids_BT.shape[0] for b in batches) == 8 * 3  # 8 good images x 3 turns
    assert sum(sum(b.skipped.values()) for b in batches) == 2
    first = batches[0]
    assert first.pixel_values_NCHW.shape[1:] == (3, 32, 32)  # resized to the tower's size
    assert first.image_index_B.tolist() == [0, 0, 0, 1, 1, 1]  # turns of one image share its row
    assert first.meta[0]["family"] == "colour" and first.answers[2] == "circle"
    # generation prompts are left-padded: the last position is real text for every row
    assert (first.modality_BT[:, -1] == TEXT).all()
    assert ((first.modality_BT == IMAGE).sum(1) == NUM_IMAGE_TOKENS).all()


def test_train_stream_is_endless_balanced_and_deterministic(tmp_path, tokenizer):
    write_shards(tmp_path, [good_sample(i) for i in range(7)])
    data = DataConfig(root=str(tmp_path), num_workers=0, shuffle_buffer=4)

    def first_batches(rank, n=6):
        decoder = SampleDecoder(ConversationEncoder(tokenizer, "plain", NUM_IMAGE_TOKENS), 32, 96, True)
        stream = iter(train_loader(data, "qa-*.tar", decoder, batch_size=4, seed=3, rank=rank, world_size=2))
        return [next(stream) for _ in range(n)]

    a, b = first_batches(0), first_batches(0)
    other = first_batches(1)
    assert all(x.num_samples == 4 for x in a)  # 6 batches from 7 samples: the stream resamples, never ends
    assert all(torch.equal(x.input_ids_BT, y.input_ids_BT) for x, y in zip(a, b))
    for batch in a:
        labels = batch.labels_BT
        assert ((labels != IGNORE) <= (batch.modality_BT == TEXT)).all()  # only text positions carry labels
        assert (batch.modality_BT[:, 0] != PAD).all()  # training batches are right-padded
    assert len(other) == len(a)


def test_split_stream_gives_each_rank_its_own_shards_and_loops(tmp_path, tokenizer):
    samples = [good_sample(i) for i in range(8)]
    for i, sample in enumerate(samples):  # a per-turn id field travels into the batch metadata
        record = json.loads(sample["json"])
        record["sid"] = [i] * 3
        sample["json"] = json.dumps(record).encode()
    write_shards(tmp_path, samples, per_shard=2)  # 4 shards
    data = DataConfig(root=str(tmp_path), num_workers=0, shuffle_buffer=1, resampled=False, num_streams=4)
    seen = {}
    for rank in (0, 1):
        decoder = SampleDecoder(ConversationEncoder(tokenizer, "plain", NUM_IMAGE_TOKENS), 32, 96, True)
        stream = iter(train_loader(data, "qa-*.tar", decoder, batch_size=1, seed=0, rank=rank, world_size=2))
        seen[rank] = [next(stream).meta[0]["sid"] for _ in range(8)]  # two epochs of 4 samples
    assert seen[0][:4] == seen[0][4:] and seen[1][:4] == seen[1][4:]  # the stream loops epoch after epoch
    assert set(seen[0][:4]).isdisjoint(seen[1][:4])
    assert sorted(seen[0][:4] + seen[1][:4]) == list(range(8))


def _prefix_keys(spec, stream: int, position) -> list[str]:
    """Keys a logical stream yields from its start up to ``position`` (draw, taken)."""
    keys = []
    for draw in range(position[0] + 1):
        shard = [s["__key__"] for s in spec.shard_samples(stream, draw, wds.reraise_exception)]
        keys += shard[: position[1]] if draw == position[0] else shard
    return keys


def test_train_stream_resumes_exactly_from_a_batch_position(tmp_path, tokenizer):
    write_shards(tmp_path, [good_sample(i) for i in range(11)], per_shard=3)
    data = DataConfig(root=str(tmp_path), num_workers=0, shuffle_buffer=2, num_streams=3, augment="dihedral")

    def batches(n, start=None):
        decoder = SampleDecoder(ConversationEncoder(tokenizer, "plain", NUM_IMAGE_TOKENS), 32, 96, True,
                                turn_caps={"yes/no": 1}, seed=5, augment="dihedral")
        stream = iter(train_loader(data, "qa-*.tar", decoder, batch_size=4, seed=2, start=start))
        return [next(stream) for _ in range(n)]

    run = batches(7)
    resumed = batches(4, start=run[2].positions)
    for a, b in zip(run[3:], resumed):
        assert a.keys == b.keys
        assert torch.equal(a.input_ids_BT, b.input_ids_BT)
        assert torch.equal(a.pixel_values_NCHW, b.pixel_values_NCHW)  # augmentation draws replay too
    assert len({tuple(b.keys) for b in run}) > 1


def test_stream_positions_carry_over_a_change_of_ranks(tmp_path, tokenizer):
    from asymoe_train.data.pipeline import StreamSpec

    write_shards(tmp_path, [good_sample(i) for i in range(10)], per_shard=2)
    data = DataConfig(root=str(tmp_path), num_workers=0, shuffle_buffer=3, num_streams=4)
    decoder = SampleDecoder(ConversationEncoder(tokenizer, "plain", NUM_IMAGE_TOKENS), 32, 96, True)
    consumed, positions = [], {}
    for rank in (0, 1):  # 2 ranks take 3 batches each, as a 2-rank run that checkpoints
        stream = iter(train_loader(data, "qa-*.tar", decoder, batch_size=3, seed=4, rank=rank, world_size=2))
        for _ in range(3):
            batch = next(stream)
            consumed += batch.keys
        assert set(batch.positions).isdisjoint(positions)  # ranks own disjoint streams
        positions.update(batch.positions)
    stream = iter(train_loader(data, "qa-*.tar", decoder, batch_size=5, seed=4, start=positions))
    for _ in range(4):  # ... resumed on 1 rank
        batch = next(stream)
        consumed += batch.keys
    spec = StreamSpec(tuple(sorted(str(p) for p in tmp_path.glob("qa-*.tar"))), 4, 4, True, 3)
    expected = [key for s, position in batch.positions.items() for key in _prefix_keys(spec, s, position)]
    assert Counter(consumed) == Counter(expected)  # every stream continued where it stood: none skipped or repeated


def test_cosine_schedule_warms_up_and_decays_to_the_floor():
    from asymoe_train.training.schedule import lr_factor

    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.55, abs=1e-6)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_turn_caps_keep_at_most_n_turns_of_a_family(tmp_path, tokenizer):
    samples = []
    for i in range(4):
        pairs = [("what color is the shape?", "red")] + [(f"is there a circle {k}?", "yes") for k in range(5)]
        samples.append({"__key__": f"s{i}", "png": png(), "json": json.dumps({
            "conversations": conversation(*pairs), "family": ["colour"] + ["yes/no"] * 5}).encode()})
    write_shards(tmp_path, samples)
    data = DataConfig(root=str(tmp_path), num_workers=0, shuffle_buffer=1)
    encoder = ConversationEncoder(tokenizer, "plain", NUM_IMAGE_TOKENS)
    decoder = SampleDecoder(encoder, 32, 96, True, turn_caps={"yes/no": 2}, seed=1)
    batch = next(iter(train_loader(data, "qa-*.tar", decoder, batch_size=4, seed=0)))
    assert batch.input_ids_BT.shape[0] == 4 * 3  # 1 colour + 2 of the 5 yes/no turns per image
    assert sorted(m["family"] for m in batch.meta).count("yes/no") == 8
    # evaluation never caps
    full = list(eval_batches(data, "qa-*.tar", SampleDecoder(encoder, 32, 96, True), questions_per_batch=100))
    assert sum(b.input_ids_BT.shape[0] for b in full) == 4 * 6


def test_dihedral_augmentation_covers_the_eight_symmetries_and_never_touches_eval(tmp_path, tokenizer):
    from asymoe_train.data.pipeline import dihedral

    image = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(3, 4, 4)
    views = {tuple(dihedral(image, k).flatten().tolist()) for k in range(8)}
    assert len(views) == 8 and tuple(image.flatten().tolist()) in views
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:4, :4] = 255  # a white corner: its position shows the transform
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    sample = {"__key__": "s0", "png": buf.getvalue(), "json": json.dumps({
        "conversations": conversation(("what color is the shape?", "red"))}).encode()}
    encoder = ConversationEncoder(tokenizer, "plain", NUM_IMAGE_TOKENS)
    decoder = SampleDecoder(encoder, 32, 96, True, seed=0, augment="dihedral")
    corners = set()
    for _ in range(40):
        image_t, _ = decoder.decode(sample, prompt_only=False)
        corners.add(tuple((image_t[0, [0, 0, -1, -1], [0, -1, 0, -1]] > 0).tolist()))
    assert len(corners) == 4  # the bright corner moved to every corner
    image_t, _ = decoder.decode(sample, prompt_only=True)  # generation prompts (eval) are never augmented
    assert image_t[0, 0, 0] > 0


def test_more_images_than_the_model_takes_are_skipped_and_counted(tmp_path, tokenizer):
    placeholders = {"__key__": "two_placeholders", "png": png(), "json": json.dumps({"conversations": [
        {"from": "human", "value": "<image>\nq one"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nq two"}, {"from": "gpt", "value": "blue"}]}).encode()}
    files = {"__key__": "two_files", "png": png(), "1.png": png((0, 255, 0)),
             "json": json.dumps({"conversations": conversation(("q", "red"))}).encode()}
    good = {"__key__": "good", "png": png(), "json": json.dumps({"conversations": conversation(("q", "red"))}).encode()}
    encoder = ConversationEncoder(tokenizer, "plain", NUM_IMAGE_TOKENS)
    for split_turns in (False, True):
        decoder = SampleDecoder(encoder, 32, 96, split_turns)
        (batch,) = decoder.batches(iter([placeholders, files, good]), 10, 0, prompt_only=False)
        assert batch.keys == ["good"]
        assert batch.skipped == {"too_many_images": 2}
