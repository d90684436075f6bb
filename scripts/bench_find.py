"""C-FIND at scale: fill an index directly, then time the issue's queries over one association.

Builds an index of `--patients` x 2 studies x 5 series x 10 instances (1,000,000
instances for the default 10,000 patients) plus one series of `--big` instances,
straight into the tables (no files: C-FIND reads only the index), starts
`pacs serve` on it and measures, with a pynetdicom client that sets TCP_NODELAY
(as ../shared/bench does), the median round trip of: STUDY level by PatientName
`SMI*`, SERIES level in one study, IMAGE level in one series, STUDY level over
one month of StudyDate; then streams the big series at IMAGE level twice and
reports the server's peak RSS before and after each. pynetdicom's requestor
polls (its DUL and DIMSE threads sleep 1 ms between looks) and decodes every
response into a Dataset, which costs more than the server's work for small
answers (and now and then its idle reactor takes a response off the queue
before send_c_find sees it: "Received unexpected C-FIND service message", one
match short), so each query is also timed with a blocking client built on
pacs.scu / pacs.pdata (one thread, waits in recv, counts the pending statuses
without decoding the identifiers), which also does the streaming: its time is
close to the server's own. The server's CPU time per query (all its threads,
from /proc) is the figure least disturbed by a loaded machine.

Every instance shares one stored header (a template), so keys read from the
header would all answer the same values; the timed queries use columns only.

The index is `index.sqlite` in `--folder` unless `--database-url` names
another (PostgreSQL: pick a schema of its own with `options=-csearch_path%3D...`,
the schema must exist). It is filled only when it holds no instance, so
later runs reuse it; a PostgreSQL fill ends with ANALYZE, as autovacuum would
do soon after such a load, so the planner knows the tables' sizes.

    python scripts/bench_find.py --folder /tmp/find-scale   # reuses the index if present
    python scripts/bench_find.py --database-url \
        'postgresql://postgres@127.0.0.1/test?options=-csearch_path%3Dfindscale'
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import yaml
from peewee import PostgresqlDatabase
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT

from pacs.header import encode_header
from pacs.pdata import DATA_SET, P_DATA, command_fragments, command_set, parse_command, read_pdu
from pacs.pdata import ui, us
from pacs.scu import Proposal, StoreAssociation, associate
from pacs.index.db import close_database, open_database
from pacs.index.models import Instance, Patient, Series, Study, database
from pacs.index.transfer import continue_ids

ROOT = "1.2.826.0.1.3680043.8.498.77"
CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
              "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
              "ReferringPhysicianName", "ModalitiesInStudy"]


def template_header() -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT, f"{ROOT}.0"
    ds.PatientName, ds.Modality, ds.Rows, ds.Columns = "TEMPLATE^HEADER", "CT", 64, 64
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return encode_header(ds)


def name(rng: random.Random, index: int) -> str:
    if index % 2000 == 7:  # 5 SMITH-like patients per 10,000: a selective prefix query
        return rng.choice(["SMITH", "SMITHERS", "SMIT"]) + f"^P{index}"
    return f"N{rng.randrange(10**6):06d}^P{index}"


def fill(patients: int, big: int) -> None:
    """Insert the synthetic rows in large transactions."""
    rng = random.Random(1)
    header, now, start = template_header(), datetime.now(), date(2005, 1, 1)
    for first in range(0, patients + 1, 1000):
        with database.atomic():
            chunk = range(first, min(first + 1000, patients + 1))
            names = {p: name(rng, p) for p in chunk}
            Patient.insert_many([dict(
                id=p + 1, patient_id=f"PID{p:07d}", patient_name=names[p],
                patient_name_fold=names[p].casefold(), birth_date="19700101",
                sex="O", num_studies=1 if p == patients else 2,
                num_series=1 if p == patients else 10,
                num_instances=big if p == patients else 100) for p in chunk]).execute()
            studies, series, instances = [], [], []
            for p in chunk:
                for s in range(1 if p == patients else 2):
                    st = p * 2 + s + 1
                    day = start + timedelta(days=rng.randrange(20 * 365))
                    n_series, per = (1, big) if p == patients else (5, 10)
                    studies.append(dict(
                        id=st, patient=p + 1, study_uid=f"{ROOT}.{p}.{s}",
                        study_date=day.strftime("%Y%m%d"), study_time="101500",
                        accession_number=f"A{st:08d}", study_id="1", description="CT CHEST",
                        modalities="\\CT\\", sop_classes=f"\\{CT}\\", num_series=n_series,
                        num_instances=n_series * per))
                    for r in range(n_series):
                        se = st * 5 + r
                        series.append(dict(id=se, study=st, series_uid=f"{ROOT}.{p}.{s}.{r}",
                                           modality="CT", series_number=str(r + 1),
                                           num_instances=per))
                        instances += [dict(
                            series=se, sop_uid=f"{ROOT}.{p}.{s}.{r}.{i}", sop_class_uid=CT,
                            instance_number=str(i + 1), rows=64, columns=64,
                            transfer_syntax=ExplicitVRLittleEndian, path="-", size=0,
                            received_at=now, header=header) for i in range(per)]
            Study.insert_many(studies).execute()
            Series.insert_many(series).execute()
            for at in range(0, len(instances), 5000):
                Instance.insert_many(instances[at:at + 5000]).execute()
        print(f"\rfilled {min(first + 1000, patients + 1)} patients", end="", flush=True)
    print()
    if isinstance(database.obj, PostgresqlDatabase):
        continue_ids(database.obj)  # the rows above came with explicit ids
        # SQLite is left as a node leaves it: pacs never runs ANALYZE there.
        database.execute_sql("ANALYZE")


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def connect(port: int):
    ae = AE(ae_title="BENCHFIND")
    ae.add_requested_context(STUDY_ROOT)
    ae.dimse_timeout = ae.network_timeout = 600
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def query(keys: list[str], filters: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = filters["level"]
    for keyword in keys:
        setattr(ds, keyword, "")
    for keyword, value in filters.items():
        if keyword != "level":
            setattr(ds, keyword, value)
    return ds


def pynetdicom_find(assoc, ds: Dataset) -> int:
    count = 0
    for status, _ in assoc.send_c_find(ds, STUDY_ROOT):
        assert status is not None and status.Status in (0, 0xFF00), status
        count += status.Status == 0xFF00
    return count


def blocking_find(assoc: StoreAssociation, ds: Dataset) -> int:
    """One C-FIND on a blocking association: the pending responses counted, not decoded."""
    context = assoc.accepted[(STUDY_ROOT, ImplicitVRLittleEndian)]
    command = command_set({0x0002: ui(STUDY_ROOT), 0x0100: us(0x0020), 0x0110: us(1),
                           0x0700: us(0), 0x0800: us(DATA_SET)})
    assoc._writer.send(context, command, encode(ds, True, True))
    count, fragments = 0, []
    while True:
        kind, body = read_pdu(assoc._sock)
        assert kind == P_DATA, kind
        for fragment, last in command_fragments(body):
            fragments.append(fragment)
            if last:
                status = parse_command(b"".join(fragments)).us(0x0900)
                fragments = []
                if status != 0xFF00:
                    assert status == 0, hex(status)
                    return count
                count += 1


def cpu_ms(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def timed(find, assoc, keys: list[str], repeats: int, server: int = 0,
          **filters) -> tuple[float, float, int, float]:
    """Median and spread (max - min) in ms of one C-FIND after a warm-up, its matches,
    and the mean CPU ms the `server` process spent per query."""
    ds = query(keys, filters)
    times, count = [], 0
    for run in range(repeats + 1):
        if run == 1:
            cpu = cpu_ms(server) if server else 0.0
        start = time.perf_counter()
        count = find(assoc, ds)
        if run:
            times.append((time.perf_counter() - start) * 1000)
    used = (cpu_ms(server) - cpu) / repeats if server else 0.0
    return statistics.median(times), max(times) - min(times), count, used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/find-scale"))
    parser.add_argument("--patients", type=int, default=10000)
    parser.add_argument("--big", type=int, default=100000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--database-url",
                        help="the index (default: sqlite:/// of index.sqlite in --folder)")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    url = args.database_url or f"sqlite:///{args.folder.resolve() / 'index.sqlite'}"
    open_database(url, durable=False)
    if not Instance.select().exists():
        started = time.monotonic()
        fill(args.patients, args.big)
        print(f"index built in {time.monotonic() - started:.0f} s")
    close_database()
    port = socket.create_server(("127.0.0.1", 0)).getsockname()[1]
    config = args.folder / "pacs.yaml"
    config.write_text(yaml.safe_dump({
        "ae_title": "MINIPACS", "host": "127.0.0.1", "port": port,
        "storage": {"root": "store", "fsync": False}, "database": {"url": url},
        "network": {"workers": 1}, "logging": {"level": "WARNING"}}))
    server = subprocess.Popen([sys.executable, "-m", "pacs", "serve", "--config", str(config)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assoc = connect(port)
                break
            except (AssertionError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        p = 7  # one of the SMITH-like patients: its first study and series
        study, series = f"{ROOT}.{p}.0", f"{ROOT}.{p}.0.0"
        cases = [
            ("STUDY PatientName=SMI*", STUDY_KEYS, dict(level="STUDY", PatientName="SMI*")),
            ("SERIES in one study", ["SeriesInstanceUID", "Modality", "SeriesNumber"],
             dict(level="SERIES", StudyInstanceUID=study)),
            ("IMAGE in one series", ["SOPInstanceUID", "SOPClassUID", "InstanceNumber"],
             dict(level="IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series)),
            ("STUDY StudyDate one month", STUDY_KEYS,
             dict(level="STUDY", StudyDate="20150301-20150331")),
        ]
        blocking = associate("127.0.0.1", port, "BENCHRAW", "MINIPACS",
                             [Proposal(STUDY_ROOT, (ImplicitVRLittleEndian,))],
                             acse_timeout=30, dimse_timeout=600)
        print(f"{'median ms (spread)':28s} {'pynetdicom':>16s} {'blocking':>16s} "
              f"{'server CPU ms':>14s}")
        for label, keys, filters in cases:
            ms, spread, count, _ = timed(pynetdicom_find, assoc, keys, args.repeats, **filters)
            ms2, spread2, count2, cpu = timed(blocking_find, blocking, keys, args.repeats,
                                              server.pid, **filters)
            if count != count2:
                print(f"  (pynetdicom's client saw {count} matches, the blocking one {count2})")
            print(f"{label:28s} {ms:8.2f} ({spread:5.1f}) {ms2:8.2f} ({spread2:5.1f}) "
                  f"{cpu:14.2f}  [{count} matches]")
        before = rss_kb(server.pid, "VmRSS")
        big = query(["SOPInstanceUID"], dict(level="IMAGE",
                                             SeriesInstanceUID=f"{ROOT}.{args.patients}.0.0"))
        for _ in range(2):  # the first also fills SQLite's page cache (32 MB), the second not
            start = time.perf_counter()
            count = blocking_find(blocking, big)
            print(f"IMAGE {count} matches streamed in {time.perf_counter() - start:.1f} s; server "
                  f"RSS {before // 1024} MB before, peak {rss_kb(server.pid, 'VmHWM') // 1024} MB")
        blocking.release()
        assoc.release()
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
