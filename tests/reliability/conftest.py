"""Seeds and sizes for the reliability suite (tests/reliability/).

Every random choice comes from the `rng` fixture, seeded from `PACS_SEED` or
a fresh seed that the test prints: a failing run shows it in its captured
output and `PACS_SEED=<seed>` replays it. `--long` (or `PACS_LONG=1`) runs the
long soak (more kill cycles, more hostile cases) instead of the quick default.
"""
from __future__ import annotations

import os
import random

import pytest


def long_mode() -> bool:
    """--long or PACS_LONG=1. Read when asked: pytest imports this file before its
    configure hook turns --long into PACS_LONG when the suite is named on the
    command line (`pytest tests/reliability --long`)."""
    return os.environ.get("PACS_LONG", "") not in ("", "0")


def scale(quick: int, long: int) -> int:
    """How many cycles or cases: `quick` by default, `long` with --long or PACS_LONG=1."""
    return long if long_mode() else quick


@pytest.fixture
def seed(request) -> int:
    value = int(os.environ.get("PACS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"{request.node.nodeid}: seed {value} (replay: PACS_SEED={value}); "
          f"{'long' if long_mode() else 'quick'} mode")
    return value


@pytest.fixture
def rng(seed) -> random.Random:
    return random.Random(seed)
