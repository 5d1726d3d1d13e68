"""Config schemas, ConfigStore registration and validation."""

from asymoe_train.config.schema import TrainConfig
from asymoe_train.config.store import register_configs, to_typed
from asymoe_train.config.validate import validate

__all__ = ["TrainConfig", "register_configs", "to_typed", "validate"]
