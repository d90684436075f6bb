"""The node answers C-ECHO and stores what pynetdicom sends."""
from pynetdicom.sop_class import CTImageStorage, Verification

from pacs.index.models import Instance
from tests.conftest import associate
from tests.dicomgen import make_study


def test_echo_and_store(node):
    datasets = make_study(series=1, per_series=3)
    assoc = associate(node, contexts=(Verification, CTImageStorage))
    assert assoc.send_c_echo().Status == 0
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    assert statuses == [0, 0, 0]
    stored = {row.sop_uid for row in Instance.select()}
    assert stored == {str(ds.SOPInstanceUID) for ds in datasets}
