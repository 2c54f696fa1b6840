"""The one table of file formats: the suffixes pscv reads images and segmentations by, and those it writes.

Everything that decides by a file's name takes its suffixes from here: the image and segmentation
readers and writers, the dataset folder, `pscv export`, the job folder's outputs and its staged inputs,
and the command line's choices and help texts. The README's format table says the same (Testing/test_cli.py
checks both). Suffixes are lower case.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FileFormat:
    name: str  # as the README's format table names it
    suffixes: tuple[str, ...]  # every suffix pscv reads it by
    written: tuple[str, ...] = ()  # the suffixes pscv writes: one file each, so that it appears atomically
    export: str | None = None  # its name for `pscv export --to`


# Images and plain label maps (SimpleITK reads and writes them); each is read as either.
IMAGE_FORMATS = (
    FileFormat("NRRD", (".nrrd", ".nhdr"), (".nrrd",), "nrrd"),
    FileFormat("NIfTI", (".nii", ".nii.gz"), (".nii", ".nii.gz"), "nifti"),
    FileFormat("MetaImage", (".mha", ".mhd"), (".mha",), "mha"),
    FileFormat("Analyze", (".hdr",)),  # with its .img; read only
)
SEG_NRRD = ".seg.nrrd"
SLICER_SEGMENTATION = FileFormat("3D Slicer segmentation", (SEG_NRRD,), (SEG_NRRD,), "seg.nrrd")
DICOM_SEG_SUFFIX = ".dcm"  # what `pscv export` takes a DICOM-SEG name to end in (--to dicom-seg takes any)

# Images (and label maps) found by their names, e.g. the cases of a dataset folder.
IMAGE_SUFFIXES = tuple(s for f in IMAGE_FORMATS for s in f.suffixes)
# One-file images and label maps: what pscv writes, and the images a job folder takes as they are.
ONE_FILE_SUFFIXES = tuple(s for f in IMAGE_FORMATS for s in f.written)
# Segmentations: a 3D Slicer .seg.nrrd, or a plain label map.
SEGMENTATION_SUFFIXES = (SEG_NRRD, *ONE_FILE_SUFFIXES)
READABLE_SEGMENTATION_SUFFIXES = (SEG_NRRD, *IMAGE_SUFFIXES)
# `pscv export --to`: the format -> the suffixes its output must end in (DICOM-SEG: any name).
EXPORT_FORMATS = {
    SLICER_SEGMENTATION.export: SLICER_SEGMENTATION.written,
    **{f.export: f.written for f in IMAGE_FORMATS if f.export},
    "dicom-seg": (),
}


# A model folder's files (pscv.learn.models writes them; named here so that checks need no torch).
MODEL_FILES = ("model.safetensors", "model.json", "model_card.json")


def listing(suffixes, last: str = "or") -> str:
    """`.a, .b or .c`: suffixes in messages and help texts."""
    suffixes = list(suffixes)
    return suffixes[0] if len(suffixes) == 1 else f"{', '.join(suffixes[:-1])} {last} {suffixes[-1]}"
