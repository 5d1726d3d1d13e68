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
from conftest import CHAT_SPECIALS, chat_tokenizer_dir, image_bytes, write_bpe_tokenizer
from PIL import Image

from asymoe_train.config.schema import DataConfig
from asymoe_train.data.conversation import IGNORE, ConversationEncoder, MalformedSample, turns
from asymoe_train.data.decode import SampleDecoder
from asymoe_train.data.pipeline import answer_balance_weights, eval_batches, train_loader
from asymoe_train.data.shards import ShardReader
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.modality import IMAGE, PAD, TEXT
from asymoe_train.training.losses import lm_loss_sum

NUM_IMAGE_TOKENS = 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return TextTokenizer(write_bpe_tokenizer(path, "USER: what color is the shape?\nASSISTANT: blue red circle yes no"))


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


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer(chat_tokenizer_dir(tmp_path_factory.mktemp("chat_tok")))


def test_chat_template_renders_the_conversation_and_supervises_only_answers(chat_tokenizer):
    tok = chat_tokenizer
    im_end = tok.encode("<|im_end|>")[0]
    assert tok.chat_template and tok.bos_id is None
    assert tok.eos_id == im_end  # the template's end of turn, not eos_token (<|endoftext|>): generation stops there
    assert tok.pad_id == tok.encode("<|endoftext|>")[0] and tok.image_id == tok.encode("<image>")[0]
    enc = ConversationEncoder(tok, "auto", NUM_IMAGE_TOKENS)
    assert enc.template_name == "chat"
    pairs = [("<image>\nwhat color is the shape?", "blue"), ("is it a circle?", "yes")]
    seq = enc.encode(pairs)

    # Expected, written out by hand: (text or image, supervised)
    pieces = [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", False),
        (None, False),
        ("\nwhat color is the shape?<|im_end|>\n<|im_start|>assistant\n", False),
        ("blue<|im_end|>", True),
        ("\n<|im_start|>user\nis it a circle?<|im_end|>\n<|im_start|>assistant\n", False),
        ("yes<|im_end|>", True),
        ("\n", False),
    ]
    ids, labels, modality = [], [], []
    for text, supervised in pieces:
        piece = [tok.image_id] * NUM_IMAGE_TOKENS if text is None else tok.encode(text)
        ids += piece
        labels += piece if supervised else [IGNORE] * len(piece)
        modality += [IMAGE if text is None else TEXT] * len(piece)
    assert seq.input_ids == ids and seq.labels == labels and seq.modality == modality
    assert [t for t in seq.labels if t != IGNORE] == tok.encode("blue") + [im_end] + tok.encode("yes") + [im_end]

    # The same ids as transformers' own rendering and tokenisation of the whole conversation, <image> expanded.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok.path, local_files_only=True)
    messages = [{"role": role, "content": text} for q, a in pairs for role, text in (("user", q), ("assistant", a))]
    whole = hf.encode(hf.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    expanded = [i for t in whole for i in ([t] * NUM_IMAGE_TOKENS if t == tok.image_id else [t])]
    assert seq.input_ids == expanded

    # A generation prompt ends with the assistant header of the last turn; the first turn alone is a prefix.
    prompt = enc.encode(pairs, with_last_answer=False)
    assert prompt.input_ids == ids[: len(ids) - len(tok.encode("yes<|im_end|>\n"))]
    header = tok.encode("<|im_start|>assistant\n")
    assert prompt.input_ids[-len(header):] == header and all(t == IGNORE for t in prompt.labels[-len(header) - 2:])
    first = enc.encode(pairs[:1])
    assert seq.input_ids[: len(first.input_ids)] == first.input_ids and first.labels == labels[: len(first.labels)]


def test_chat_template_through_the_pipeline(chat_tokenizer):
    """Split turns of a shard sample, each a one-turn chat whose answer and <|im_end|> are the supervised tokens."""
    decoder = SampleDecoder(ConversationEncoder(chat_tokenizer, "chat", NUM_IMAGE_TOKENS), 32, 96, True)
    batch = next(decoder.batches(iter([good_sample(0)]), images_per_batch=1, seqs_per_batch=0, prompt_only=False))
    im_end = chat_tokenizer.eos_id
    assert batch.answers == ["red", "yes", "circle"]
    for row, answer in enumerate(batch.answers):
        supervised = [t for t in batch.labels_BT[row].tolist() if t != IGNORE]
        assert supervised == chat_tokenizer.encode(answer) + [im_end]
        assert int((batch.modality_BT[row] == IMAGE).sum()) == NUM_IMAGE_TOKENS


def test_template_choice_and_its_errors(tmp_path, tokenizer, chat_tokenizer):
    # auto without a chat template (the demo's tokenizer.json) is plain, token for token
    pairs = [("<image>\nwhat color is the shape?", "blue")]
    auto = ConversationEncoder(tokenizer, "auto", NUM_IMAGE_TOKENS)
    assert auto.template_name == "plain"
    assert auto.encode(pairs) == ConversationEncoder(tokenizer, "plain", NUM_IMAGE_TOKENS).encode(pairs)
    # a named template wins over the tokenizer's chat template; eos is then the end-of-turn token
    plain = ConversationEncoder(chat_tokenizer, "plain", NUM_IMAGE_TOKENS).encode(pairs)
    assert plain.input_ids[:2] == chat_tokenizer.encode("USER:")[:2]  # no bos: this tokenizer has none
    assert [t for t in plain.labels if t != IGNORE] == chat_tokenizer.encode("blue") + [chat_tokenizer.eos_id]
    with pytest.raises(ValueError, match="data.template=chat but data.tokenizer"):
        ConversationEncoder(tokenizer, "chat", NUM_IMAGE_TOKENS)
    with pytest.raises(ValueError, match=r"data.template='vicuna' is unknown; expected one of \['auto', 'chat'"):
        ConversationEncoder(tokenizer, "vicuna", NUM_IMAGE_TOKENS)
    # a template that does not render conversations incrementally cannot be split into prompts and answers
    last_only = "{{ messages[-1]['content'] }}<|im_end|>"
    with pytest.raises(ValueError, match="cannot be used for training.*use data.template=plain"):
        ConversationEncoder(TextTokenizer(chat_tokenizer_dir(tmp_path / "last_only", last_only)), "auto", 1)
    # a tokenizer directory without <image>
    no_image = tmp_path / "no_image"
    chat_tokenizer_dir(no_image)
    write_bpe_tokenizer(no_image / "tokenizer.json", "user assistant", specials=CHAT_SPECIALS[:3])
    with pytest.raises(ValueError, match="has no '<image>' token; add it"):
        TextTokenizer(str(no_image))


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
    return {"__key__": f"s{i:04d}", "png": image_bytes(), "json": json.dumps({
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


def _no_loss(reason: str, count: int) -> None:
    raise AssertionError(f"{count} samples lost ({reason}) reading intact shards")


def _prefix_keys(spec, stream: int, position) -> list[str]:
    """Keys a logical stream yields from its start up to ``position`` (draw, taken)."""
    keys = []
    for draw in range(position[0] + 1):
        shard = [s["__key__"] for s in spec.shard_samples(stream, draw, ShardReader(_no_loss))]
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
        samples.append({"__key__": f"s{i}", "png": image_bytes(), "json": json.dumps({
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
    from asymoe_train.data.decode import dihedral

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
    placeholders = {"__key__": "two_placeholders", "png": image_bytes(), "json": json.dumps({"conversations": [
        {"from": "human", "value": "<image>\nq one"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nq two"}, {"from": "gpt", "value": "blue"}]}).encode()}
    files = {"__key__": "two_files", "png": image_bytes(), "1.png": image_bytes((0, 255, 0)),
             "json": json.dumps({"conversations": conversation(("q", "red"))}).encode()}
    good = {"__key__": "good", "png": image_bytes(), "json": json.dumps({"conversations": conversation(("q", "red"))}).encode()}
    encoder = ConversationEncoder(tokenizer, "plain", NUM_IMAGE_TOKENS)
    for split_turns in (False, True):
        decoder = SampleDecoder(encoder, 32, 96, split_turns)
        (batch,) = decoder.batches(iter([placeholders, files, good]), 10, 0, prompt_only=False)
        assert batch.keys == ["good"]
        assert batch.skipped == {"too_many_images": 2}


def test_answer_balance_weights_equalise_answers_within_each_group(tmp_path, tokenizer):
    # qtype "is there a circle?": 6 yes, 2 no; "what color?": 4 red, 4 blue (already balanced)
    samples = []
    for i in range(8):
        pairs = [("is there a circle?", "yes" if i < 6 else "no"), ("what color is the shape?", "red" if i < 4 else
                                                                    "blue")]
        samples.append({"__key__": f"s{i:04d}", "png": image_bytes(), "json": json.dumps({
            "conversations": conversation(*pairs), "qtype": ["circle?", "color?"]}).encode()})
    write_shards(tmp_path, samples)
    data = DataConfig(root=str(tmp_path), sources={"qa": "qa-*.tar"}, answer_balance="qtype", answer_balance_max=2.5)
    weights = answer_balance_weights(data, "qa-*.tar")
    # n_g / (K_g n_ga): yes 8 / (2 * 6), no 8 / (2 * 2) = 2, red and blue 1
    assert weights == {("circle?", "yes"): pytest.approx(8 / 12), ("circle?", "no"): 2.0,
                       ("color?", "red"): 1.0, ("color?", "blue"): 1.0}
    assert sum(weights[("circle?", a)] * n for a, n in (("yes", 6), ("no", 2))) == pytest.approx(8)  # group total
    assert answer_balance_weights(DataConfig(**{**data.__dict__, "answer_balance_max": 1.5}), "qa-*.tar")[
        ("circle?", "no")] == 1.5  # capped
    assert answer_balance_weights(DataConfig(**{**data.__dict__, "answer_balance": "family"}), "qa-*.tar") == {}

    decoder = SampleDecoder(ConversationEncoder(tokenizer, "plain", NUM_IMAGE_TOKENS), 32, 96, split_turns=True)
    decoder.answer_field, decoder.answer_weights = "qtype", weights
    batch = next(decoder.batches(iter(wds.DataPipeline(wds.SimpleShardList(sorted(
        str(p) for p in tmp_path.glob("qa-*.tar"))), wds.tarfile_to_samples())), 8, 0, prompt_only=False))
    expected = [weights[(m["qtype"], a)] for m, a in zip(batch.meta, batch.answers, strict=True)]
    assert batch.weight_B.tolist() == pytest.approx(expected)

    # the weighted L_lm: each sequence's token losses times its weight, over the unweighted token count
    logits = torch.randn(*batch.labels_BT.shape, tokenizer.vocab_size, generator=torch.Generator().manual_seed(0))
    weighted, count = lm_loss_sum(logits, batch.labels_BT, batch.weight_B)
    per_sequence = [lm_loss_sum(logits[b : b + 1], batch.labels_BT[b : b + 1])[0] for b in range(len(expected))]
    assert float(weighted) == pytest.approx(float(sum(w * s for w, s in zip(expected, per_sequence, strict=True))),
                                            rel=1e-5)
    assert count == lm_loss_sum(logits, batch.labels_BT)[1]


def test_question_prior_baseline_answers_from_training_priors_alone(tmp_path, tokenizer):
    """The blind baseline: the training turns' most common answer to the same question text, else the family's; it
    reads the turns in the order evaluation does, so its first N questions are the eval's first N."""
    from asymoe_train.data.pipeline import qa_turns, shard_files
    from asymoe_train.evaluation.vqa import question_prior_baseline

    samples = []
    for i in range(6):  # "is there a circle?" yes 4 of 6; "what color?" red 5 of 6
        pairs = [("is there a circle?", "yes" if i < 4 else "no"), ("what color is the shape?", "red" if i else "blue")]
        samples.append({"__key__": f"s{i:04d}", "png": image_bytes(), "json": json.dumps({
            "conversations": conversation(*pairs), "family": ["yes/no", "colour"]}).encode()})
    write_shards(tmp_path / "train", samples)
    tests = [{"__key__": "t0000", "png": image_bytes(), "json": json.dumps({
        "conversations": conversation(("Is there a circle?", "no"), ("is there a square?", "yes"),
                                      ("what color is the shape?", "red")),
        "family": ["yes/no", "yes/no", "colour"]}).encode()}]
    write_shards(tmp_path / "test", tests)
    train = qa_turns(shard_files(DataConfig(root=str(tmp_path / "train")), "qa-*.tar"))
    test = list(qa_turns(shard_files(DataConfig(root=str(tmp_path / "test")), "qa-*.tar")))
    assert [q for q, _, _ in test] == ["Is there a circle?", "is there a square?", "what color is the shape?"]
    # circle? -> yes (wrong); square? unseen -> the yes/no family's most common answer, yes (4 of 6; right); red
    report = question_prior_baseline(train, test)
    assert report["num_questions"] == 3 and report["accuracy"] == pytest.approx(2 / 3)
    assert report["breakdown"]["family/yes/no"] == {"accuracy": 0.5, "count": 2}
    assert [e["prediction"] for e in report["examples"]] == ["yes", "yes", "red"]
    train = qa_turns(shard_files(DataConfig(root=str(tmp_path / "train")), "qa-*.tar"))
    assert question_prior_baseline(train, test, max_questions=1)["num_questions"] == 1
