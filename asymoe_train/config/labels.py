"""The label set of a classification task (``data.labels``): a YAML file with one description per label.

::

    labels:
      - name: circle                 # the label as samples give it (a json `label`, or a single-turn answer)
        description: A round shape with no corners whose edge is everywhere the same distance from its centre.
      - name: teal
        description: A blue-green colour, like shallow tropical sea water.
        out_of_scope: true           # never trained on; at evaluation its samples are out-of-scope

In-scope labels are the classes, in file order; out-of-scope labels are no class (index -1). Names are matched
case-insensitively after stripping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from asymoe_train.config.errors import ConfigError
from asymoe_train.config.paths import CONF_DIR
from asymoe_train.config.schema import DataConfig, TrainConfig

SOURCE_TREE = os.path.dirname(CONF_DIR)  # where conf/ and data_recipes/ live


def normalise(label: str) -> str:
    return str(label).strip().lower()


@dataclass(frozen=True)
class LabelSet:
    """Labels in file order: names, descriptions and the out-of-scope flags."""

    names: tuple[str, ...]
    descriptions: tuple[str, ...]
    out_of_scope: tuple[bool, ...]

    @property
    def classes(self) -> tuple[str, ...]:
        """The in-scope labels: class index -> name."""
        return tuple(n for n, oos in zip(self.names, self.out_of_scope) if not oos)

    @property
    def class_descriptions(self) -> tuple[str, ...]:
        return tuple(d for d, oos in zip(self.descriptions, self.out_of_scope) if not oos)

    def index(self, label: str) -> int | None:
        """Class index of ``label``; -1 for an out-of-scope label; None for a label outside the set."""
        key = normalise(label)
        classes = [normalise(n) for n in self.classes]
        if key in classes:
            return classes.index(key)
        return -1 if key in {normalise(n) for n in self.names} else None


def labels_path(data: DataConfig) -> str:
    """``data.labels`` as a file: absolute as given, else relative to ``data.root``, else to the source tree (where
    the shipped label files live, e.g. ``data_recipes/labels/easy_vqa.yaml``)."""
    if os.path.isabs(data.labels):
        return data.labels
    under_root = os.path.join(data.root, data.labels)
    return under_root if os.path.isfile(under_root) else os.path.join(SOURCE_TREE, data.labels)


def load_labels(path: str) -> LabelSet:
    """Parse and check a labels YAML; ``ConfigError`` names what is wrong and the fix."""
    if not os.path.isfile(path):
        raise ConfigError(f"data.labels: {path} does not exist; write a labels YAML (asymoe_train/config/labels.py "
                          "shows the form), or generate one with data_recipes/describe_labels.py")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    entries = doc.get("labels") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"data.labels: {path} holds no `labels:` list of {{name, description}} entries")
    names, descriptions, oos = [], [], []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or not str(entry.get("name", "")).strip():
            raise ConfigError(f"data.labels: {path}: labels.{n} needs a non-empty `name`")
        description = str(entry.get("description") or "").strip()
        if not description and not entry.get("out_of_scope", False):
            raise ConfigError(f"data.labels: {path}: label {entry['name']!r} has no `description`; every in-scope "
                              "label needs one (semantic synchronization encodes it)")
        unknown = set(entry) - {"name", "description", "out_of_scope"}
        if unknown:
            raise ConfigError(f"data.labels: {path}: label {entry['name']!r} has unknown keys {sorted(unknown)}; "
                              "expected name, description, out_of_scope")
        names.append(str(entry["name"]).strip())
        descriptions.append(description)
        oos.append(bool(entry.get("out_of_scope", False)))
    keys = [normalise(n) for n in names]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ConfigError(f"data.labels: {path} names {duplicates} more than once")
    if sum(not o for o in oos) < 2:
        raise ConfigError(f"data.labels: {path} has fewer than 2 in-scope labels; a classifier needs at least 2")
    return LabelSet(tuple(names), tuple(descriptions), tuple(oos))


def resolve_labels(cfg: TrainConfig, missing_ok: bool = False) -> list[str]:
    """Set ``model.head.num_classes`` from ``data.labels`` (validated before); returns what was derived.
    ``missing_ok``: a labels file that is not there derives nothing (``asymoe-train plan`` on another machine)."""
    if not cfg.data.labels or (missing_ok and not os.path.isfile(labels_path(cfg.data))):
        return []
    classes = len(load_labels(labels_path(cfg.data)).classes)
    cfg.model.head.num_classes = classes
    return [f"model.head.num_classes={classes} (in-scope labels of data.labels)"]
