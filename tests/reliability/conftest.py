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

LONG = os.environ.get("PACS_LONG", "") not in ("", "0")


def scale(quick: int, long: int) -> int:
    """How many cycles or cases: `quick` by default, `long` with --long or PACS_LONG=1."""
    return long if LONG else quick


@pytest.fixture
def seed(request) -> int:
    value = int(os.environ.get("PACS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"{request.node.nodeid}: seed {value} (replay: PACS_SEED={value}); "
          f"{'long' if LONG else 'quick'} mode")
    return value


@pytest.fixture
def rng(seed) -> random.Random:
    return random.Random(seed)
