"""A mini-PACS: a DICOM node that stores, indexes, finds and retrieves images."""
import os

# pydicom imports numpy, whose OpenBLAS starts a thread per extra core that
# spins now and then (~1% of a core each, seen with perf during ingest);
# nothing here does linear algebra. Set before any import of numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
