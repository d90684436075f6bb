"""Small synthetic DICOM instances for tests, built with pydicom (no fixtures on disk)."""
from __future__ import annotations

from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
CR = "1.2.840.10008.5.1.4.1.1.1"
US = "1.2.840.10008.5.1.4.1.1.6.1"
SOP_CLASS = {"CT": CT, "MR": MR, "CR": CR, "US": US}
PREFIX = "1.2.826.0.1.3680043.8.498."


def uid(*parts: object) -> str:
    """A deterministic valid UID from any parts."""
    return generate_uid(prefix=PREFIX, entropy_srcs=[str(p) for p in parts])


def make_instance(
    patient_id: str = "PID1",
    patient_name: str = "DOE^JOHN",
    study: str | None = None,
    series: str | None = None,
    sop: str | None = None,
    modality: str = "CT",
    number: int = 1,
    rows: int = 8,
    cols: int = 8,
    charset: str | None = None,
    **attrs: object,
) -> Dataset:
    """One uncompressed instance with the usual patient/study/series/instance attributes."""
    study = study or uid(patient_id, "study")
    series = series or uid(study, "series", modality)
    sop = sop or uid(series, "instance", number)
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = SOP_CLASS[modality]
    ds.SOPInstanceUID = sop
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC{abs(hash(study)) % 10**8:08d}"
    ds.StudyID = "1"
    ds.StudyDescription = "TEST STUDY"
    ds.ReferringPhysicianName = "REF^DOC"
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"{modality} series"
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((number + i) % 256 for i in range(rows * cols * 2))
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_study(folder: Path | None = None, patient_id: str = "PID1", series: int = 2,
               per_series: int = 3, **attrs: object) -> list[Dataset]:
    """A study of `series` x `per_series` instances; written under `folder` if given."""
    study = uid(patient_id, "study", attrs.get("StudyDescription", ""))
    out = []
    for s in range(series):
        series_uid = uid(study, "series", s)
        for i in range(per_series):
            ds = make_instance(patient_id=patient_id, study=study, series=series_uid,
                               number=i + 1, **attrs)
            ds.SeriesNumber = s + 1
            out.append(ds)
            if folder is not None:
                write(ds, folder / f"s{s}" / f"i{i}.dcm")
    return out
