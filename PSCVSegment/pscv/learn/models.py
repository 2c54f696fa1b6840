"""Trained models: the network with its metadata (`Model`), saved to and loaded from a model folder.

A model folder holds `model.safetensors` (weights), `model.json` (everything needed to use them) and
`model_card.json` (what a person wants to know about the model: see `model_card`).

Loading never executes code from the file. A model whose format differs, that a newer engine wrote,
or whose classes differ from the ones asked for is refused with a message that says which and why.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import PSCVError, __version__
from ..base.jsonfile import read_json
from ..base.resources import check_memory
from ..data.classes import ClassInfo, classes_to_json, parse_classes
from ..data.formats import MODEL_FILES
from ..data.intensity import check_normalization
from .network import UNet
from .settings import SCHEMA, check_setting, check_settings, describe_method

FORMAT = "pscv-model/1"
WEIGHTS, METADATA, CARD = MODEL_FILES
CARD_FORMAT = "pscv-model-card/1"
NETWORK_KEYS = ("num_classes", "widths", "dropout", "image_size")  # and in_channels 1, architecture "unet2d"


@dataclass
class Model:
    network: UNet
    metadata: dict  # format, engine_version, classes, normalization, network, method, settings, ...

    @property
    def classes(self) -> list[ClassInfo]:
        return parse_classes(self.metadata["classes"], "model")

    @property
    def image_size(self) -> int:
        return int(self.metadata["network"]["image_size"])


def build_metadata(classes, normalization: dict, network: dict, method: str, settings: dict, **extra) -> dict:
    return {"format": FORMAT, "engine_version": __version__, "classes": classes_to_json(classes),
            "normalization": normalization, "network": network, "method": method, "settings": settings, **extra}


def build_network(network: dict) -> UNet:
    """The network a shape describes (`training.shape_of_network`); `auxiliary_decoder` only while training."""
    return UNet(num_classes=network["num_classes"], in_channels=network.get("in_channels", 1),
                widths=network["widths"], dropout=network["dropout"],
                auxiliary_decoder=network.get("auxiliary_decoder", False))


def network_bytes(network: dict) -> int:
    """Bytes of the weights and batch-norm statistics of the network `network` describes (counted on torch's
    "meta" device: nothing is allocated)."""
    import torch

    with torch.device("meta"):
        meta = build_network(network)
    return 4 * sum(t.numel() for t in (*meta.parameters(), *meta.buffers()))


def check_metadata(metadata, source: str) -> dict:
    """A model description (model.json), checked against the settings' schema: classes, normalisation, network
    shape (the same rules as the settings that make it), method and settings. PSCVError naming the item."""
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise PSCVError(f"{source}: model format {found!r} is not {FORMAT!r}; retrain the model with this version "
                        "of pscv")
    missing = [key for key in ("classes", "normalization", "network") if key not in metadata]
    if missing:
        raise PSCVError(f"{source}: damaged model description: {', '.join(missing)} missing; a pscv model.json "
                        "holds format, classes, normalization, network, method and settings (retrain the model)")
    classes = parse_classes(metadata["classes"], f"{source}: classes")
    check_normalization(metadata["normalization"], f"{source}: normalization")
    network = metadata["network"]
    if not isinstance(network, dict) or set(NETWORK_KEYS) - set(network):
        raise PSCVError(f"{source}: network must be an object with {', '.join(NETWORK_KEYS)}; got "
                        f"{str(network)[:80]}")
    check_settings({key: network[key] for key in ("widths", "dropout", "image_size")}, f"{source}: network")
    for key, expected in (("num_classes", len(classes)), ("in_channels", 1), ("architecture", "unet2d")):
        if network.get(key, expected) != expected or isinstance(network.get(key), bool):
            raise PSCVError(f"{source}: network {key}: got {str(network.get(key))[:40]}; it takes {expected!r}"
                            + (f" (the model has {len(classes)} classes)" if key == "num_classes" else ""))
    if "method" in metadata:
        check_setting("method", metadata["method"], source)
    settings = metadata.get("settings") or {}
    if not isinstance(settings, dict):
        raise PSCVError(f"{source}: settings must be an object, got {type(settings).__name__}")
    check_settings({k: v for k, v in settings.items() if k in SCHEMA}, f"{source}: settings")
    return metadata


def model_card(metadata: dict) -> dict:
    """The model card: classes, method (what the loss is made of, e.g. "pce + affinity + pseudo-labels") and
    settings, the data it was trained on (cases, slices, clicks), where
    and how long it trained, its validation Dice (when `pscv train --val` gave a validation set), engine
    version and date. Built from the model's metadata; what a model does not record is null."""
    training = metadata.get("training") or {}
    classes = (metadata.get("classes") or {}).get("classes", [])
    return {
        "format": CARD_FORMAT,
        "engine_version": metadata.get("engine_version"),
        "date": training.get("date"),
        "method": describe_method({"method": metadata.get("method"), **(metadata.get("settings") or {})}),
        "classes": [{"name": c["name"], "value": c["value"]} for c in classes],
        "settings": metadata.get("settings"),
        "network": metadata.get("network"),
        "normalization": metadata.get("normalization"),
        "data": {key: training.get(key) for key in ("cases", "slices", "clicks")},
        "training": {key: training.get(key) for key in ("device", "device_name", "processes", "global_batch",
                                                         "seconds", "images_per_second", "resumed_from_step")},
        "validation": metadata.get("validation"),
    }


def save_model(model: Model, directory: str | Path) -> Path:
    """Write the model folder: a new folder appears whole (written under a temporary name, then renamed; a
    failed write leaves nothing); into a folder that is there (e.g. `pscv train --out` holding a checkpoint)
    each file appears atomically."""
    from ..base.atomic import atomic_folder

    directory = Path(directory)
    if directory.is_dir():
        _write_model_files(model, directory)
    else:
        with atomic_folder(directory) as temporary:
            _write_model_files(model, temporary)
    return directory


def _write_model_files(model: Model, directory: Path) -> None:
    from ..base.atomic import write_text_atomic

    state = {name: tensor.detach().float().cpu().contiguous() for name, tensor in model.network.state_dict().items()}
    write_safetensors(state, directory / WEIGHTS, {"format": FORMAT})
    write_text_atomic(directory / METADATA, json.dumps(model.metadata, indent=2) + "\n")
    write_text_atomic(directory / CARD, json.dumps(model_card(model.metadata), indent=2) + "\n")


def write_safetensors(tensors: dict, path: Path, metadata: dict) -> None:
    """Write tensors to a safetensors file, atomically; its I/O errors raised as OSError, like any other file's
    (a full disk then says so)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from ..base.atomic import atomic_path

    with atomic_path(path) as temporary:
        try:
            save_file(tensors, str(temporary), metadata=metadata)
        except SafetensorError as error:
            found = re.search(r"os error (\d+)", str(error))
            if found is None:
                raise PSCVError(f"{path}: cannot be written ({error})") from None
            number = int(found.group(1))
            raise OSError(number, os.strerror(number), str(path)) from None


def _version_tuple(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in str(version).split(".")[:3])


def load_model(directory: str | Path, classes: list[ClassInfo] | None = None, device="cpu") -> Model:
    """Load a model folder (or its model.json / model.safetensors path); check format, version, classes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if directory.is_file():
        directory = directory.parent
    metadata_path, weights_path = directory / METADATA, directory / WEIGHTS
    for path in (metadata_path, weights_path):
        if not path.is_file():
            raise PSCVError(f"{directory}: not a pscv model folder ({path.name} is missing)")
    metadata = read_json(metadata_path, "model description", fix="; damaged model description: retrain the model")
    version = metadata.get("engine_version", "0") if isinstance(metadata, dict) else "0"
    if _version_tuple(version) > _version_tuple(__version__):
        raise PSCVError(f"{directory}: written by pscv {version}, newer than this pscv {__version__}; upgrade pscv "
                        "(pip install -U pscv) to use it")
    check_metadata(metadata, str(metadata_path))
    model_classes = parse_classes(metadata["classes"], str(metadata_path))
    if classes is not None:
        expected = [(c.name.lower(), c.value) for c in classes]
        found = [(c.name.lower(), c.value) for c in model_classes]
        if expected != found:
            raise PSCVError(f"{directory}: the model was trained for classes "
                            f"{[f'{n}={v}' for n, v in found]}, not {[f'{n}={v}' for n, v in expected]}; "
                            "use a model trained for these classes or change classes.json")
    check_memory(2 * network_bytes(metadata["network"]), f"{directory}: loading this model",
                 "its network is larger than this machine can hold; use a machine with more memory")
    network = build_network(metadata["network"])
    try:
        state = load_file(str(weights_path), device=str(device))
        network.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as error:
        raise PSCVError(f"{weights_path}: damaged or mismatched weights ({str(error).splitlines()[0]})") from None
    return Model(network.to(device).eval(), metadata)
