"""The training settings (`TrainSettings`) and their schema: every setting's type, range and allowed values.

One schema, in one place: `TrainSettings` checks itself with it, and so do the command line (`--set`),
job folders (`pscv.jobs.folder.read_job`), the service (which adds its own limits) and model files
(`pscv.learn.models` checks the settings and network a model.json records). A bad value is a PSCVError
saying which setting, what it got and what it takes. Imports no torch (the job folder's checks run in
3D Slicer's own process).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, field

from .. import PSCVError
from ..data.intensity import DEFAULT_NORMALIZATION, NORMALIZATION_TAKES, check_normalization

METHODS = ("pscv", "pce", "ms", "full")
DEFAULT_WIDTHS = (16, 32, 64, 128, 256)  # the U-Net's channels per level (pscv.learn.network)
DEFAULT_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)
DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?|mps", re.IGNORECASE)
MAX_LEVELS, MAX_WIDTH = 8, 4096  # no U-Net of this project comes near either

@dataclass
class TrainSettings:
    method: str = "pce"  # pce | pscv | ms | full
    iterations: int = 30000
    batch_size: int = 12
    image_size: int = 256  # slices are resized to image_size x image_size (a multiple of 16)
    learning_rate: float = 0.001  # the first step's; poly decay (power 0.9) to 0 at the last iteration
    optimizer: str = "adam"  # adam (betas 0.9, 0.999) | sgd (momentum; the WSL4MIS recipe, with learning_rate 0.01)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # bfloat16 autocast: auto = on CUDA and on CPUs that compute bfloat16 natively (AVX512-BF16, AMX), where it
    # about halves the time of a step; float32 elsewhere (devices.uses_bfloat16)
    precision: str = "auto"  # auto | float32 | bfloat16
    augment: str = "none"  # none | flip (random flips and 90-degree turns, one for the whole batch) | affine (below)
    # augment=affine: each image its own rotation, scale and intensity change (one for the whole batch with the
    # pscv method, whose contrastive term compares aligned images); no flip, no 90-degree turn (laterality kept)
    augment_rotation: float = 20.0  # degrees, drawn uniformly in +-this
    augment_scale: float = 0.1  # zoom drawn uniformly in 1 +- this
    augment_intensity: float = 0.1  # contrast 1 +- this and brightness +- this (normalised units)
    cv_weight: float = 0.1  # lambda
    cv_temperature: float = 0.1  # tau
    cv_pairing: str = "infonce"  # infonce | supcon
    cv_present_only: bool = True  # contrast only classes clicked in both images
    cv_map: str = "variance"  # variance: p (x - c)^2 | probability: p itself (the prediction's spatial layout)
    cv_pool: int = 1  # average-pool the maps by this factor before contrasting them (1 = full resolution)
    cv_detach_means: bool = False  # stop gradients through the class means c
    cv_warmup: int = 0  # ramp lambda up linearly over this many iterations
    ms_weight: float = 0.1
    # Terms any point-supervised method can add (0 = off):
    affinity_weight: float = 1.0  # CRF-like: neighbours of similar intensity agree (losses.local_affinity)
    affinity_sigma: float = 0.1  # intensity scale of that affinity, in normalised units
    pseudo_weight: float = 1.0  # cross-entropy on an EMA teacher's confident pixels
    pseudo_threshold: float = 0.9
    pseudo_start: float = 0.3  # fraction of the iterations before pseudo-labels start
    ema_decay: float = 0.99
    # Background outside the region around a case's organ clicks (their in-plane box over all slices, grown by
    # outside_margin times its size on each side, at least 8 voxels): cross-entropy to background there (0 = off)
    outside_weight: float = 1.0
    outside_margin: float = 0.5
    # An organ class without a click in a slice with a background click is absent from it (clicks come one per
    # class present): -log(1 - p) of that class over the slice (losses.absent_class_penalty; 0 = off)
    absent_weight: float = 1.0
    # Predictions keep only the largest connected piece of each class that is one piece (learn.pieces: its clicks on
    # the training cases lay in one piece of the trained network's prediction, checked on up to 20 cases)
    largest_piece: bool = True
    # The gated CRF loss as WSL4MIS trains ACDC with it (losses.gated_crf; 0 = off), at a weight of 0.3 where
    # WSL4MIS uses 0.1 (better on both cohorts here: BENCHMARKS.md)
    crf_weight: float = 0.3
    crf_radius: int = 5  # pixels of the network's input
    crf_sigma_xy: float = 6.0  # pixels
    crf_sigma_intensity: float = 0.1  # normalised units
    # DMPLS (0 = off): an auxiliary decoder on dropout-perturbed features; both decoders learn from the clicks
    # (their pCE averaged) and, with this weight, from Dice to the argmax of a random mix of the two
    dmpls_weight: float = 0.0
    dmpls_dropout: float = 0.5  # channel dropout on the features the auxiliary decoder reads
    normalization: dict = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    widths: tuple = DEFAULT_WIDTHS
    dropout: tuple = DEFAULT_DROPOUT
    # Several processes (torchrun; pscv.learn.distributed), each with its own batch of batch_size slices:
    cv_gather: bool = False  # contrast the variance maps of every process's batch, not only its own
    sync_batchnorm: bool = True  # batch-norm statistics over the global batch (GPUs; PyTorch has none on the CPU)

    def __post_init__(self):
        for name, value in check_settings(asdict(self)).items():
            setattr(self, name, value)

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> TrainSettings:
        """Settings from a dict (the command line's, a job's, a model's); defaults for what it leaves out."""
        return cls(**check_settings(data, where))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["widths"], data["dropout"] = list(self.widths), list(self.dropout)
        return data


def describe_method(settings: dict) -> str:
    """What a run's loss is made of, e.g. "pce + outside + gated CRF + affinity + pseudo-labels" (the default),
    "pscv" or "full"."""
    method = settings.get("method", TrainSettings.method)
    if method == "full":
        return method
    terms = (("outside", "outside_weight"), ("absent classes", "absent_weight"), ("gated CRF", "crf_weight"),
             ("affinity", "affinity_weight"), ("pseudo-labels", "pseudo_weight"), ("DMPLS", "dmpls_weight"))
    extra = [name for name, key in terms if settings.get(key, getattr(TrainSettings, key))]
    return " + ".join([method, *extra])


# The schema -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """What one setting takes: `kind` int | number | bool | choice | text, a range, or a check of its own."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed (e.g. a learning rate above 0)
    high_open: bool = False
    choices: tuple = ()
    multiple_of: int = 1
    optional: bool = False  # None allowed

    def takes(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        what = {"int": "an integer", "number": "a number"}[self.kind]
        if self.multiple_of > 1:
            what = f"a multiple of {self.multiple_of}"
        low = None if self.low is None else f"{'above' if self.low_open else 'at least'} {_show(self.low)}"
        high = None if self.high is None else f"{'below' if self.high_open else 'at most'} {_show(self.high)}"
        if low and high and not self.low_open and not self.high_open:
            bounds = f"from {_show(self.low)} to {_show(self.high)}"
        else:
            bounds = " and ".join(part for part in (low, high) if part)
        return f"{what} {bounds}".strip() + (", or null" if self.optional else "")


def _show(number) -> str:
    return str(int(number)) if number == int(number) else f"{number:g}"


def _integer(low, high, **options) -> Setting:
    return Setting("int", low, high, **options)


def _number(low=None, high=None, **options) -> Setting:
    return Setting("number", low, high, **options)


SCHEMA = {
    "method": Setting("choice", choices=METHODS),
    "iterations": _integer(1, 10_000_000),
    "batch_size": _integer(1, 4096),
    "image_size": _integer(32, 4096, multiple_of=16),
    "learning_rate": _number(0, 100, low_open=True),
    "optimizer": Setting("choice", choices=("sgd", "adam")),
    "momentum": _number(0, 1, high_open=True),
    "weight_decay": _number(0, 1),
    "seed": _integer(0, 2**63 - 1),
    "device": Setting("text"),  # DEVICE
    "precision": Setting("choice", choices=("auto", "float32", "bfloat16")),
    "augment": Setting("choice", choices=("none", "flip", "affine")),
    "augment_rotation": _number(0, 180),
    "augment_scale": _number(0, 1, high_open=True),
    "augment_intensity": _number(0, 1),
    "cv_weight": _number(0, 1000),
    "cv_temperature": _number(0, 100, low_open=True),
    "cv_pairing": Setting("choice", choices=("infonce", "supcon")),
    "cv_present_only": Setting("bool"),
    "cv_map": Setting("choice", choices=("variance", "probability")),
    "cv_pool": _integer(1, 4096),
    "cv_detach_means": Setting("bool"),
    "cv_warmup": _integer(0, 10_000_000),
    "ms_weight": _number(0, 1000),
    "affinity_weight": _number(0, 1000),
    "affinity_sigma": _number(0, 1000, low_open=True),
    "pseudo_weight": _number(0, 1000),
    "pseudo_threshold": _number(0, 1),
    "pseudo_start": _number(0, 1),
    "ema_decay": _number(0, 1),
    "outside_weight": _number(0, 1000),
    "outside_margin": _number(0, 100),
    "absent_weight": _number(0, 1000),
    "largest_piece": Setting("bool"),
    "crf_weight": _number(0, 1000),
    "crf_radius": _integer(1, 100),
    "crf_sigma_xy": _number(0, 1000, low_open=True),
    "crf_sigma_intensity": _number(0, 1000, low_open=True),
    "dmpls_weight": _number(0, 1000),
    "dmpls_dropout": _number(0, 1, high_open=True),
    "normalization": Setting("normalization"),
    "widths": Setting("widths"),
    "dropout": Setting("dropout"),
    "cv_gather": Setting("bool"),
    "sync_batchnorm": Setting("bool"),
}
# The single-case mode's own settings (`pscv.learn.single_case.CaseSettings`: how the random walker segments);
# a segment job's or `pscv segment`'s other settings are the network's, in SCHEMA.
CASE_SCHEMA = {
    "region_margin": _number(0, 100),
    "walker_beta": _number(0, 1e9, low_open=True),
    "walker_tolerance": _number(0, 1, low_open=True, high_open=True),
    "suggest": _integer(0, 100_000),
    "train_model": Setting("bool"),
}
# What the settings of their own kind take, in messages.
SPECIAL_TAKES = {
    "device": "auto, cpu, cuda, cuda:N or mps",
    "normalization": NORMALIZATION_TAKES,
    "widths": f"a list of 1 to {MAX_LEVELS} channel counts, each from 1 to {MAX_WIDTH}, e.g. [16, 32, 64, 128, 256]",
    "dropout": "a list of dropout rates from 0 to below 1, one per width (more are not used), e.g. "
               "[0.05, 0.1, 0.2, 0.3, 0.5]",
}


def _bad(key: str, value, where: str, takes: str | None = None, schema=SCHEMA) -> PSCVError:
    prefix = f"{where}: " if where else ""
    shown = repr(value) if not isinstance(value, (list, dict)) else str(value)
    takes = takes or SPECIAL_TAKES.get(key) or schema[key].takes()
    return PSCVError(f"{prefix}setting {key}: got {shown[:80]}; it takes {takes}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_setting(key: str, value, where: str = "", schema=SCHEMA):
    """The value of one setting, checked against the schema (integral floats become ints, lists tuples)."""
    spec = schema[key]
    if value is None and spec.optional:
        return None
    if spec.kind == "choice":
        ok = isinstance(value, str) and value in spec.choices
    elif spec.kind == "bool":
        ok = isinstance(value, bool)
    elif spec.kind == "text":
        ok = isinstance(value, str) and DEVICE.fullmatch(value) is not None
    elif spec.kind == "normalization":
        return check_normalization(value, f"{where}: setting {key}" if where else f"setting {key}")
    elif spec.kind == "widths":
        ok = isinstance(value, (list, tuple)) and 1 <= len(value) <= MAX_LEVELS and all(
            _is_number(w) and w == int(w) and 1 <= w <= MAX_WIDTH for w in value)
        value = tuple(int(w) for w in value) if ok else value
    elif spec.kind == "dropout":
        ok = isinstance(value, (list, tuple)) and 1 <= len(value) <= MAX_LEVELS and all(
            _is_number(d) and 0 <= d < 1 for d in value)
        value = tuple(float(d) for d in value) if ok else value
    else:
        ok = _is_number(value) and (spec.kind == "number" or value == int(value))
        if ok and spec.kind == "int":
            value = int(value)
        ok = ok and _in_range(value, spec)
    if not ok:
        raise _bad(key, value, where, schema=schema)
    return value


def _in_range(value, spec: Setting) -> bool:
    if spec.low is not None and (value < spec.low or spec.low_open and value == spec.low):
        return False
    if spec.high is not None and (value > spec.high or spec.high_open and value == spec.high):
        return False
    return spec.multiple_of == 1 or value % spec.multiple_of == 0


def check_settings(data, where: str = "", schema=SCHEMA) -> dict:
    """`data` (setting -> value), checked: unknown names (with the nearest known one), each value against the
    schema, and the values that depend on each other when they are given together."""
    if not isinstance(data, dict):
        raise PSCVError(f"{where + ': ' if where else ''}settings must be a JSON object such as "
                        f"{{\"iterations\": 300}}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(schema), key=str)
    if unknown:
        hints = [f"{name!r} (did you mean {close[0]}?)" if close else repr(name)
                 for name in unknown for close in [difflib.get_close_matches(str(name), schema, 1)]]
        raise PSCVError(f"{where + ': ' if where else ''}unknown setting(s) {', '.join(hints)}; known: "
                        f"{', '.join(sorted(schema))}")
    checked = {key: check_setting(key, value, where, schema) for key, value in data.items()}
    _check_together(checked, where)
    return checked


def check_case_settings(data, where: str = "") -> dict:
    """The settings of the single-case mode (`pscv segment`, segment jobs): its own (CASE_SCHEMA) and the
    network's (SCHEMA), each checked against its schema; an unknown name is listed with both."""
    if not isinstance(data, dict):
        return check_settings(data, where)
    unknown = sorted(set(data) - set(SCHEMA) - set(CASE_SCHEMA), key=str)
    if unknown:
        hints = [f"{name!r} (did you mean {close[0]}?)" if close else repr(name) for name in unknown
                 for close in [difflib.get_close_matches(str(name), [*CASE_SCHEMA, *SCHEMA], 1)]]
        raise PSCVError(f"{where + ': ' if where else ''}unknown setting(s) {', '.join(hints)}; the segmentation's: "
                        f"{', '.join(CASE_SCHEMA)}; the network's: {', '.join(SCHEMA)}")
    case = check_settings({k: v for k, v in data.items() if k in CASE_SCHEMA}, where, CASE_SCHEMA)
    return {**case, **check_settings({k: v for k, v in data.items() if k not in CASE_SCHEMA}, where)}


def _check_together(values: dict, where: str) -> None:
    """Settings whose allowed values depend on each other: the network's levels and the slice size."""
    widths, dropout, size = values.get("widths"), values.get("dropout"), values.get("image_size")
    if widths is not None and dropout is not None and len(dropout) < len(widths):  # extra rates go unused
        raise _bad("dropout", list(dropout), where, f"a rate per width: {len(widths)} of them for widths "
                   f"{list(widths)}")
    if widths is not None and size is not None and size % 2 ** (len(widths) - 1):
        raise _bad("image_size", size, where, f"a multiple of {2 ** (len(widths) - 1)} for a network of "
                   f"{len(widths)} levels (widths {list(widths)})")
    pool = values.get("cv_pool")
    if pool is not None and size is not None and size % pool:
        raise _bad("cv_pool", pool, where, f"a divisor of image_size {size}")

