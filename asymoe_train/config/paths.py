"""Where configs and data live: the ``conf/`` directory and paths relative to ``data.root``."""

from __future__ import annotations

import glob
import os
import re

from braceexpand import braceexpand

from asymoe_train.config.errors import ConfigError
from asymoe_train.config.schema import DataConfig

# A URL scheme as webdataset reads one (http://, s3://, pipe:<shell command>, file:, ...); one letter is a drive
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")

# conf/ of the source tree the package is installed from (``pip install -e .``)
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


def resolve_data_path(data: DataConfig, path: str) -> str:
    """A path of the data config: absolute as given, else relative to ``data.root``."""
    return path if os.path.isabs(path) else os.path.join(data.root, path)


def url_scheme(path: str) -> str:
    """The URL scheme ``path`` starts with (``pipe``, ``http``, ...), or '' for a file path."""
    match = _SCHEME.match(path)
    return match.group(1) if match else ""


def shard_files(data: DataConfig, pattern: str, key: str = "a shard glob") -> list[str]:
    """The shards a glob relative to ``data.root`` names: sorted absolute paths of the regular files it matches, so
    webdataset opens each as a file whatever its name (a file named ``pipe:...`` is not a command). A URL (``pipe:``,
    ``http://``, ...) in the glob or in ``data.root`` is refused, naming ``key``, unless ``data.allow_remote_urls``;
    then it is passed on brace-expanded, for webdataset to open."""
    scheme = url_scheme(pattern) or url_scheme(data.root)
    if scheme:
        url = pattern if url_scheme(pattern) else f"{data.root.rstrip('/')}/{pattern}"
        if not data.allow_remote_urls:
            what = "a shell command that webdataset would run" if scheme == "pipe" else f"a {scheme}: URL"
            raise ConfigError(f"{key}: {url!r} is {what}, not a local shard file; name local files (relative to "
                              "data.root or absolute), or set data.allow_remote_urls=true to read URLs")
        return list(braceexpand(url))
    matches = sorted(glob.glob(resolve_data_path(data, pattern)))
    return [os.path.abspath(path) for path in matches if os.path.isfile(path)]
