"""Export and inference: an exported stage loads in plain PyTorch (no DeepSpeed, no process group), reproduces the
training model's logits, and answers questions through the eval pipeline's prompt and greedy decoding."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest
import torch
from conftest import chat_tokenizer_dir
from omegaconf import OmegaConf

import asymoe_train
from asymoe_train.checkpoint.weights import WEIGHTS, save_weights, stage_dir
from asymoe_train.config import validate
from asymoe_train.config.derive import image_tokens_per_image
from asymoe_train.config.moe_schema import MoEConfig
from asymoe_train.config.schema import (
    CurriculumConfig,
    DataConfig,
    LMConfig,
    LoggerConfig,
    ModelConfig,
    StageConfig,
    TrainConfig,
    VisionConfig,
)
from asymoe_train.data.conversation import ConversationEncoder
from asymoe_train.data.decode import SampleDecoder
from asymoe_train.data.pipeline import eval_batches
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.evaluation.generate import generate, prompt_batch
from asymoe_train.evaluation.vqa import greedy_generate
from asymoe_train.export import export
from asymoe_train.models.vlm import build_model
from asymoe_train.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "what is the shape in the image?"


def run_config(variant: str, data_root: str, run_dir: str, tokenizer: str = "tokenizer.json") -> TrainConfig:
    """A tiny model of a conf/model/moe variant, in the two-stage curriculum (instruct upcycles)."""
    moe = OmegaConf.merge(OmegaConf.structured(MoEConfig), OmegaConf.load(f"{ROOT}/conf/model/moe/{variant}.yaml"))
    model = ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                            intermediate_size=64, merge=2),
        lm=LMConfig(hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=48,
                    attn_implementation="eager"),
        moe=OmegaConf.to_object(moe),
    )
    stage = {"source": "qa", "steps": 1, "trainable": ["projector"]}
    cfg = TrainConfig(
        experiment="test", seed=3, run_dir=run_dir, model=model,
        data=DataConfig(root=data_root, tokenizer=tokenizer, sources={"qa": "qa-train-*.tar"},
                        eval_sources={"test": "qa-test-*.tar"}),
        curriculum=CurriculumConfig(stages={"align": StageConfig(**stage),
                                            "instruct": StageConfig(**stage, upcycle=True)}),
        logger=LoggerConfig(mode="disabled", progress=False),
    )
    validate(cfg)
    return cfg


def save_stage_weights(model: torch.nn.Module, run_dir: str, stage: str) -> None:
    """The consolidated weights of a finished stage where the trainer leaves them, checkpoints/<stage>."""
    os.makedirs(stage_dir(run_dir, stage), exist_ok=True)
    save_weights(model, os.path.join(stage_dir(run_dir, stage), WEIGHTS))


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every weight away from its initialisation, so a tensor the loader failed to fill would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def fake_run(variant: str, data_root: str, run_dir: str, tokenizer: str = "tokenizer.json"):
    """A finished two-stage run as the trainer leaves it: config.yaml, and each stage's model built by
    ``Trainer.build_stage_model`` (perturbed as if trained) and saved as consolidated weights.
    Returns the config, tokenizer and each stage's model."""
    cfg = run_config(variant, data_root, run_dir, tokenizer)
    os.makedirs(run_dir, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), os.path.join(run_dir, "config.yaml"))
    trainer = Trainer(cfg)
    trainer.logger.close()
    models = {}
    for index, stage in enumerate(cfg.curriculum.stages):
        models[stage] = trainer.build_stage_model(index)  # the previous stage's weights, upcycled by instruct
        perturb(models[stage], index)
        save_stage_weights(models[stage], run_dir, stage)
        models[stage].eval()
    return cfg, trainer.tokenizer, models


def eval_batch(cfg: TrainConfig, tok: TextTokenizer, num_questions: int = 6):
    encoder = ConversationEncoder(tok, cfg.data.template, image_tokens_per_image(cfg.model.vision))
    decoder = SampleDecoder(encoder, cfg.model.vision.image_size, cfg.data.max_length, split_turns=True)
    return next(iter(eval_batches(cfg.data, "qa-test-*.tar", decoder, num_questions, num_questions)))


def first_test_sample(data_root: str) -> tuple[bytes, str]:
    """The first image of the test shards and its first question."""
    import json

    with tarfile.open(os.path.join(data_root, "qa-test-000000.tar")) as tar:
        members = {m.name: m for m in tar.getmembers()}
        key = min(name.rsplit(".", 1)[0] for name in members)
        image = tar.extractfile(members[f"{key}.png"]).read()
        record = json.loads(tar.extractfile(members[f"{key}.json"]).read())
    return image, record["conversations"][0]["value"]


@pytest.fixture(scope="module")
def exported(demo_data, tmp_path_factory):
    """An exported moiie run: (export dir, its run config)."""
    run_dir = str(tmp_path_factory.mktemp("run"))
    cfg, _, _ = fake_run("moiie", demo_data, run_dir)
    return export(run_dir), cfg


@pytest.mark.parametrize("variant", ["dense", "moiie", "asymoe", "asymoe_paper"])
def test_exported_model_reproduces_the_training_model(variant, demo_data, tmp_path):
    run_dir = str(tmp_path / "run")
    cfg, tok, trained = fake_run(variant, demo_data, run_dir)
    out = export(run_dir)  # default: the last finished stage
    assert out == os.path.join(run_dir, "export")
    assert sorted(os.listdir(out)) == ["config.yaml", "manifest.json", "model.safetensors", "tokenizer.json"]
    model, tokenizer, meta = asymoe_train.load_pretrained(out)
    assert meta.stage == "instruct" and meta.upcycled == (variant != "dense") == model.is_upcycled
    assert meta.template == "plain" and meta.image_size == 32 and meta.max_length == cfg.data.max_length
    assert not model.training and tokenizer.vocab_size == tok.vocab_size
    batch = eval_batch(cfg, tok)  # a real, left-padded batch; carries context_BT for the evidence experts
    with torch.no_grad():
        expected = trained["instruct"](**batch.model_inputs()).logits_BTV
        got = model(**batch.model_inputs()).logits_BTV
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_a_run_with_a_chat_template_exports_its_tokenizer_directory(demo_data, tmp_path):
    """data.tokenizer = a Hugging Face tokenizer directory with a chat template: the run trains on chat-formatted
    text, the export carries the directory and the resolved template, and loads and answers the same way."""
    run_dir = str(tmp_path / "run")
    cfg, tok, trained = fake_run("moiie", demo_data, run_dir, chat_tokenizer_dir(tmp_path / "chat_tok"))
    assert cfg.data.template == "auto" and tok.chat_template
    out = export(run_dir)
    assert sorted(os.listdir(out)) == ["config.yaml", "manifest.json", "model.safetensors", "tokenizer"]
    assert sorted(os.listdir(os.path.join(out, "tokenizer"))) == ["tokenizer.json", "tokenizer_config.json"]
    model, tokenizer, meta = asymoe_train.load_pretrained(out)
    assert meta.template == "chat" and meta.tokenizer == "tokenizer" and tokenizer.eos_id == tok.eos_id
    batch = eval_batch(cfg, tok)
    prompt = tok.decode(batch.input_ids_BT[0].tolist())
    assert "You are a helpful assistant." in prompt and prompt.endswith("assistant\n")  # the chat template's
    with torch.no_grad():
        expected = trained["instruct"](**batch.model_inputs()).logits_BTV
        got = model(**batch.model_inputs()).logits_BTV
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    image, question = first_test_sample(demo_data)
    answer = generate(model, tokenizer, meta, image, question, max_new_tokens=3)
    assert answer == greedy_generate(trained["instruct"], prompt_batch(image, question, tok, meta), tok, 3)[0]


def test_an_earlier_stage_exports_before_upcycling(demo_data, tmp_path):
    run_dir = str(tmp_path / "run")
    cfg, tok, trained = fake_run("moiie", demo_data, run_dir)
    out = export(run_dir, stage="align", out=str(tmp_path / "align"))
    model, _, meta = asymoe_train.load_pretrained(out)
    assert meta.stage == "align" and not meta.upcycled and not model.is_upcycled
    batch = eval_batch(cfg, tok, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch.model_inputs()).logits_BTV,
                                   trained["align"](**batch.model_inputs()).logits_BTV, atol=1e-6, rtol=0)


def test_export_errors_name_the_missing_file_and_what_to_run(demo_data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.yaml does not exist.*asymoe-train"):
        export(str(tmp_path))
    run_dir = str(tmp_path / "run")
    cfg = run_config("moiie", demo_data, run_dir)
    os.makedirs(run_dir)
    OmegaConf.save(OmegaConf.structured(cfg), os.path.join(run_dir, "config.yaml"))
    with pytest.raises(FileNotFoundError, match=r"no stage .* has finished.*align/model\.safetensors.*asymoe-train "
                                                r"experiment=test"):
        export(run_dir)
    tok = TextTokenizer(os.path.join(demo_data, "tokenizer.json"))
    save_stage_weights(build_model(cfg.model, tok.vocab_size, tok.pad_id), run_dir, "align")
    with pytest.raises(FileNotFoundError, match=r"instruct/model\.safetensors does not exist.*--stage align"):
        export(run_dir, stage="instruct")
    with pytest.raises(ValueError, match=r"'finetune' is not a stage.*\['align', 'instruct'\]"):
        export(run_dir, stage="finetune")
    with pytest.raises(FileNotFoundError, match=r"config\.yaml does not exist.*asymoe-train export"):
        asymoe_train.load_pretrained(str(tmp_path / "nowhere"))


def test_load_pretrained_needs_no_deepspeed_and_no_process_group(exported):
    out, _ = exported
    code = (
        "import sys, asymoe_train\n"
        "assert 'torch' not in sys.modules, 'import asymoe_train should stay cheap'\n"
        f"model, tokenizer, meta = asymoe_train.load_pretrained({out!r})\n"
        "import torch.distributed as dist\n"
        "assert 'deepspeed' not in sys.modules, sorted(m for m in sys.modules if 'deepspeed' in m)\n"
        "assert not dist.is_initialized()\n"
        "print('ok', type(model).__name__, model.training)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "VisionLanguageModel", "False"]


def test_generate_matches_greedy_generate_on_the_eval_batch(exported, demo_data):
    out, cfg = exported
    model, tok, meta = asymoe_train.load_pretrained(out)
    image, question = first_test_sample(demo_data)
    batch = eval_batch(cfg, tok, num_questions=1)  # the first question of the first test image
    prompt = prompt_batch(image, question, tok, meta)
    for name in ("input_ids_BT", "modality_BT", "context_BT", "image_index_B", "pixel_values_NCHW"):
        assert torch.equal(getattr(prompt, name), getattr(batch, name)), name
    expected = greedy_generate(model, batch, tok, max_new_tokens=4)
    assert asymoe_train.generate(model, tok, meta, image, question, max_new_tokens=4) == expected[0]


def test_generate_cli_prints_the_answer(exported, demo_data, tmp_path):
    out, _ = exported
    image, _ = first_test_sample(demo_data)
    path = tmp_path / "image.png"
    path.write_bytes(image)
    cmd = [sys.executable, "-m", "asymoe_train.cli", "generate", out, "--image", str(path), "--question", QUESTION,
           "--max-new-tokens", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tok, meta = asymoe_train.load_pretrained(out)
    assert proc.stdout.splitlines() == [generate(model, tok, meta, str(path), QUESTION, max_new_tokens=3)]


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "asymoe_train.cli", "export", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"asymoe-train export: {tmp_path}/config.yaml does not exist; pass a run directory written by "
        "`asymoe-train` (outputs/<experiment>/<run_id>)"]
