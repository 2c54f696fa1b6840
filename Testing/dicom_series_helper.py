"""Test helper: write a CT DICOM series (one CT Image Storage file per slice) for a pscv Volume, with pydicom.

Used where the tests need a DICOM series on a given grid (CTChest4 is NRRD only; oblique grids): the
series is made here, not by another tool, and the tests say so.
"""

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def _ds(values) -> list[str]:
    return [f"{float(v):.10g}" for v in values]


def write_ct_series(volume, folder, patient_id="PSCV-TEST") -> list[Path]:
    """One file per slice k of `volume` (int16 pixels), geometry from its origin/spacing/direction."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    orientation = np.concatenate([volume.direction[:, 0], volume.direction[:, 1]])
    paths = []
    for k in range(volume.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Chest", patient_id, "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.Manufacturer, ds.PositionReferenceIndicator = "pscv tests", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = _ds(volume.index_to_lps([0, 0, k]))
        ds.ImageOrientationPatient = _ds(orientation)
        ds.PixelSpacing = _ds([volume.spacing[1], volume.spacing[0]])  # row spacing (j), column spacing (i)
        ds.SliceThickness = f"{volume.spacing[2]:.10g}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.KVP, ds.AcquisitionNumber, ds.PatientPosition = "", "", "HFS"
        ds.PixelData = np.ascontiguousarray(volume.array[k], dtype="<i2").tobytes()
        path = folder / f"slice{k:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
