"""Run settings, read from environment variables at call time (never at import time).

==========================  =========================  ==============================================
variable                    default                    meaning
==========================  =========================  ==============================================
``LAMOSTCANNON_SOURCE``     ``mock``                   ``mock`` (the embedded mock universe) or
                                                       ``archive`` (download the real surveys)
``LAMOSTCANNON_SIZE``       ``small``                  mock universe size: ``tiny``, ``small``,
                                                       ``large``
``LAMOSTCANNON_SEED``       ``2020``                   master random seed of the mock and the CV folds
``LAMOSTCANNON_WORKERS``    number of CPU cores        processes for ingest and inference
``LAMOSTCANNON_REQUIRE_REAL``  unset                   ``1``: tests that need the real spectra fail
                                                       instead of skipping when they are missing
==========================  =========================  ==============================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SOURCES = ("mock", "archive")
SIZES = ("tiny", "small", "large")


@dataclass(frozen=True)
class Settings:
    """The settings of one run; see the module docstring for the environment variables."""

    source: str = "mock"
    size: str = "small"
    seed: int = 2020
    n_workers: int = 2
    require_real: bool = False

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"LAMOSTCANNON_SOURCE must be one of {SOURCES}, got {self.source!r}")
        if self.size not in SIZES:
            raise ValueError(f"LAMOSTCANNON_SIZE must be one of {SIZES}, got {self.size!r}")
        if self.n_workers < 1:
            raise ValueError(f"LAMOSTCANNON_WORKERS must be >= 1, got {self.n_workers}")


def _int_setting(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {text!r}") from None


def settings() -> Settings:
    """Read the current settings from the environment."""
    env = os.environ
    return Settings(
        source=env.get("LAMOSTCANNON_SOURCE", "mock").strip().lower(),
        size=env.get("LAMOSTCANNON_SIZE", "small").strip().lower(),
        seed=_int_setting("LAMOSTCANNON_SEED", 2020),
        n_workers=_int_setting("LAMOSTCANNON_WORKERS", os.cpu_count() or 1),
        require_real=env.get("LAMOSTCANNON_REQUIRE_REAL", "") not in ("", "0", "false", "no"),
    )
