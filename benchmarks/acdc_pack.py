"""Carry the ACDC volumes to a machine that lacks them (the lent GPU machine takes at most 64 MiB).

    python benchmarks/acdc_pack.py pack ../shared/data/acdc .gpu/acdc.npz.xz
    python benchmarks/acdc_pack.py unpack .gpu/acdc.npz.xz /tmp/acdc

Lossless: each image holds few distinct intensities (the scanner's integers, rescaled), so it is stored
as the table of its distinct float32 values and 16-bit indices into it; labels as they are; the
scribbles are left out. `unpack` writes the same layout as the source
(volumes/*.h5 with float32 `image` and uint8 `label`, and the split files).
"""

import io
import lzma
import sys
from pathlib import Path

import h5py
import numpy as np


def pack(source: Path, target: Path) -> None:
    arrays = {}
    for path in sorted((source / "volumes").glob("*.h5")):
        with h5py.File(path, "r") as file:
            values, index = np.unique(file["image"][:], return_inverse=True)
            assert len(values) <= 65536, f"{path}: too many distinct intensities to pack"
            arrays[f"{path.stem}/values"] = values.astype(np.float32)
            arrays[f"{path.stem}/image"] = index.reshape(file["image"].shape).astype(np.uint16)
            arrays[f"{path.stem}/label"] = file["label"][:].astype(np.uint8)
    for split in ("train", "val"):
        arrays[f"split/{split}"] = np.array((source / f"{split}_patients.txt").read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    target.write_bytes(lzma.compress(buffer.getvalue(), preset=6))  # xz: 25% smaller than zip's deflate here


def unpack(source: Path, target: Path) -> None:
    data = np.load(io.BytesIO(lzma.decompress(source.read_bytes())))
    (target / "volumes").mkdir(parents=True, exist_ok=True)
    for key in data.files:
        group, name = key.split("/")
        if group == "split":
            (target / f"{name}_patients.txt").write_text(str(data[key]))
        elif name == "image":  # "values" and "label" are read with it
            with h5py.File(target / "volumes" / f"{group}.h5", "w") as file:
                file["image"] = data[f"{group}/values"][data[key]]
                file["label"] = data[f"{group}/label"]


if __name__ == "__main__":
    command, source, target = sys.argv[1:4]
    {"pack": pack, "unpack": unpack}[command](Path(source), Path(target))
