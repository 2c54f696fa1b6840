"""The ACDC cine-MRI benchmark data (HiLab-git/WSL4MIS preprocessed volumes) as a pscv dataset folder.

Source volumes: `patientNNN_frameMM.h5` with `image` (slices, H, W) in [0, 1] and `label` (0 background,
1 RV, 2 Myo, 3 LV). No spacing is stored, so the written images have 1 mm voxels: distances (HD95) on
ACDC are in voxels. Clicks are simulated as in the paper: in every slice, one random pixel inside each
class present, background included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import PSCVError
from ..data.classes import ACDC_CLASSES, write_classes
from ..data.clicks import case_seed, simulate_clicks, write_markups
from ..data.volumes import Volume, write_image

HOW_TO_GET = ("get the preprocessed ACDC volumes of HiLab-git/WSL4MIS (data/ACDC: ACDC_training_volumes/*.h5 as "
              "volumes/, and the train/val patient lists as train_patients.txt, val_patients.txt), or pass --data "
              "with the folder that holds them")


def check_acdc_folder(data: Path) -> None:
    """The ACDC folder holds volumes/ and the split files; else a PSCVError naming the folder and the fix."""
    missing = [name for name in ("volumes", "train_patients.txt", "val_patients.txt") if not (data / name).exists()]
    if missing:
        where = f"{data} (that is {data.absolute()})" if not data.is_absolute() else str(data)
        raise PSCVError(f"{where}: not the ACDC folder ({', '.join(missing)} missing): {HOW_TO_GET}")


def read_split(data: Path, split: str) -> list[str]:
    check_acdc_folder(data)
    path = data / f"{split}_patients.txt"
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_acdc_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8), both [k, j, i]."""
    import h5py

    with h5py.File(path, "r") as file:
        return file["image"][:].astype(np.float32), file["label"][:].astype(np.uint8)


def acdc_volumes(data: str | Path, split: str) -> list[Path]:
    data = Path(data)
    volumes = []
    for patient in read_split(data, split):
        found = sorted((data / "volumes").glob(f"{patient}_frame*.h5"))
        if not found:
            raise PSCVError(f"{data / 'volumes'}: no volumes for {patient} listed in {split}_patients.txt")
        volumes.extend(found)
    return volumes


def load_acdc_split(data: str | Path, split: str, seed: int = 0):
    """Yield (case name, Volume, simulated Clicks, dense labels) for every volume of a split, in order."""
    for path in acdc_volumes(data, split):
        image, label = read_acdc_volume(path)
        volume = Volume(image)
        clicks = simulate_clicks(label, case_seed(seed, path.stem), slice_axis=volume.slice_axis())
        yield path.stem, volume, clicks, label


def prepare_acdc(data: str | Path, split: str, out: str | Path, seed: int = 0, progress=None) -> list[str]:
    """Write images/, labels/, points/ and classes.json for one split; returns the case names."""
    out = Path(out)
    total = len(acdc_volumes(data, split))
    write_classes(ACDC_CLASSES, out / "classes.json")
    names = []
    for number, (name, volume, clicks, label) in enumerate(load_acdc_split(data, split, seed)):
        write_image(volume, out / "images" / f"{name}.nrrd")
        write_image(volume.with_array(label), out / "labels" / f"{name}.nrrd")
        write_markups(clicks, volume, ACDC_CLASSES, out / "points" / f"{name}.mrk.json")
        names.append(name)
        if progress:
            progress({"event": "progress", "stage": "prepare", "step": number + 1, "total": total})
    return names
