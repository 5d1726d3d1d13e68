"""Training sources: one shard glob, or a weighted mixture of shard globs (see ``DataConfig.sources``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from asymoe_train.config.errors import ConfigError

COMPONENT_KEYS = ("glob", "weight")


@dataclass(frozen=True)
class SourcePart:
    """One component of a source: its shard glob (relative to ``data.root``) and its shard-draw weight."""

    name: str
    glob: str
    weight: float


def source_parts(key: str, value: Any) -> list[SourcePart]:
    """The components of the source configured at ``key`` (e.g. ``data.sources.instruct``).

    A string is one component of weight 1; a mapping ``{component: {glob: str, weight: float > 0}}`` is a mixture
    (``weight`` defaults to 1). Anything else raises ``ConfigError`` naming the offending key.
    """
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"{key} is empty; set it to a shard glob relative to data.root")
        return [SourcePart("", value, 1.0)]
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(
            f"{key}={value!r} is neither a shard glob nor a mixture; write `{key}: <glob>` or "
            f"`{key}: {{<component>: {{glob: <glob>, weight: <w>}}, ...}}`"
        )
    parts = []
    for name, component in value.items():
        where = f"{key}.{name}"
        if not isinstance(component, Mapping):
            raise ConfigError(f"{where}={component!r} must be a mapping {{glob: <shard glob>, weight: <w > 0>}}")
        unknown = sorted(set(component) - set(COMPONENT_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; a mixture component has {list(COMPONENT_KEYS)}")
        glob = component.get("glob")
        if not isinstance(glob, str) or not glob:
            raise ConfigError(f"{where}.glob is missing or empty; set it to a shard glob relative to data.root")
        weight = component.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"{where}.weight={weight!r} must be a positive number (a relative shard-draw weight)")
        parts.append(SourcePart(str(name), glob, float(weight)))
    return parts
