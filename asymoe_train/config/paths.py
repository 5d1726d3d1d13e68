"""Where configs and data live: the ``conf/`` directory and paths relative to ``data.root``."""

from __future__ import annotations

import glob
import os

from asymoe_train.config.schema import DataConfig

# conf/ of the source tree the package is installed from (``pip install -e .``)
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


def resolve_data_path(data: DataConfig, path: str) -> str:
    """A path of the data config: absolute as given, else relative to ``data.root``."""
    return path if os.path.isabs(path) else os.path.join(data.root, path)


def shard_files(data: DataConfig, pattern: str) -> list[str]:
    """Sorted shard files matched by a glob relative to ``data.root``."""
    return sorted(glob.glob(resolve_data_path(data, pattern)))
