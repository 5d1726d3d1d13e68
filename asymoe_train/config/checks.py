"""The small checks every validation module shares; each raises :class:`ConfigError` naming the dotted key."""

from __future__ import annotations

from asymoe_train.config.errors import ConfigError


def choice(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    """``value`` is one of ``allowed`` (string choices of configs built in Python, which no schema checked)."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")


def positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be > 0")


def nonnegative(key: str, value: float, meaning: str = "") -> None:
    if value < 0:
        raise ConfigError(f"{key}={value} must be >= 0" + (f" ({meaning})" if meaning else ""))


def nonempty_path(key: str, value: str, fix: str) -> None:
    """A path setting must not be empty: an empty path silently means the working directory."""
    if not str(value).strip():
        raise ConfigError(f"{key}={value!r} is empty; {fix}")
