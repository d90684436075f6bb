"""Crashes: SIGKILL `pacs serve`, `pacs import` and `pacs reindex` at random moments.

The promise checked after every restart: each instance a sender saw answered
0x0000 is findable by C-FIND and its stored file, found through its index row,
holds the sent bytes; every few cycles and at the end a random sample comes
back by C-GET with the sent bytes; no index row lacks its file; staging was
emptied at start. A crash may leave a file without a row (renamed, not yet committed,
never acknowledged): `pacs verify` names it and a re-run or `pacs reindex`
adopts it, as the README says.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pacs.config import Config, load
from pacs.index.models import Instance
from tests.conftest import open_index, run_pacs, staging_files, write_config
from tests.dicomgen import make_study
from tests.retrieve_support import Receiver, counts, identifier
from tests.reliability.conftest import scale
from tests.reliability.support import (
    SETSID, StoreLoop, find_uids, index_rows, start_serve, stored_bytes, verify_problems, verifying,
)
from tests.test_workers import children

SENDERS = 4
GET_SAMPLE, GET_EVERY = 20, 5  # acknowledged instances C-GET'd back, every few cycles and at the end
# A file renamed into place whose row was not committed when the node died.
ALLOWED_AFTER_CRASH = ("file without row:",)


def check_promise(proc, acked: dict[str, bytes]) -> None:
    """Every acknowledged instance is findable and stored byte for byte; the index is sound."""
    verified = verifying(proc.config_path)  # reads beside the C-FINDs (not the start: locks)
    uids = sorted(acked)
    missing = set(uids) - find_uids(proc.port, uids)
    assert not missing, f"{len(missing)} acknowledged instances not found, e.g. {sorted(missing)[:3]}"
    stored = stored_bytes(proc.config_path, uids)
    wrong = [u for u in uids if stored.get(u) != acked[u]]
    assert not wrong, f"{len(wrong)} acknowledged instances differ from what was sent: {wrong[:3]}"
    problems = [p for p in verified() if not p.startswith(ALLOWED_AFTER_CRASH)]
    assert problems == []


def check_retrieval(proc, acked: dict[str, bytes], rng: random.Random) -> None:
    """A random sample of the acknowledged instances comes back by C-GET with the bytes sent."""
    sample = rng.sample(sorted(acked), min(GET_SAMPLE, len(acked)))
    receiver = Receiver()
    _, final, _ = receiver.get(proc, identifier("IMAGE", SOPInstanceUID=sample))
    assert final.Status == 0 and counts(final) == (len(sample), 0, 0), final
    got = {sop: data for sop, (_, data) in receiver.received.items()}
    assert got == {sop: acked[sop] for sop in sample}


def plant_stray(config: Config) -> Path:
    """A receive file as a crash leaves it in staging; start-up must remove it."""
    stray = config.storage.root / ".staging" / "tmpcrashleftover.dcm"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"\0" * 1000)
    return stray


def kill_group(proc) -> None:
    os.killpg(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait()
    proc.log.close()


@pytest.mark.skipif(not SETSID.exists(), reason="setsid (util-linux) is missing")
@pytest.mark.parametrize("workers, cycles", [(1, scale(20, 100)), (2, scale(10, 50))])
def test_kill9_loop_loses_no_acknowledged_instance(tmp_path, rng, workers, cycles):
    """Start, store from 4 associations, SIGKILL at a random moment; check after each restart.

    With workers: 2 a crash is SIGKILL of the whole process group (supervisor and
    workers at once, what a power cut or the OOM killer does); half of the cycles
    first SIGKILL one worker mid-stream, which the supervisor replaces while the
    senders reconnect, and then the group.
    """
    config_path = write_config(tmp_path, storage={"fsync": True},
                               network={"workers": workers, "dimse_timeout": 30})
    acked: dict[str, bytes] = {}
    refused = []
    began = time.monotonic()
    for cycle in range(cycles):
        stray = plant_stray(load(config_path))
        proc = start_serve(config_path, own_group=True)
        try:
            assert not stray.exists(), "stray staging file survived the restart"
            assert staging_files(proc.config) == []
            check_promise(proc, acked)
            if cycle and cycle % GET_EVERY == 0:
                check_retrieval(proc, acked, rng)
            # each sender its own generator: threads drawing from one would race
            senders = [StoreLoop(proc.port, f"C{cycle}S{i}", random.Random(rng.random()))
                       for i in range(SENDERS)]
            for sender in senders:
                sender.start()
            time.sleep(rng.uniform(0.3, 2.5))
            if workers > 1 and rng.random() < 0.5:
                victim = rng.choice(sorted(children(proc.proc.pid)))
                os.kill(victim, signal.SIGKILL)
                time.sleep(rng.uniform(0.5, 2.0))
        finally:
            kill_group(proc)
        for sender in senders:
            sender.stop.set()
        for sender in senders:
            sender.join(60)
            assert not sender.is_alive()
            acked.update(sender.acked)
            refused += sender.refused
        print(f"cycle {cycle}: {len(acked)} acknowledged so far, {time.monotonic() - began:.0f} s")
    assert acked, "no store was ever acknowledged"
    proc = start_serve(config_path)
    try:
        check_promise(proc, acked)
        check_retrieval(proc, acked, rng)
        assert proc.terminate() == 0
    finally:
        proc.kill()
    assert refused == []


def pacs_command(*args: str, config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pacs", *args, "--no-progress",
                             "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_working(proc: subprocess.Popen, condition) -> int | None:
    """SIGKILL `proc` as soon as `condition()` returns a row count; that count.

    Fails if the command ended first: the kill must land while it works.
    """
    while proc.poll() is None:
        rows = condition()
        if rows is not None:
            proc.kill()
            proc.wait()
            return rows
        time.sleep(0.002)
    pytest.fail(f"the command ended (exit {proc.returncode}) before the moment to kill it")


def assert_rerun_recovers(config: Path, command: tuple[str, ...], total: int) -> None:
    """After the kill: the index is sound; the re-run cleans staging and completes the work."""
    crashed = verify_problems(config)
    assert not [p for p in crashed if not p.startswith(ALLOWED_AFTER_CRASH)], crashed
    stray = plant_stray(load(config))  # beside any file the kill left there
    rerun = run_pacs(*command, "--no-progress", config=config)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert not stray.exists() and staging_files(load(config)) == []
    assert verify_problems(config) == []
    with open_index(config):
        assert Instance.select().count() == total


@pytest.mark.parametrize("cycles", [scale(3, 15)])
def test_kill9_during_import_then_rerun_is_consistent(tmp_path, rng, cycles):
    """SIGKILL `pacs import` once a random number of its files (1 to 3/4) have index rows."""
    total = 100
    for cycle in range(cycles):
        folder = tmp_path / f"in{cycle}"
        make_study(folder, patient_id=f"IMP{cycle}", series=4, per_series=total // 4)
        (tmp_path / f"node{cycle}").mkdir()
        config = write_config(tmp_path / f"node{cycle}")
        database = load(config).database.url.removeprefix("sqlite:///")
        after = rng.randrange(1, total * 3 // 4)
        rows = kill_working(pacs_command("import", str(folder), config=config),
                            lambda: n if (n := index_rows(database) or 0) >= after else None)
        left = [p.name for p in staging_files(load(config))]
        print(f"cycle {cycle}: import killed at {rows} rows (aim {after}), staging left {left}")
        assert after <= index_rows(database) < total, "killed before its first row or after its last"
        assert_rerun_recovers(config, ("import", str(folder)), total)


@pytest.mark.parametrize("cycles", [scale(3, 15)])
def test_kill9_during_reindex_then_rerun_is_consistent(tmp_path, cycles):
    """SIGKILL `pacs reindex` once it emptied the index, or (every other cycle) once it
    committed its first batch."""
    total = 600  # more than one reindex batch (500)
    folder = tmp_path / "in"
    make_study(folder, patient_id="REIDX", series=6, per_series=total // 6)
    config = write_config(tmp_path)
    database = load(config).database.url.removeprefix("sqlite:///")
    assert run_pacs("import", "--no-progress", str(folder), config=config).returncode == 0
    for cycle in range(cycles):
        moment = ("emptied", "refilling")[cycle % 2]
        if moment == "emptied":  # dropped or recreated empty, no batch committed yet
            condition = lambda: 0 if index_rows(database) in (None, 0) else None  # noqa: E731
        else:
            condition = lambda: n if 0 < (n := index_rows(database) or 0) < total else None  # noqa: E731
        rows = kill_working(pacs_command("reindex", config=config), condition)
        print(f"cycle {cycle}: reindex killed once {moment}, at {rows} rows")
        assert (index_rows(database) or 0) < total, "killed after its last batch"
        assert_rerun_recovers(config, ("reindex",), total)
