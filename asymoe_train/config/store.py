"""ConfigStore registration and conversion of the composed DictConfig to typed objects."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from asymoe_train.config.schema import TrainConfig


def register_configs() -> None:
    """Register the root schema; ``conf/train.yaml`` lists ``train_schema`` first in its defaults."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_typed(cfg: DictConfig) -> TrainConfig:
    """Resolve interpolations and convert to dataclass instances."""
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, TrainConfig), type(typed)
    return typed
