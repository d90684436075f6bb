"""Many associations storing at once: every instance lands exactly once, counters add up."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from pacs.index.models import Instance, Patient, Series, Study
from tests.conftest import run_pacs, send_datasets, store_files, stored_path
from tests.dicomgen import CT, MR, US, make_instance, uid, write

ASSOCIATIONS = 8
PER_ASSOCIATION = 25


def store_in_parallel(node, batches: list[list]) -> list[int]:
    """Send each batch on its own association, all starting together; return every status."""
    start = threading.Barrier(len(batches))

    def send(n: int) -> list[int]:
        start.wait()
        return [s.Status for s in send_datasets(node, batches[n], ae_title=f"SCU{n}")]

    with ThreadPoolExecutor(len(batches)) as pool:
        return [status for statuses in pool.map(send, range(len(batches))) for status in statuses]


def series_batch(n: int) -> list:
    """Series n: two patients, two studies, four series per study."""
    study = uid("study", n % 2)
    return [make_instance(patient_id=f"PID{n % 2}", study=study, series=uid(study, "series", n),
                          number=i + 1) for i in range(PER_ASSOCIATION)]


def test_parallel_associations_store_everything_once(node):
    batches = [series_batch(n) for n in range(ASSOCIATIONS)]
    statuses = store_in_parallel(node, batches)
    assert statuses == [0] * ASSOCIATIONS * PER_ASSOCIATION

    sent = {ds.SOPInstanceUID for batch in batches for ds in batch}
    files = {stored_path(node.config, ds) for batch in batches for ds in batch}
    assert len(sent) == ASSOCIATIONS * PER_ASSOCIATION
    assert Instance.select().count() == len(sent)
    assert {i.sop_uid for i in Instance.select()} == sent
    assert store_files(node.config) == files
    assert {s.num_instances for s in Series.select()} == {PER_ASSOCIATION}
    assert Series.select().count() == ASSOCIATIONS
    half = ASSOCIATIONS // 2
    assert {(s.num_series, s.num_instances) for s in Study.select()} == {
        (half, half * PER_ASSOCIATION)}
    assert {(p.num_studies, p.num_series, p.num_instances) for p in Patient.select()} == {
        (1, half, half * PER_ASSOCIATION)}


def test_parallel_duplicates_store_once(node):
    """Four associations send the same instances at the same time."""
    batch = series_batch(0)
    assert store_in_parallel(node, [list(batch) for _ in range(4)]) == [0] * 4 * PER_ASSOCIATION
    assert Instance.select().count() == PER_ASSOCIATION
    assert len(store_files(node.config)) == PER_ASSOCIATION
    assert (Series.get().num_instances, Study.get().num_instances,
            Patient.get().num_instances) == (PER_ASSOCIATION,) * 3


def test_import_while_serving_keeps_study_multi_values(node, tmp_path):
    """`pacs import`, another process, adds a series to a study the node has written to."""
    study = uid("shared study")
    ct, mr, us = (make_instance(study=study, modality=m) for m in ("CT", "MR", "US"))
    assert send_datasets(node, [ct])[0].Status == 0
    result = run_pacs("import", "--no-progress", str(write(mr, tmp_path / "mr.dcm")),
                      config=node.config_path)
    assert result.returncode == 0, result.stderr
    assert send_datasets(node, [us])[0].Status == 0

    row = Study.get()
    assert (row.modalities, row.num_series, row.num_instances) == ("\\CT\\MR\\US\\", 3, 3)
    assert row.sop_classes == "\\" + "\\".join(sorted({CT, MR, US})) + "\\"
    assert Patient.get().num_instances == 3
