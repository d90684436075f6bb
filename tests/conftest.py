"""Shared fixtures: a real node on a free loopback port, real clients.

`node` runs the server in this process (Archive + Node, as `pacs serve` does);
`serve_process` runs `pacs serve` as a subprocess for signal and CLI tests.
Both use the index backend of the `backend` fixture: SQLite, or in modules
marked `both_backends` also PostgreSQL, each test in a new empty schema.
"""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import pytest
import yaml
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification

from pacs.archive import Archive
from pacs.config import Config, load
from pacs.index.db import close_database, open_database
from pacs.index.models import Instance, Patient, Series, Study, database
from pacs.index.schema import drop_schema
from pacs.node import Node

def _requestor_leaves_responses(get_msg):
    """pynetdicom 3.0's requestor can lose a response (pydicom/pynetdicom#875, #435).

    A `send_*` call pauses the association's reactor thread and waits for the
    response on the DIMSE queue, but the pause is a flag the reactor may set
    just as it passes its checkpoint: it then takes the response off the queue
    itself ("Received unexpected C-STORE service message") and the waiting call
    times out. A node that answers within the reactor's next step (ours, in
    this very process, competing for the GIL) makes that likely. In this test
    process the reactor of a requestor leaves responses on the queue for the
    call that waits for them (and the (None, None) an abort puts there to wake
    it); the servers under test are not touched.
    """
    def get(self: DIMSEServiceProvider, block: bool = False):
        if not block and self.assoc.is_requestor:
            try:
                _, first = self.msg_queue.queue[0]  # look without taking
            except IndexError:
                return None, None
            if first is None or not first.is_valid_request:  # None: the abort's wake-up
                return None, None
        return get_msg(self, block)
    return get


DIMSEServiceProvider.get_msg = _requestor_leaves_responses(DIMSEServiceProvider.get_msg)

DCMTK = Path("/usr/bin")
HAVE_DCMTK = (DCMTK / "storescu").exists()
needs_dcmtk = pytest.mark.skipif(not HAVE_DCMTK, reason="DCMTK not installed (apt-get install dcmtk)")


PG_URL = os.environ.get("PACS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgresql")


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="reliability suite: the long soak (more kill cycles and hostile cases)")


def pytest_configure(config):
    if config.getoption("--long"):
        os.environ["PACS_LONG"] = "1"  # read by tests/reliability when it is collected
    config.addinivalue_line("markers", "both_backends: run the module on SQLite and PostgreSQL")


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
            "both_backends"):
        metafunc.parametrize("backend", BACKENDS, indirect=True, scope="module")


@pytest.fixture(scope="module")
def backend(request) -> str:
    """The index backend: "sqlite" unless the module is marked `both_backends`."""
    return getattr(request, "param", "sqlite")


def pg_admin():
    """A psycopg2 connection to the test server, or a skip saying why there is none."""
    import psycopg2

    try:
        conn = psycopg2.connect(PG_URL, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {str(exc).strip().splitlines()[0]}")
    conn.autocommit = True
    return conn


def pg_schema_url(schema: str) -> str:
    """A database URL whose connections work in `schema` and are named after it."""
    return f"{PG_URL}?options=-csearch_path%3D{schema}&application_name={schema}"


@contextmanager
def fresh_database(backend: str) -> Iterator[str | None]:
    """None for SQLite (write_config's file); for PostgreSQL the URL of a new empty schema.

    The schema is dropped afterwards, with any connections left in it.
    """
    if backend == "sqlite":
        yield None
        return
    schema = f"t_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    admin = pg_admin()
    try:
        admin.cursor().execute(f'CREATE SCHEMA "{schema}"')
        yield pg_schema_url(schema)
    finally:
        terminate_pg_backends(schema, admin)
        admin.cursor().execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()


def terminate_pg_backends(schema: str, admin=None) -> int:
    """Terminate the server processes of connections made with `schema`'s URL; their count."""
    conn = admin or pg_admin()
    try:
        cur = conn.cursor()
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND pid <> pg_backend_pid()", (schema,))
        return cur.rowcount
    finally:
        if admin is None:
            conn.close()


@pytest.fixture
def database_url(backend) -> Iterator[str | None]:
    """The `database.url` of a test's nodes: None (SQLite file) or a fresh PostgreSQL schema."""
    with fresh_database(backend) as url:
        yield url


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now and not handed out before in this run: two
    binds in a row can get the same ephemeral port (CI once got it for port and tls.port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def write_config(folder: Path, **overrides: object) -> Path:
    """A pacs.yaml in `folder` with the store and index under it; nested dicts merge."""
    config = {
        "ae_title": "MINIPACS",
        "host": "127.0.0.1",
        "port": free_port(),
        "storage": {"root": "data/store", "fsync": False, "min_free_bytes": 0},
        "database": {"url": "sqlite:///data/index.sqlite"},
        "remote_aes": {},
        "network": {"workers": 1},  # one process; tests/test_workers.py covers several
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = folder / "pacs.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class RunningNode:
    """An in-process node and the handles tests need."""

    def __init__(self, config_path: Path):
        self.config_path = config_path
        self.config = load(config_path)
        self._start()

    def _start(self) -> None:
        self.archive = Archive(self.config)
        self.node = Node(self.config, self.archive)
        self.node.start()
        self.port = self.node.port
        self.ae_title = self.config.ae_title
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.node.stop(grace=5)
            self.archive.close()

    def restart(self) -> None:
        """Stop, then start a new archive and node on the same config (as a restart does)."""
        self.stop()
        self._start()


def on_database(url: str | None, overrides: dict) -> dict:
    """The overrides with `database.url` set to `url` unless they name their own."""
    if url is None or "database" in overrides:
        return overrides
    return {**overrides, "database": {"url": url}}


@pytest.fixture
def make_node(tmp_path, database_url):
    """Factory: make_node(**config overrides) -> RunningNode, stopped at teardown."""
    started = []

    def make(**overrides):
        overrides = on_database(database_url, overrides)
        folder = tmp_path / f"node{len(started)}"
        folder.mkdir()
        running = RunningNode(write_config(folder, **overrides))
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture
def node(make_node):
    return make_node()


def associate(node, contexts=(Verification,), ae_title: str = "TESTSCU", **kwargs):
    """An established pynetdicom association to the node (asserted)."""
    ae = AE(ae_title=ae_title)
    for context in contexts:
        if isinstance(context, tuple):
            ae.add_requested_context(*context)
        else:
            ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, **kwargs)
    assert assoc.is_established
    return assoc


def send_datasets(node, datasets: list[Dataset], **kwargs) -> list[Dataset]:
    """C-STORE each dataset on one association; return the response status datasets.

    Each (SOP class, transfer syntax) pair of the datasets is proposed alone, so
    the data goes on the wire exactly as encoded in that syntax.
    """
    pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    contexts = [(sop_class, [syntax]) for sop_class, syntax in pairs]
    assoc = associate(node, contexts=contexts, **kwargs)
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


class ServeProcess:
    """`pacs serve` in a subprocess; ready once C-ECHO succeeds."""

    def __init__(self, config_path: Path, extra_env: dict | None = None,
                 prefix: tuple[str, ...] = (), tls_args: tuple | None = None,
                 args: tuple[str, ...] = ()):
        """`prefix` goes before the command, e.g. a wrapper that drops privileges; `args` after;
        `tls_args` (pynetdicom's): check readiness on the TLS port with them."""
        self.config_path = config_path
        self.config = load(config_path)
        self.port = self.config.port
        self.tls_args = tls_args
        self.ae_title = self.config.ae_title
        env = {**os.environ, **(extra_env or {})}
        self.log = open(config_path.parent / "serve.log", "wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "pacs", "serve", "--config", str(config_path), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        ae = AE(ae_title="READY")
        ae.add_requested_context(Verification)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pacs serve exited {self.proc.returncode}: {self.log_text()}")
            port = self.config.tls.port if self.tls_args else self.port
            assoc = ae.associate("127.0.0.1", port, ae_title=self.ae_title, tls_args=self.tls_args)
            if assoc.is_established:
                status = assoc.send_c_echo()
                assoc.release()
                if status and status.Status == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"pacs serve not ready: {self.log_text()}")

    def log_text(self) -> str:
        return (self.config_path.parent / "serve.log").read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def serve_process(tmp_path, database_url):
    """Factory: serve_process(prefix=(), tls_args=None, args=(), **config overrides) ->
    ServeProcess, killed at teardown."""
    started = []

    def start(prefix: tuple[str, ...] = (), tls_args: tuple | None = None,
              args: tuple[str, ...] = (), **overrides):
        overrides = on_database(database_url, overrides)
        folder = tmp_path / f"proc{len(started)}"
        folder.mkdir()
        proc = ServeProcess(write_config(folder, **overrides), prefix=prefix, tls_args=tls_args,
                            args=args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def run_pacs(*args: str, config: Path | None = None, timeout: float = 120, cwd: Path | None = None,
             env: Mapping[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """Run the `pacs` CLI (as `python -m pacs`) and capture its output.

    `env` changes this process's environment for the run; a None value removes the variable.
    """
    cmd = [sys.executable, "-m", "pacs", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    environ = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=environ)


def _sha256(uid: object) -> str:
    return hashlib.sha256(str(uid).encode("ascii")).hexdigest()


def stored_path(config: Config, ds: Dataset) -> Path:
    """Where the layout contract puts an instance:
    root/ab/cd/abcd<12>/<16>/<64>.dcm, from the SHA-256 of its study, series and SOP UIDs."""
    study, series = _sha256(ds.StudyInstanceUID)[:16], _sha256(ds.SeriesInstanceUID)[:16]
    return (config.storage.root / study[:2] / study[2:4] / study / series
            / f"{_sha256(ds.SOPInstanceUID)}.dcm")


def stored_file(config: Config, sop_uid: str) -> Path:
    """The file named for this SOP Instance UID, in whichever folder its study put it."""
    name = f"{_sha256(sop_uid)}.dcm"
    found = [path for path in store_files(config) if path.name == name]
    assert len(found) == 1, f"{len(found)} files named for {sop_uid}"
    return found[0]


def store_files(config: Config) -> set[Path]:
    """Every file under the store root except the staging folder."""
    staging = config.storage.root / ".staging"
    return {p for p in config.storage.root.rglob("*") if p.is_file() and staging not in p.parents}


def staging_files(config: Config) -> list[Path]:
    staging = config.storage.root / ".staging"
    return list(staging.iterdir()) if staging.is_dir() else []


def delete_index(config: Config) -> None:
    """Delete the index (a SQLite file with its WAL files, or PostgreSQL tables); the store stays."""
    if not config.database.url.startswith("sqlite:///"):
        with open_index(config.source):
            drop_schema(database.obj)
        return
    database_file = Path(config.database.url.removeprefix("sqlite:///"))
    for path in database_file.parent.glob(database_file.name + "*"):
        path.unlink()


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's bytes after its file meta: the dataset as it was sent."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


class AnnouncedDataset(Dataset):
    """A dataset that tells pynetdicom's SCU another SOP Instance UID than the one it encodes.

    pynetdicom takes the request's Affected SOP Instance UID from `SOPInstanceUID`;
    this client-side trick sends a mismatching or missing UID in the data set.
    """

    def __init__(self, ds: Dataset, announced: str):
        super().__init__(ds)
        self.file_meta = ds.file_meta
        self._announced = announced

    @property
    def SOPInstanceUID(self) -> str:  # noqa: N802 - the DICOM keyword
        return self._announced

    def __contains__(self, name: object) -> bool:
        return name == "SOPInstanceUID" or super().__contains__(name)


@contextmanager
def open_index(config_path: Path) -> Iterator[None]:
    """Connect the index models to a config's database (no in-process node may be running)."""
    open_database(load(config_path).database.url, durable=False)
    try:
        yield
    finally:
        close_database()


def index_snapshot() -> dict[str, set[tuple]]:
    """Every row of the open index by UIDs and counters, comparable across rebuilds."""
    return {
        "patients": set(Patient.select(
            Patient.patient_id, Patient.issuer, Patient.patient_name, Patient.num_studies,
            Patient.num_series, Patient.num_instances).tuples()),
        "studies": set(Study.select(
            Study.study_uid, Patient.patient_id, Patient.issuer, Study.modalities,
            Study.sop_classes, Study.num_series, Study.num_instances).join(Patient).tuples()),
        "series": set(Series.select(
            Series.series_uid, Study.study_uid, Series.modality, Series.num_instances,
        ).join(Study).tuples()),
        "instances": set(Instance.select(
            Instance.sop_uid, Series.series_uid, Instance.path, Instance.size,
            Instance.transfer_syntax).join(Series).tuples()),
    }


