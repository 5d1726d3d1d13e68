"""Shared fixtures: the demo data set (built once per session by the recipe), tiny configs, a clean environment."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Inherited launcher variables would make DeepSpeed and webdataset think they run inside a job.
for _var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    os.environ.pop(_var, None)
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>")  # what asymoe_train.data.tokenizer needs in a tokenizer.json


def write_bpe_tokenizer(path: str | os.PathLike, corpus: str, specials=SPECIAL_TOKENS, vocab_size: int = 300) -> str:
    """Train a byte-level BPE on ``corpus`` (``specials`` take the first ids) and save it as a tokenizers JSON."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus] * 10, trainer)
    tok.save(str(path))
    return str(path)


# A Qwen2-style ChatML template: a default system prompt, turns closed by <|im_end|> and a newline, while the
# tokenizer's eos_token is <|endoftext|> (as in Qwen2 base checkpoints), so the end-of-turn token must be found.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")


def chat_tokenizer_dir(path, chat_template: str = CHATML) -> str:
    """A Hugging Face tokenizer directory as checkpoints ship it: tokenizer.json, and tokenizer_config.json with the
    special tokens and the chat template (no bos, no <s>/</s>/<pad>)."""
    os.makedirs(path, exist_ok=True)
    corpus = "system user assistant You are a helpful assistant. what color is the shape? is it a circle? blue yes"
    write_bpe_tokenizer(os.path.join(path, "tokenizer.json"), corpus, specials=CHAT_SPECIALS)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "chat_template": chat_template}, f)
    return str(path)


def image_bytes(color=(255, 0, 0), fmt: str = "PNG", size: int = 64) -> bytes:
    """A one-colour ``size`` x ``size`` image encoded as ``fmt``."""
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _load_file(module_name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load_recipe(name: str) -> ModuleType:
    """``data_recipes/<name>.py`` as module ``<name>_recipe``. data_recipes is not a package, and putting it on
    sys.path would let easy_vqa.py shadow the easy_vqa package, so the recipes' sibling module ``recipe_common``
    (what a recipe run as a script finds next to itself) is registered under that name first."""
    if "recipe_common" not in sys.modules:
        _load_file("recipe_common", os.path.join(ROOT, "data_recipes", "recipe_common.py"))
    return _load_file(f"{name}_recipe", os.path.join(ROOT, "data_recipes", f"{name}.py"))


def unload_recipe(module: ModuleType) -> None:
    """Forget a module of :func:`load_recipe` (``recipe_common`` stays for the other recipes)."""
    sys.modules.pop(module.__name__, None)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Each test starts with the suite's torch thread count: a test that changes it (e.g. to measure memory on one
    thread) must not change the summation order, and so the fp32 rounding, of the tests after it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def recipe():
    """The easy-vqa recipe module."""
    module = load_recipe("easy_vqa")
    yield module
    unload_recipe(module)


@pytest.fixture(scope="session")
def llava_recipe():
    """The LLaVA-JSON recipe module."""
    module = load_recipe("llava")
    yield module
    unload_recipe(module)


@pytest.fixture(scope="session")
def demo_data(recipe, tmp_path_factory) -> str:
    """The easy-vqa shards: the repo's data/easy_vqa when built, else built once into a temp dir."""
    repo_data = os.path.join(ROOT, "data", "easy_vqa")
    if os.path.isfile(os.path.join(repo_data, "manifest.json")):
        return repo_data
    out = str(tmp_path_factory.mktemp("easy_vqa"))
    recipe.build(out)
    return out


@pytest.fixture(scope="session")
def scenes_data(tmp_path_factory) -> str:
    """The multi-object scenes shards: the repo's data/scenes when built, else a small build in a temp dir."""
    repo_data = os.path.join(ROOT, "data", "scenes")
    if os.path.isfile(os.path.join(repo_data, "manifest.json")):
        return repo_data
    module = load_recipe("scenes")
    out = str(tmp_path_factory.mktemp("scenes") / "scenes")
    module.build(out, train_images=200, test_images=40, pope_images=20)
    unload_recipe(module)
    return out


# ------------------------------------------------------------------------------- the short demo on 1 and 2 processes
# Session-scoped: tests/test_ep.py checks these runs' numerics and tests/test_distributed.py their data streams, so
# each launch (seconds of imports per process) happens once. The commands are tests/test_ep.py's ``train``.
@pytest.fixture(scope="session")
def demo_one_process(demo_data, tmp_path_factory):
    """The short demo on 1 process, EP=1, ZeRO-0, 8 images per step, checkpoints every 5 steps: its run dir."""
    from test_ep import ONE_RANK, train

    run_dir = tmp_path_factory.mktemp("demo-one") / "one"
    train(1, run_dir, demo_data, *ONE_RANK)
    return run_dir


@pytest.fixture(scope="session")
def demo_two_ranks(demo_data, tmp_path_factory):
    """The same global batches by 2 processes (torchrun), EP=2, ZeRO-2, W&B offline; each rank asks for a run
    directory of its own (``two-<RANK>``), the job must still get one: ``run_dir`` (two-0) and the launch ``proc``."""
    from test_ep import TWO_RANKS, train

    parent = tmp_path_factory.mktemp("demo-two")
    proc = train(2, f"{parent}/two-${{oc.env:RANK}}", demo_data, *TWO_RANKS, "engine.zero_stage=2", logger="offline")
    return SimpleNamespace(run_dir=parent / "two-0", proc=proc)


@pytest.fixture(scope="session")
def demo_resumed(demo_one_process, demo_data, tmp_path_factory):
    """The 1-process run's ZeRO-0 checkpoint after instruct step 10 resumed by 2 processes, EP=2 (``two``, launch
    ``two_proc``); that run's checkpoint after step 15 (``written``) resumed by 1 process, EP=1 (``one``,
    ``one_proc``)."""
    from test_ep import ONE_RANK, TWO_RANKS, checkpoint, train

    root = tmp_path_factory.mktemp("demo-resumed")
    two, one = root / "two", root / "one"
    two_proc = train(2, two, demo_data, *TWO_RANKS, f"resume={checkpoint(demo_one_process, 'instruct-step0000010')}")
    written = checkpoint(two, "instruct-step0000015")
    one_proc = train(1, one, demo_data, *ONE_RANK, f"resume={written}")
    return SimpleNamespace(two=two, two_proc=two_proc, written=written, one=one, one_proc=one_proc)
