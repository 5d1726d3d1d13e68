"""Shared fixtures: the demo data set (built once per session by the recipe), tiny configs, a clean environment."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "data_recipes", "easy_vqa.py")

# Inherited launcher variables would make DeepSpeed and webdataset think they run inside a job.
for _var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    os.environ.pop(_var, None)
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def recipe():
    """The easy-vqa recipe module (data_recipes is not a package, and its file name clashes with easy_vqa's)."""
    spec = importlib.util.spec_from_file_location("easy_vqa_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="session")
def demo_data(recipe, tmp_path_factory) -> str:
    """The easy-vqa shards: the repo's data/easy_vqa when built, else built once into a temp dir."""
    repo_data = os.path.join(ROOT, "data", "easy_vqa")
    if os.path.isfile(os.path.join(repo_data, "manifest.json")):
        return repo_data
    out = str(tmp_path_factory.mktemp("easy_vqa"))
    recipe.build(out)
    return out
