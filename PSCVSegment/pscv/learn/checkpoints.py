"""Training checkpoints: all an interrupted run needs to go on exactly where it stopped.

One file, `checkpoint.safetensors` in the run's output folder, written atomically (a reader never sees
half of one) by the main process: every few steps, when the run is stopped, and at its end (what
`--resume` with a larger `--iterations` needs to extend a finished run). Tensors are stored with
safetensors: the network's weights and batch-norm statistics (`network.*`), the EMA teacher's
(`teacher.*`), the optimiser's momentum (`optimizer.<parameter>.<name>`), and every process's random-
generator states (`random.<rank>.<name>`: `sampling` (which slices), `augment` (the batch-wide flip/turn,
when it is a generator of its own), `torch` (dropout on the CPU), `cuda` (dropout on the GPU)). Everything
else is JSON in the safetensors header: step, settings, classes, network shape, number of processes, data
set size, loss history and the seconds spent so far. Loading executes no code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import PSCVError, __version__

FORMAT = "pscv-checkpoint/1"
CHECKPOINT = "checkpoint.safetensors"
SHAPE_SETTINGS = ("widths", "dropout", "image_size")  # compared as part of the network shape
# A checkpoint may be resumed to another total number of iterations (a finished run extended, a long one cut)
# as long as it lies beyond the checkpoint's step: `check_extension`.
FREE_SETTINGS = ("iterations",)


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or the folder (a run's output folder) that holds `checkpoint.safetensors`."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def save_checkpoint(path: str | Path, tensors: dict, state: dict) -> None:
    from .models import write_safetensors

    header = {"format": FORMAT, "engine_version": __version__, "state": json.dumps(state)}
    write_safetensors({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, Path(path),
                      header)


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise PSCVError(f"{path}: no such checkpoint (pscv train writes {CHECKPOINT} into its --out folder)")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise PSCVError(f"{path}: not a pscv checkpoint or damaged ({str(error).splitlines()[0]})") from None


def read_state(path: str | Path) -> dict:
    """The JSON part of a checkpoint (no tensor is read); checks the format and the engine version."""
    path = checkpoint_file(path)
    header = _open(path).metadata() or {}
    if header.get("format") != FORMAT:
        raise PSCVError(f"{path}: checkpoint format {header.get('format')!r} is not {FORMAT!r}; start a new run")
    from .models import _version_tuple

    if _version_tuple(header.get("engine_version", "0")) > _version_tuple(__version__):
        raise PSCVError(f"{path}: written by pscv {header['engine_version']}, newer than this pscv {__version__}; "
                        "upgrade pscv to resume it")
    from ..base.jsonfile import parse_json

    state = parse_json(header.get("state", ""), f"{path}: damaged checkpoint description", fix="; start a new run")
    if not isinstance(state, dict):
        raise PSCVError(f"{path}: damaged checkpoint description; start a new run")
    return state


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(tensors, state) of a checkpoint, the tensors on the CPU."""
    path = checkpoint_file(path)
    state = read_state(path)
    handle = _open(path)
    return {name: handle.get_tensor(name) for name in handle.keys()}, state


def run_description(classes, network: dict, settings: dict, processes: int, data: dict | None) -> dict:
    """What a checkpoint must agree with to be resumed: classes, network shape, settings (the device may
    change), number of processes, data set size (`{"slices", "clicks"}`; None: not known yet, not compared)."""
    return {"classes": [f"{c.name}={c.value}" for c in classes], "network": network,
            "settings": {k: v for k, v in settings.items() if k != "device"}, "processes": processes, "data": data}


def check_compatible(path, found: dict, expected: dict) -> None:
    """Refuse, naming every difference, a checkpoint written for another run than `expected` describes."""
    differences = []
    if found.get("classes") != expected["classes"]:
        differences.append(f"classes {found.get('classes')} in the checkpoint, {expected['classes']} here")
    for group, skip in (("network", ()), ("settings", SHAPE_SETTINGS + FREE_SETTINGS)):
        theirs, ours = found.get(group) or {}, expected[group]
        for key in sorted(set(theirs) | set(ours)):
            if key not in skip and theirs.get(key) != ours.get(key):
                differences.append(f"{group} {key} {theirs.get(key)!r} in the checkpoint, {ours.get(key)!r} here")
    if found.get("processes") != expected["processes"]:
        differences.append(f"{found.get('processes')} processes wrote the checkpoint, {expected['processes']} resume "
                           f"it (use --nproc {found.get('processes')})")
    if expected["data"] is not None and found.get("data") != expected["data"]:
        theirs, ours = found.get("data") or {}, expected["data"]
        differences.append(f"data set of {theirs.get('slices')} slices and {theirs.get('clicks')} clicks in the "
                           f"checkpoint, {ours['slices']} slices and {ours['clicks']} clicks here")
    if differences:
        raise PSCVError(f"{path}: cannot resume from this checkpoint, it was written for another run: "
                        f"{'; '.join(differences)}. Resume with the data set, classes and settings it was written "
                        "with, or start a new run without --resume")


def check_extension(path, step: int, iterations: int) -> None:
    """A run resumed from `step` must have steps left to do: `iterations` (the new total) above it."""
    if iterations <= step:
        raise PSCVError(f"{path}: the checkpoint has done {step} iterations already; to extend the run give a larger "
                        f"total (e.g. --iterations {max(2 * step, step + 1000)}); its model is the one saved beside it")


def training_tensors(network, optimizer, teacher, random_states: list[dict]) -> dict:
    """The tensors of a checkpoint: weights, teacher, optimiser state, each process's random states."""
    tensors = {f"network.{k}": v for k, v in network.state_dict().items()}
    if teacher is not None:
        tensors.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
    for index, values in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{index}.{k}": v for k, v in values.items() if isinstance(v, torch.Tensor)})
    for rank, states in enumerate(random_states):
        tensors.update({f"random.{rank}.{name}": state for name, state in states.items()})
    return tensors


def optimizer_description(optimizer) -> dict:
    """The optimiser's state that is not a tensor (its parameter groups), for the JSON part."""
    return {"param_groups": optimizer.state_dict()["param_groups"]}


def restore(path, tensors: dict, state: dict, network, optimizer, teacher, rank: int) -> dict:
    """Load a checkpoint's weights and optimiser state into the run; returns this process's random states."""

    def part(prefix):
        return {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}

    try:
        network.load_state_dict(part("network."))
        if teacher is not None:
            teacher.load_state_dict(part("teacher."))
        optimizer_state = {}
        for name, tensor in part("optimizer.").items():
            index, key = name.split(".", 1)
            optimizer_state.setdefault(int(index), {})[key] = tensor
        optimizer.load_state_dict({"state": optimizer_state, **state["optimizer"]})
    except (RuntimeError, KeyError, ValueError) as error:
        raise PSCVError(f"{path}: damaged or mismatched checkpoint ({str(error).splitlines()[0]})") from None
    random_states = part(f"random.{rank}.")
    if "sampling" not in random_states:
        raise PSCVError(f"{path}: the checkpoint holds no random state of process {rank}")
    return random_states


def random_states(generator, augmenter, device) -> dict:
    """This process's random-generator states: slice sampling, batch-wide augmentation (when it has a
    generator of its own), torch's global state (dropout) and the GPU's."""
    states = {"sampling": generator.get_state(), "torch": torch.get_rng_state()}
    if augmenter is not generator:
        states["augment"] = augmenter.get_state()
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_random_states(states: dict, generator, augmenter, device) -> None:
    generator.set_state(states["sampling"])
    torch.set_rng_state(states["torch"])
    if augmenter is not generator:
        augmenter.set_state(states["augment"])
    if device.type == "cuda" and "cuda" in states:  # a CPU checkpoint resumed on a GPU: dropout differs
        torch.cuda.set_rng_state(states["cuda"], device)
