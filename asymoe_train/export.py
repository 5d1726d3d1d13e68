"""Export a run's stage as consolidated weights plus what rebuilds and prompts the model, and load it back in plain
PyTorch on one device: no DeepSpeed, no process group, no run directory, no shards.

An export directory holds ``model.safetensors``, the tokenizer (``tokenizer.json``, or a ``tokenizer/`` directory when
the run used a Hugging Face tokenizer directory), ``config.yaml`` (:class:`ExportConfig`) and ``manifest.json`` (every
file's SHA-256, checked when it is loaded).
Backbones configured by a local path (``model.backbone.vision_path``, ``model.backbone.lm_path``) are rebuilt from
that path before the exported weights replace theirs, so the path must also exist where the export is loaded.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_model

from asymoe_train.checkpoint.integrity import verify, write_manifest
from asymoe_train.checkpoint.weights import WEIGHTS, load_stage_model, save_weights, stage_dir
from asymoe_train.config.derive import image_tokens_per_image
from asymoe_train.config.paths import resolve_data_path
from asymoe_train.config.schema import ModelConfig, TrainConfig
from asymoe_train.data.conversation import ConversationEncoder
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.models.vlm import VisionLanguageModel, build_model

CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
TOKENIZER_DIR = "tokenizer"  # a Hugging Face tokenizer directory (with its chat template) is copied here


@dataclass(kw_only=True)
class ExportConfig:
    """``config.yaml`` of an export directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    upcycled: bool = False  # the MoE slots hold MoE blocks (build, then upcycle, then load the weights)
    tokenizer: str = TOKENIZER  # relative to the export directory: tokenizer.json, or tokenizer/ (Hugging Face)
    template: str = "plain"  # the run's resolved conversation template: chat (the tokenizer's) or a TEMPLATES name
    image_size: int = 64  # images are resized to image_size x image_size, as in training
    max_length: int = 128  # longest prompt in tokens (the run's data.max_length)
    max_new_tokens: int = 4  # default answer length (the run's eval.max_new_tokens)
    run_dir: str = ""  # where it came from
    stage: str = ""


def _load_typed(schema, path: str, what: str):
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path)))
    except OmegaConfBaseException as exn:
        raise ValueError(f"{path} is not a valid {what}: {exn}") from None


def load_run_config(run_dir: str) -> TrainConfig:
    """The resolved config a run saved as ``<run_dir>/config.yaml``, typed."""
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; pass a run directory written by `asymoe-train` "
                                "(outputs/<experiment>/<run_id>)")
    return _load_typed(TrainConfig, path, "run config")


def finished_stages(cfg: TrainConfig, run_dir: str) -> list[str]:
    """Curriculum stages, in order, whose consolidated weights exist under ``run_dir``."""
    return [name for name in cfg.curriculum.stages
            if os.path.isfile(os.path.join(stage_dir(run_dir, name), WEIGHTS))]


def _pick_stage(cfg: TrainConfig, run_dir: str, stage: str | None) -> str:
    names = list(cfg.curriculum.stages)
    done = finished_stages(cfg, run_dir)
    train = (f"`asymoe-train experiment={cfg.experiment}` with the run's overrides "
             f"({os.path.join(run_dir, '.hydra', 'overrides.yaml')})")
    if stage is None:
        if not done:
            expected = [os.path.join(stage_dir(run_dir, name), WEIGHTS) for name in names]
            raise FileNotFoundError(f"no stage of {run_dir} has finished: none of {expected} exists; "
                                    f"train the run first with {train}")
        return done[-1]
    if stage not in names:
        raise ValueError(f"--stage {stage!r} is not a stage of {run_dir}; its curriculum has {names}")
    if stage not in done:
        path = os.path.join(stage_dir(run_dir, stage), WEIGHTS)
        hint = f"export a finished stage with --stage {done[-1]}" if done else "no stage has finished yet"
        raise FileNotFoundError(f"{path} does not exist: stage {stage!r} did not finish; {hint}, or train the run "
                                f"to the end of {stage!r} with {train}")
    return stage


def _run_tokenizer(cfg: TrainConfig, run_dir: str) -> str:
    """The run's tokenizer file: ``data.root`` is relative to the directory the run was started from."""
    path = resolve_data_path(cfg.data, cfg.data.tokenizer)
    candidates = [path]
    hydra_file = os.path.join(run_dir, ".hydra", "hydra.yaml")
    if not os.path.isabs(path) and os.path.isfile(hydra_file):
        cwd = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd")
        if cwd:
            candidates.append(os.path.join(cwd, path))
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"the run's tokenizer (data.root={cfg.data.root!r}, data.tokenizer={cfg.data.tokenizer!r}) "
                            f"is not at {candidates}; run export from the directory the run was trained in, or pass "
                            "--tokenizer PATH")


def export(run_dir: str, stage: str | None = None, out: str | None = None, tokenizer: str | None = None) -> str:
    """Write ``model.safetensors``, ``tokenizer.json`` and ``config.yaml`` of a run's stage (default: the last
    finished one) into ``out`` (default ``<run_dir>/export``); returns ``out``.

    The weights are loaded strictly into the model as the stage saved it (upcycled if it or an earlier stage
    upcycled) and written again, so an export always matches the structure it declares.
    """
    cfg = load_run_config(run_dir)
    stage = _pick_stage(cfg, run_dir, stage)
    tokenizer_path = tokenizer or _run_tokenizer(cfg, run_dir)
    tok = TextTokenizer(tokenizer_path)
    model = load_stage_model(cfg.model, cfg.curriculum.stages, run_dir, stage, tok.vocab_size, tok.pad_id, cfg.seed)
    out = out or os.path.join(run_dir, "export")
    os.makedirs(out, exist_ok=True)
    save_weights(model, os.path.join(out, WEIGHTS))
    name = TOKENIZER_DIR if os.path.isdir(tokenizer_path) else TOKENIZER
    target = os.path.join(out, name)
    if os.path.abspath(tokenizer_path) != os.path.abspath(target):
        if os.path.isdir(tokenizer_path):
            shutil.copytree(tokenizer_path, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(tokenizer_path, target)
    template = ConversationEncoder(tok, cfg.data.template, image_tokens_per_image(cfg.model.vision)).template_name
    meta = ExportConfig(
        model=cfg.model, upcycled=model.is_upcycled, tokenizer=name, template=template,
        image_size=cfg.model.vision.image_size, max_length=cfg.data.max_length,
        max_new_tokens=cfg.eval.max_new_tokens, run_dir=os.path.abspath(run_dir), stage=stage,
    )
    OmegaConf.save(OmegaConf.structured(meta), os.path.join(out, CONFIG))
    write_manifest(out)  # what load_pretrained checks the files against
    return out


def load_pretrained(path: str, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[VisionLanguageModel, TextTokenizer, ExportConfig]:
    """``(model, tokenizer, meta)`` from an export directory: the model on ``device`` (in ``dtype`` if given) in eval
    mode, its weights loaded strictly; ``meta`` is the export's :class:`ExportConfig`. The files are checked against
    the export's ``manifest.json`` first (:class:`asymoe_train.config.errors.CheckpointError` names a damaged one)."""
    config = os.path.join(path, CONFIG)
    weights = os.path.join(path, WEIGHTS)
    for file in (config, weights):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} does not exist; write an export with "
                                    f"`asymoe-train export <run_dir> --out {path}`")
    verify(path, fix=f"export it again with `asymoe-train export <run_dir> --out {path}`")
    meta: ExportConfig = _load_typed(ExportConfig, config, "export config")
    tokenizer = TextTokenizer(os.path.join(path, meta.tokenizer))
    model = build_model(meta.model, tokenizer.vocab_size, tokenizer.pad_id)
    if meta.upcycled:
        model.upcycle()  # structure only: the weights overwrite every tensor
    load_model(model, weights, strict=True)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, meta
