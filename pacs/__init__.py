"""A mini-PACS: a DICOM node that stores, indexes, finds and retrieves images."""

__version__ = "0.1.0"
