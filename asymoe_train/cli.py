"""``asymoe-train``: the Hydra application (``--cfg job``, ``-m`` multirun and overrides all work)."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from asymoe_train.config import register_configs

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _app(cfg: DictConfig) -> None:
    from asymoe_train.config.validate import ConfigError
    from asymoe_train.train import train

    try:
        train(cfg)
    except ConfigError as exn:
        sys.exit(f"config error: {exn}")


def main() -> None:
    if not os.path.isdir(CONF_DIR):
        sys.exit(f"asymoe-train: config directory {CONF_DIR} not found; install the package from its repository "
                 "with `pip install -e .`")
    register_configs()
    _app()


if __name__ == "__main__":
    main()
