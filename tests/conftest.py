"""Shared fixtures: the demo data set (built once per session by the recipe), tiny configs, a clean environment."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
from types import ModuleType

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
