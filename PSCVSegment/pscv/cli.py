"""The `pscv` command line.

Each command is an `_add_<name>(subparsers)` function that declares its arguments and sets
`run=<function>`; `build_parser` lists them in the order `pscv --help` shows. Heavy imports (torch)
happen inside the run functions so that `pscv --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import PSCVError, __version__
from .data.formats import (
    EXPORT_FORMATS,
    IMAGE_FORMATS,
    IMAGE_SUFFIXES,
    MODEL_FILES,
    ONE_FILE_SUFFIXES,
    SEG_NRRD,
    SEGMENTATION_SUFFIXES,
    listing,
)

# Help texts naming file formats, from the one table of them (pscv.data.formats).
IMAGE_HELP = f"{listing([f.name for f in IMAGE_FORMATS])} ({', '.join(IMAGE_SUFFIXES)})"
SEGMENTATION_HELP = f"{SEG_NRRD} (3D Slicer) or a label map ({listing(ONE_FILE_SUFFIXES)})"
ACDC_DATA = "../shared/data/acdc"
ACDC_DATA_HELP = ("the ACDC folder: volumes/*.h5 and train_patients.txt, val_patients.txt, as in HiLab-git/WSL4MIS "
                  "data/ACDC (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pscv",
        description="Segment organs in CT/MRI volumes from a few clicks: one image from its own clicks (segment: a "
        "random walker, seconds), or a 2D U-Net trained from the clicks of a cohort (train) that segments new images "
        "(predict). By default the network's loss is partial cross-entropy on the clicks + a CRF-like affinity + "
        "EMA pseudo-labels (what measured best); --method pscv adds the paper's contrastive variance loss (as "
        "reconstructed here).")
    parser.add_argument("--version", action="version", version=f"pscv {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_segment, _add_train, _add_predict, _add_evaluate, _add_export, _add_prepare, _add_prepare_acdc,
                _add_bench, _add_worker, _add_serve):
        add(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return 2
    restore = _terminate_as_interrupt()
    try:
        return args.run(args) or 0
    except PSCVError as error:
        return _failed(args, str(error))
    except Terminated:
        print(f"pscv {args.command}: stopped (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"pscv {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # a full or read-only disk, a file that went away: no traceback for those
        from .base.paths import describe_os_error

        return _failed(args, describe_os_error(error))
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            raise
        return _failed(args, "out of memory: lower --image-size or --batch-size, or use a machine with more memory")
    finally:
        restore()


def _failed(args, message: str) -> int:
    print(f"pscv {args.command}: error: {message}", file=sys.stderr)
    return 2


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that what is being written is cleaned up as for Ctrl+C."""


def _terminate_as_interrupt():
    """SIGTERM raises Terminated (commands with handlers of their own replace it for their run); returns
    what restores the previous handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(number, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    if "torch" not in sys.modules:  # only torch says it in a RuntimeError
        return False
    from .learn.devices import is_out_of_memory

    return is_out_of_memory(error)


class ConsoleProgress:
    """Prints progress events on stderr: one updating line on a terminal, a line every few seconds in a log."""

    def __init__(self, stream=None, quiet: bool = False):
        self.stream, self.quiet = stream or sys.stderr, quiet  # sys.stderr as it is now, not at import
        self.interactive = self.stream.isatty()
        self.last_stage, self.last_print = None, 0.0

    def __call__(self, event: dict) -> None:
        if self.quiet or event.get("event", "progress") != "progress":
            return
        stage, step, total = event.get("stage"), event.get("step", 0), event.get("total", 0)
        finished = total and step >= total
        now = time.monotonic()
        if not self.interactive and not finished and stage == self.last_stage and now - self.last_print < 5:
            return
        if self.interactive and self.last_stage not in (None, stage):
            self.stream.write("\n")
        parts = [f"[{stage}] {step}/{total}"]
        if event.get("loss") is not None:
            parts.append(f"loss {event['loss']:.4f}")
        if event.get("seconds_left") is not None and not finished:
            parts.append(f"~{event['seconds_left']:.0f} s left")
        if event.get("device"):
            parts.append(f"({event['device']})")
        line = "  ".join(parts)
        self.stream.write(f"\r{line:<70}" if self.interactive else line + "\n")
        if self.interactive and finished:
            self.stream.write("\n")
        self.stream.flush()
        self.last_stage, self.last_print = stage, now


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _add_training_options(parser, methods=True):
    group = parser.add_argument_group("training")
    if methods:
        group.add_argument("--method", choices=["pce", "pscv", "ms", "full"], default=None,
                           help="the base loss: pce = partial cross-entropy on the clicks (default); pscv = pCE + "
                           "contrastive variance (the paper's term, as reconstructed); ms = pCE + Mumford-Shah; "
                           "full = dense labels (upper bound). Every point-supervised method adds by default: "
                           "background outside the box around each case's organ clicks (outside_weight), organs "
                           "without a click in a slice with a background click taken as absent there "
                           "(absent_weight: click every organ on each slice you click), the gated "
                           "CRF (crf_weight), a CRF-like affinity (affinity_weight) and EMA pseudo-labels "
                           "(pseudo_weight); Adam, no augmentation; and each organ found to be one piece keeps its "
                           "largest piece (largest_piece). --set NAME=0 (or false) leaves one out. Mean Dice on the "
                           "val patients with the CPU budget: 0.791 against pce's 0.658 on ACDC, 0.802 against "
                           "0.547 on a second cardiac cohort (BENCHMARKS.md)")
    group.add_argument("--iterations", type=int, help="training iterations (default: depends on the command)")
    group.add_argument("--image-size", type=int, help="slices are resized to this square size (multiple of 16)")
    group.add_argument("--batch-size", type=int, help="slices per training batch")
    group.add_argument("--device", default="auto", help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N, mps")
    group.add_argument("--seed", type=int, help="random seed (default 0): same seed, same model on the same device")
    group.add_argument("--normalize", metavar="MODE",
                       help="intensities: percentile[:LOW:HIGH] (default percentile:0.5:99.5, per volume) or "
                       "window:LOW:HIGH (fixed, e.g. window:-160:240 for abdominal CT)")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any other training setting, e.g. --set cv_weight=0.05 (see docs/ENGINE_API.md)")


def _settings_overrides(args) -> dict:
    """The training settings the user gave on the command line."""
    from .data.intensity import parse_normalization

    overrides = {"device": args.device}
    for key in ("method", "iterations", "image_size", "batch_size", "seed"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if args.normalize:
        overrides["normalization"] = parse_normalization(args.normalize)
    overrides.update(_parse_set(args.set))
    return overrides


def _parse_set(items: list[str]) -> dict:
    """`--set KEY=VALUE` options -> {key: value}, values read as JSON where they are JSON."""
    settings = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise PSCVError(f"--set {item!r}: expected KEY=VALUE, e.g. --set cv_weight=0.05")
        settings[key.strip()] = _parse_value(value.strip())
    return settings


def _add_segment(subparsers):
    from .learn.single_case import CPU_BUDGET, GPU_BUDGET, CaseSettings

    parser = subparsers.add_parser(
        "segment", help="segment one image from its own clicks (and strokes); refine it round after round",
        description="The single-case mode: the clicks (and painted strokes) spread to every voxel of the region "
        "around the organ clicks by a random walker along the image's edges; outside that region is background. "
        "Place one point per class (background included) on some slices, look at the result, add points where it "
        "is wrong and run again: each run takes seconds. --suggest N asks where to click next. --save-model also "
        "trains a network on the result (one that can segment similar images, `pscv predict`): "
        f"{CPU_BUDGET['iterations']} iterations at {CPU_BUDGET['image_size']} px on a CPU, "
        f"{GPU_BUDGET['iterations']} at {GPU_BUDGET['image_size']} px on a GPU; --refine continues such a model "
        "for a short schedule.")
    parser.add_argument("image", help=f"the image: {IMAGE_HELP}, or a DICOM series folder")
    parser.add_argument("--points", nargs="+", required=True, metavar="CLICKS",
                        help="markups files (.mrk.json, .fcsv): point lists named after the classes")
    parser.add_argument("--strokes", nargs="+", default=[], metavar="FILE",
                        help="painted labels as well: a .seg.nrrd whose segments are named after the classes "
                        "(Segment Editor's Paint or Draw; a 'background' segment paints background), or a label map "
                        "of class values (0 = unpainted)")
    parser.add_argument("--classes", required=True, help="classes.json: names, label values, colors")
    parser.add_argument("--out", required=True, help=f"the segmentation: {SEGMENTATION_HELP}")
    parser.add_argument("--suggest", type=int, default=0, metavar="N",
                        help="also write the N places where the result is least sure (at most one per slice), each "
                        "labelled with the class guessed there, to --suggest-out")
    parser.add_argument("--suggest-out", metavar="FILE.mrk.json", help="where --suggest writes its points (a 3D "
                        "Slicer point list 'suggested points'; move a point into a class's list to use it)")
    parser.add_argument("--save-model", metavar="DIR", help="also train a network on the result and save it here")
    parser.add_argument("--refine", metavar="MODEL_DIR", help="continue the network --save-model kept from an "
                        "earlier run on this image, on this run's result (saved back to MODEL_DIR unless "
                        "--save-model names another folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--server", metavar="URL", help="run the job on a `pscv serve` service (e.g. "
                        "http://gpu-box:8000) instead of on this machine; --device then names the server's device")
    _add_token_options(parser, "the service's token")
    _add_training_options(parser, methods=False)
    defaults = CaseSettings()
    parser.epilog = ("segmentation settings (--set KEY=VALUE): " + ", ".join(
        f"{key}={value}" for key, value in defaults.to_dict().items() if key not in ("suggest", "train_model")) +
        "; the other --set keys and the training options are the network's (--save-model, --refine)")
    parser.set_defaults(run=_run_segment)


def _add_token_options(parser, what: str) -> None:
    parser.add_argument("--token-file", metavar="FILE", help=f"a file holding {what} (default: the PSCV_TOKEN "
                        "environment variable)")
    parser.add_argument("--token", help=f"{what} itself; other users of this machine can read it in the process "
                        "list: prefer PSCV_TOKEN or --token-file")


def _token(args) -> str | None:
    """The token of --token-file, --token (with a warning: `ps` shows it) or PSCV_TOKEN, in that order."""
    if args.token_file:
        from .base.paths import describe_os_error

        try:
            token = Path(args.token_file).read_text(encoding="utf-8-sig").strip()
        except OSError as error:
            raise PSCVError(f"--token-file {describe_os_error(error)}") from None
        if not token:
            raise PSCVError(f"--token-file {args.token_file}: the file is empty")
        return token
    if args.token:
        print(f"pscv {args.command}: warning: --token shows in the process list (ps) to every user of this "
              "machine; prefer the PSCV_TOKEN environment variable or --token-file", file=sys.stderr)
        return args.token
    return os.environ.get("PSCV_TOKEN") or None


def _check_segment_arguments(args) -> None:
    """What can be checked before any work: the suggestion options go together and name a markups file; the
    outputs."""
    from .base.paths import check_output_file, check_output_folder

    if args.suggest < 0:
        raise PSCVError(f"--suggest {args.suggest}: give a number of places, 1 or more")
    if bool(args.suggest) != bool(args.suggest_out):
        raise PSCVError("--suggest N and --suggest-out FILE.mrk.json go together")
    if args.suggest_out and not args.suggest_out.lower().endswith(".mrk.json"):
        raise PSCVError(f"--suggest-out {args.suggest_out}: the name must end in .mrk.json (a 3D Slicer point list)")
    if args.refine and not Path(args.refine).is_dir():
        raise PSCVError(f"--refine {args.refine}: no such model folder (the --save-model folder of an earlier run)")
    # The outputs: none is, or would replace, an input (--refine's folder is both: its model is refined in place).
    inputs = [args.image, *args.points, *args.strokes, args.classes]
    check_output_file(args.out, "--out", inputs, SEGMENTATION_SUFFIXES)
    if args.suggest_out:
        check_output_file(args.suggest_out, "--suggest-out", [*inputs, args.out])
    if args.save_model:
        check_output_folder(args.save_model, "--save-model", [*inputs, args.out], MODEL_FILES)


def _segment_inputs(args):
    """(classes, volume, clicks: the strokes' voxels, then the clicks) of a segment command."""
    from .data.classes import read_classes
    from .data.clicks import read_clicks
    from .data.segmentations import read_strokes
    from .data.volumes import read_image

    classes = read_classes(args.classes)
    volume = read_image(args.image)
    clicks = read_clicks(args.points, volume, classes)
    for path in args.strokes:
        clicks = read_strokes(path, classes, volume).extended(clicks)
    return classes, volume, clicks


def _run_segment(args):
    from .learn.single_case import model_settings, split_settings

    _check_segment_arguments(args)
    classes, volume, clicks = _segment_inputs(args)
    case, network = split_settings({**_settings_overrides(args), "suggest": args.suggest})
    model_dir = args.save_model or args.refine
    network_only = sorted(set(network) - {"device", "normalization"})
    if network_only and not model_dir:
        model_settings(**network)  # a key that is no setting at all is named as such
        raise PSCVError(f"{', '.join(network_only)}: the network's settings; they apply with --save-model DIR or "
                        "--refine MODEL_DIR (the segmentation's settings are in `pscv segment --help`)")
    if args.server:  # the inputs are checked here, the job runs there
        return _run_segment_on_server(args, volume, classes)
    from .data.clicks import write_suggestions
    from .data.segmentations import write_segmentation
    from .learn.single_case import check_refinable, segment_case, suggest_points, train_case_model

    initial = None
    if args.refine:  # torch is imported only when a network is trained
        from .learn.models import load_model

        initial = load_model(args.refine, classes)
        check_refinable(initial, volume, args.refine)
    settings = model_settings(refine=initial is not None, **network) if model_dir else None  # checked before work
    started = time.monotonic()
    progress = ConsoleProgress(quiet=args.quiet)
    result = segment_case(volume, clicks, classes, case, network.get("normalization"), progress)
    write_segmentation(args.out, result.labelmap, volume, classes)
    done = [f"{len(clicks)} clicks, {time.monotonic() - started:.1f} s"]
    if case.suggest:
        write_suggestions(suggest_points(result, classes, volume.slice_axis(), case.suggest), volume, classes,
                          args.suggest_out)
        done.append(f"{case.suggest} suggestions in {args.suggest_out}")
    if model_dir:
        from .learn.models import save_model

        model = train_case_model(volume, result, classes, settings, len(clicks), initial, progress)
        save_model(model, model_dir)
        done.append(f"model in {model_dir}: {settings.iterations} iterations on {model.metadata['training']['device']}")
    print(f"wrote {args.out} ({'; '.join(done)}; {time.monotonic() - started:.1f} s in all)")


def _run_segment_on_server(args, volume, classes):
    """`pscv segment --server URL`: the same job on a `pscv serve` service, with the same output."""
    import tempfile

    from .data.segmentations import read_segmentation, write_segmentation
    from .jobs.client import JobClient

    started = time.monotonic()
    settings = {**_settings_overrides(args), "suggest": args.suggest,
                "train_model": bool(args.save_model or args.refine)}
    job = JobClient(args.server, token=_token(args)).submit(
        "segment", image=args.image, points=args.points, classes=args.classes, settings=settings,
        strokes=args.strokes or None, model=args.refine)
    progress = ConsoleProgress(quiet=args.quiet)
    try:
        for event in job.events():
            if event["event"] == "queued" and not args.quiet:
                print(f"pscv segment: {event['message']}", file=sys.stderr)
            elif event["event"] == "warning" and not args.quiet:
                print(f"pscv segment: warning: {event['message']}", file=sys.stderr)
            progress(event)
    except KeyboardInterrupt:
        job.cancel()
        raise
    if job.state != "done":
        raise PSCVError(f"{args.server}: job {job.id} {job.state}: {job.message}")
    if args.out.lower().endswith(".seg.nrrd"):
        job.download("segmentation", args.out)
    else:  # the service writes .seg.nrrd; another format is converted here
        with tempfile.TemporaryDirectory(prefix="pscv-") as staging:
            downloaded = job.download("segmentation", Path(staging) / "result.seg.nrrd")
            write_segmentation(args.out, read_segmentation(downloaded, classes, volume), volume, classes)
    if args.suggest:
        job.download("suggestions", args.suggest_out)
    if args.save_model or args.refine:
        job.download("model", args.save_model or args.refine)
    print(f"wrote {args.out} (job {job.id} on {args.server}, {job.device}, {time.monotonic() - started:.1f} s)")


def _add_train(subparsers):
    from .learn.budgets import COHORT_CPU_BUDGET, COHORT_GPU_BUDGET, describe

    parser = subparsers.add_parser(
        "train", help="train a model on a dataset folder",
        description="Train on a dataset folder: DATASET/classes.json, DATASET/images/<case>"
        f"{'|'.join(IMAGE_SUFFIXES)}, DATASET/points/<case>.mrk.json (and DATASET/labels/<case>.* for --method "
        "full). The model folder gets model.safetensors, model.json and model_card.json (classes, settings, data, "
        "device, time, validation Dice). Iterations, image size and batch size left out follow the device: on a "
        f"CPU {describe(COHORT_CPU_BUDGET)} (tens of minutes on 2 cores), on a GPU the paper profile, "
        f"{describe(COHORT_GPU_BUDGET)}; give --iterations, --image-size, --batch-size to choose.")
    parser.add_argument("dataset", help="the dataset folder")
    parser.add_argument("--out", required=True, help="folder to write the model to (model.safetensors + model.json)")
    parser.add_argument("--val", metavar="DATASET", help="a dataset folder with labels/ (same classes): the model's "
                        "Dice on it goes into its model card")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    _add_training_options(parser)
    group = parser.add_argument_group("several processes and checkpoints")
    group.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train in N processes on this machine (one per GPU; or CPU processes) under torchrun "
                       "with DistributedDataParallel, each on its own shard of the slices. --batch-size is per "
                       "process: the global batch is batch_size x N; the learning rate and its schedule per step "
                       "are those of one process (not scaled with N). --set cv_gather=true lets the contrastive "
                       "variance loss see the global batch. Started by torchrun yourself (several machines), "
                       "pscv train finds the processes without --nproc")
    group.add_argument("--checkpoint-every", type=int, default=1000, metavar="K",
                       help="write OUT/checkpoint.safetensors every K steps (default 1000; 0: never), when Ctrl+C "
                       "or SIGTERM stops the run, and at its end: the finished run's state (weights, optimiser, EMA "
                       "teacher, random states; about 3x the model's size) stays beside the model so that --resume "
                       "can extend it; delete it if you will not")
    group.add_argument("--resume", metavar="CHECKPOINT",
                       help="continue a run from its checkpoint (the file, or the OUT folder holding it): same data "
                       "set, classes and number of processes; settings left out are the checkpoint's. An "
                       "interrupted run ends where it would have; with --iterations N above the checkpoint's step, "
                       "a finished or shortened run goes on to N iterations in all: the learning rate then follows "
                       "the poly schedule of an N-iteration run from that step (it rises again after the end of a "
                       "shorter schedule and decays to 0 at step N), pseudo-labels that had started go on")
    parser.set_defaults(run=_run_train)


def _train_settings(args):
    """TrainSettings from the command line: the device's budget for iterations, image size and batch size left
    out (`training.cohort_budget`); with --resume, the checkpoint's settings for options left out."""
    from .learn.training import TrainSettings, cohort_settings

    overrides = _settings_overrides(args)
    if args.resume:
        from .learn.checkpoints import read_state

        return TrainSettings.from_dict({**read_state(args.resume)["run"]["settings"], **overrides})
    return cohort_settings(**overrides)


def _budget_note(args, settings) -> str:
    """What chose the run's length: the checkpoint, the device's budget, or the command line."""
    from .learn.budgets import COHORT_CPU_BUDGET
    from .learn.training import cohort_budget

    if args.resume:
        return f" (resumed from {args.resume})"
    if all(getattr(args, key) is not None for key in ("iterations", "image_size", "batch_size")):
        return ""
    which = "CPU" if cohort_budget(settings.device) == COHORT_CPU_BUDGET else "GPU"
    return f" (the {which} budget for what the command line left out; --iterations etc. to change it)"


def _stop_on_signals():
    """SIGINT and SIGTERM ask the training to stop after its current step (it writes a checkpoint first); a
    signal at least 2 s after the first stops at once. Returns (should_stop, restore the previous handlers)."""
    import signal
    import threading

    asked = []

    def handler(number, frame):
        if asked and time.monotonic() - asked[0] > 2:
            raise KeyboardInterrupt
        asked[:] = asked or [time.monotonic()]

    if threading.current_thread() is not threading.main_thread():
        return (lambda: False), (lambda: None)
    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    return (lambda: bool(asked)), (lambda: [signal.signal(n, h) for n, h in previous.items()])


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line without --nproc (torchrun would take it for its own --nproc-per-node)."""
    kept, skip = [], False
    for token in argv:
        name = token.split("=", 1)[0]
        if skip or len(name) > 3 and "--nproc".startswith(name):
            skip = not skip and "=" not in token
            continue
        kept.append(token)
    return kept


def _check_resume(args, settings, processes: int) -> None:
    """With --resume, refuse at once a checkpoint of another run (its data set is compared by train())."""
    if not args.resume:
        return
    from .data.dataset import read_dataset
    from .learn.checkpoints import check_compatible, read_state, run_description
    from .learn.training import shape_of_network

    classes, _ = read_dataset(args.dataset)
    expected = run_description(classes, shape_of_network(classes, settings, training=True), settings.to_dict(),
                               processes, None)
    check_compatible(args.resume, read_state(args.resume)["run"], expected)


def _launch_train(args):
    """`pscv train --nproc N`: check what can be checked here, then run this command in N processes."""
    from .data.dataset import read_dataset
    from .learn.devices import resolve_device
    from .learn.distributed import launch

    settings = _train_settings(args)
    read_dataset(args.dataset)
    if args.val:
        read_dataset(args.val)
    device = resolve_device(settings.device)
    if device.type == "cuda":
        import torch

        if device.index is not None or args.nproc > torch.cuda.device_count():
            raise PSCVError(f"--nproc {args.nproc} --device {settings.device}: each process needs a GPU of its own "
                            f"and torch sees {torch.cuda.device_count()}; give --device cuda (or auto) and at most "
                            "that many processes (CUDA_VISIBLE_DEVICES chooses which GPUs)")
    elif device.type != "cpu":
        raise PSCVError(f"--nproc {args.nproc}: device {device.type!r} cannot be shared by several processes; "
                        "use --device cuda or cpu")
    _check_resume(args, settings, args.nproc)
    status, stopped = launch(args.nproc, _without_nproc(args.argv))
    if status == 0:
        return 0
    if stopped:  # rank 0 has said where the checkpoint is (torchrun adds a traceback of the signal)
        return 130
    print(f"pscv train: the {args.nproc} training processes failed (torchrun exit status {status}); their messages "
          "are above", file=sys.stderr)
    return 2


def _run_train(args):
    from .learn.distributed import from_environment

    processes = from_environment()
    if args.nproc < 1:
        raise PSCVError(f"--nproc {args.nproc}: give at least 1 process")
    if args.checkpoint_every < 0:
        raise PSCVError(f"--checkpoint-every {args.checkpoint_every}: give a number of steps, or 0 for never")
    if processes.main:
        from .base.paths import check_output_folder

        check_output_folder(args.out, "--out", [args.dataset, args.val], MODEL_FILES)
    if args.nproc > 1 and processes.size == 1:  # not yet started by torchrun: start the processes
        return _launch_train(args)
    import warnings

    from .base.progress import Cancelled
    from .data.dataset import load_training_cases
    from .learn.budgets import describe
    from .learn.checkpoints import CHECKPOINT
    from .learn.inference import evaluate_model
    from .learn.models import save_model
    from .learn.training import train

    if not processes.main:  # rank 0 speaks for all
        warnings.simplefilter("ignore")
    settings = _train_settings(args)
    _check_resume(args, settings, processes.size)
    classes, cases = load_training_cases(args.dataset, settings.method)
    checkpoint = Path(args.out) / CHECKPOINT
    if processes.main:
        together = f" in {processes.size} processes (global batch {settings.batch_size * processes.size})" \
            if processes.size > 1 else ""
        print(f"training {settings.method} on {len(cases)} cases: {describe(settings.to_dict())}{together}"
              f"{_budget_note(args, settings)}", file=sys.stderr)
        if checkpoint.is_file() and not args.resume:
            print(f"pscv train: {checkpoint} (the state of an earlier run) will be replaced; --resume {args.out} "
                  "would continue it", file=sys.stderr)
    should_stop, restore_signals = _stop_on_signals()
    try:
        model = train(cases, classes, settings, progress=ConsoleProgress(quiet=args.quiet), should_stop=should_stop,
                      checkpoint_dir=args.out, checkpoint_every=args.checkpoint_every, resume=args.resume,
                      final_checkpoint=args.checkpoint_every > 0)
    except Cancelled as stop:
        if processes.main:
            options = (f" --nproc {processes.size}" if processes.size > 1 else "") + \
                (f" --device {settings.device}" if settings.device != "auto" else "")
            print(f"pscv train: {stop}; continue with: pscv train {args.dataset} --out {args.out} --resume "
                  f"{checkpoint}{options}", file=sys.stderr)
        return 130
    finally:
        restore_signals()
    if not processes.main:
        return 0
    if args.val:
        model.metadata["validation"] = evaluate_model(model, args.val, settings.device)
    save_model(model, args.out)  # the run's final state stays in checkpoint.safetensors: --resume extends it
    info = model.metadata["training"]
    validation = model.metadata.get("validation")
    print(f"wrote {args.out} ({info['slices']} slices, {info['clicks']} clicks, {info['seconds']:.0f} s on "
          f"{info['device']}" + (f" x {info['processes']}" if info["processes"] > 1 else "")
          + f", {info['images_per_second']} images/s"
          + (f", validation mean Dice {validation['mean_dice']:.4f}" if validation else "") + ")")


def _add_predict(subparsers):
    parser = subparsers.add_parser(
        "predict", help="segment images with a trained model",
        description="Segment an image, or every image of a folder, with a model written by pscv train or pscv "
        "segment --save-model (a model saved by segment was trained on its click region only: it suits images "
        "cropped alike). A folder's results are named after its images: <case>FORMAT in the --out folder.")
    parser.add_argument("image", help="an image file, a DICOM series folder, or a folder of image files")
    parser.add_argument("--model", required=True, help="a model folder written by pscv train or segment")
    parser.add_argument("--out", required=True,
                        help=f"output file for one image: {SEGMENTATION_HELP}; a folder for a folder")
    parser.add_argument("--format", default=SEG_NRRD, choices=SEGMENTATION_SUFFIXES,
                        help=f"file type written for each image of a folder (default {SEG_NRRD})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(run=_run_predict)


def _predict_jobs(args) -> list:
    """(image, output) pairs, every output checked first: none is, or would replace, an input."""
    from .base.paths import check_output_file, check_output_folder
    from .data.dataset import find_images

    source, out = Path(args.image), Path(args.out)
    model_files = [Path(args.model) / name for name in MODEL_FILES]
    images = find_images(source) if source.is_dir() else {}
    if not images:  # one image: a file, or a DICOM series folder
        return [(source, check_output_file(out, "--out", [source, *model_files], SEGMENTATION_SUFFIXES))]
    check_output_folder(out, "--out", [source])
    jobs = [(path, out / f"{name}{args.format}") for name, path in images.items()]
    for _, destination in jobs:
        check_output_file(destination, "--out", [*images.values(), *model_files])
    return jobs


def _run_predict(args):
    from .data.segmentations import write_segmentation
    from .data.volumes import read_image
    from .learn.inference import predict_volume
    from .learn.models import load_model

    jobs = _predict_jobs(args)
    model = load_model(args.model)
    progress = ConsoleProgress(quiet=args.quiet)
    for path, destination in jobs:
        volume = read_image(path)
        started = time.monotonic()
        labelmap = predict_volume(model, volume, args.device, progress=progress)
        write_segmentation(destination, labelmap, volume, model.classes)
        print(f"wrote {destination} ({time.monotonic() - started:.1f} s)")


def _add_evaluate(subparsers):
    parser = subparsers.add_parser(
        "evaluate", help="Dice and HD95 of predictions against ground truth",
        description="Compare segmentations with ground truth on the native grid: Dice and HD95 (mm, through the "
        "voxel spacing) per class and their mean. Both may be files or folders (matched by case name).")
    parser.add_argument("predictions", help="a segmentation file or a folder of them")
    parser.add_argument("ground_truth", help="a ground-truth file or a folder of them")
    parser.add_argument("--classes", help="classes.json (default: the segments of the first .seg.nrrd, or the "
                        "classes.json of the ground truth's dataset folder)")
    parser.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    parser.set_defaults(run=_run_evaluate)


def _pair_files(predictions: Path, truths: Path) -> list[tuple[str, Path, Path]]:
    from .data.dataset import case_name, find_segmentations

    for path in (predictions, truths):
        if not path.exists():
            raise PSCVError(f"{path}: no such file or folder")
    if predictions.is_file() and truths.is_file():
        return [(case_name(truths) or truths.name, predictions, truths)]
    if not (predictions.is_dir() and truths.is_dir()):
        raise PSCVError(f"{predictions} and {truths}: give two files or two folders (one is a file, the other a "
                        "folder)")
    found, expected = find_segmentations(predictions), find_segmentations(truths)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise PSCVError(f"{predictions}: no prediction for {len(missing)} case(s) of {truths}: "
                        f"{', '.join(missing[:5])}")
    return [(name, found[name], expected[name]) for name in sorted(expected)]


def _evaluation_classes(args, pairs):
    from .data.classes import read_classes
    from .data.segmentations import segmentation_classes

    if args.classes:
        return read_classes(args.classes)
    for candidate in (Path(args.ground_truth) / "classes.json", Path(args.ground_truth).parent / "classes.json"):
        if candidate.is_file():
            return read_classes(candidate)
    for _, prediction, truth in pairs[:1]:
        for path in (prediction, truth):
            if path.name.endswith(".seg.nrrd"):
                return segmentation_classes(path)
    raise PSCVError("no class list: give --classes classes.json (or .seg.nrrd files, whose segments name them)")


def _run_evaluate(args):
    from .data.metrics import evaluate_case, mean_scores
    from .data.segmentations import read_segmentation
    from .data.volumes import read_image

    if args.json:
        from .base.paths import check_output_file

        check_output_file(args.json, "--json", [args.predictions, args.ground_truth, args.classes])
    pairs = _pair_files(Path(args.predictions), Path(args.ground_truth))
    classes = _evaluation_classes(args, pairs)
    per_case = {}
    for name, prediction, truth in pairs:
        reference = read_image(truth)
        truth_map = read_segmentation(truth, classes, reference)
        prediction_map = read_segmentation(prediction, classes, reference)
        per_case[name] = evaluate_case(prediction_map, truth_map, classes, reference.spacing[::-1])
    names = [c.name for c in classes if c.value != 0] + ["mean"]
    summary = {n: mean_scores([scores[n] for scores in per_case.values()]) for n in names}
    print(f"{'class':<16}{'Dice':>8}{'HD95 mm':>10}   ({len(per_case)} case(s))")
    for n in names:
        print(f"{n:<16}{summary[n]['dice']:>8.4f}{summary[n]['hd95']:>10.2f}")
    if args.json:
        from .base.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps({"summary": summary, "cases": per_case}, indent=2) + "\n")


def _add_prepare(subparsers):
    parser = subparsers.add_parser(
        "prepare", help="turn a folder of labelled cases into a dataset folder with simulated clicks",
        description="Write DATASET/images, labels, points and classes.json from a folder of labelled cases, "
        "simulating a clicking user: in every n-th slice (along the axis of largest spacing), random pixels inside "
        "each class present, background included, seeded per case. LABELLED_DIR holds images/<case>.* with "
        "labels/<case>.* (or nnU-Net's imagesTr/labelsTr), or pairs image_<id>.* and label_<id>.* (the case is "
        "named <id>), or <case>.* and <case>_label.*. Label maps may be stored as floats; a value that no class "
        "has is an error.")
    parser.add_argument("labelled", metavar="LABELLED_DIR", help="the folder of images and label maps")
    parser.add_argument("--classes", help="classes.json: names and label values (default LABELLED_DIR/classes.json)")
    parser.add_argument("--out", required=True, metavar="DATASET", help="the dataset folder to write")
    parser.add_argument("--clicks-per-class", type=int, default=1, metavar="N",
                        help="clicks per class present in each clicked slice (default 1)")
    parser.add_argument("--every-nth-slice", type=int, default=1, metavar="N",
                        help="click slices 0, N, 2N, ... only (default 1: every slice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated clicks (default 0)")
    parser.add_argument("--cases", metavar="LIST_FILE",
                        help="only the cases listed in this file (one case name or id a line), e.g. a train split")
    parser.set_defaults(run=_run_prepare)


def _run_prepare(args):
    from .data.classes import read_classes
    from .data.prepare import prepare_dataset, read_case_list

    classes = read_classes(args.classes) if args.classes else None
    cases = read_case_list(args.cases) if args.cases else None
    names = prepare_dataset(args.labelled, args.out, classes, args.clicks_per_class, args.every_nth_slice, args.seed,
                            cases, progress=ConsoleProgress())
    print(f"wrote {len(names)} cases to {args.out}")


def _add_prepare_acdc(subparsers):
    parser = subparsers.add_parser(
        "prepare-acdc", help="convert the ACDC volumes into a dataset folder with simulated clicks",
        description="Write DATASET/images, labels, points (one random click per class present in every slice, "
        "background included, seeded) and classes.json for the patients of one split.")
    parser.add_argument("--data", default=ACDC_DATA, help=ACDC_DATA_HELP)
    parser.add_argument("--split", choices=["train", "val"], required=True)
    parser.add_argument("--out", required=True, help="the dataset folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated clicks (default 0)")
    parser.set_defaults(run=_run_prepare_acdc)


def _run_prepare_acdc(args):
    from .base.paths import check_output_folder
    from .research.acdc import prepare_acdc

    check_output_folder(args.out, "--out", [args.data])
    names = prepare_acdc(args.data, args.split, args.out, args.seed, progress=ConsoleProgress())
    print(f"wrote {len(names)} cases to {args.out}")


def _add_bench(subparsers):
    from .learn.budgets import COHORT_CPU_BUDGET, COHORT_GPU_BUDGET, describe

    parser = subparsers.add_parser(
        "bench", help="benchmarks: the recipes on ACDC or on any two dataset folders; the interactive session vs "
        "Grow from seeds",
        description="acdc: train every recipe with the same clicks and seed on the ACDC train patients, evaluate on "
        "the val patients. interactive: a simulated user session of the single-case mode (round 0: one random click "
        "per class present per slice, background included; each later round one click per slice at the most "
        "interior pixel of the largest wrong region, with its true class), beside 3D Slicer's Grow from seeds "
        "(FastGrowCut) on the same clicks, a session started from strokes, and one clicking the suggested places; "
        "on the ACDC val patients, or on a dataset folder with labels (--data). cohort: the "
        "same recipes trained on the dataset folder --train and evaluated on the labelled cases of --val (e.g. two "
        "splits that pscv prepare wrote from a labelled cohort: one random click per class present per slice, "
        "background included, fixed seed; HD95 in mm). Writes a Markdown table (Dice and HD95 per class), a JSON "
        "file and a picture to --out.")
    parser.add_argument("dataset", choices=["acdc", "interactive", "cohort"], help="the benchmark")
    parser.add_argument("--profile", choices=["quick", "paper"], default="quick",
                        help=f"quick: {describe(COHORT_CPU_BUDGET)}, pscv train's CPU budget; paper: "
                        f"{describe(COHORT_GPU_BUDGET)}, its GPU budget")
    parser.add_argument("--data", default=ACDC_DATA, help="acdc, interactive: the ACDC folder (volumes/, "
                        "*_patients.txt); interactive also takes a dataset folder with labels/ (pscv prepare) "
                        "(default: %(default)s)")
    parser.add_argument("--split", default="val", choices=["train", "val"],
                        help="interactive on ACDC: the patients (default: val; tune on train)")
    parser.add_argument("--cases", type=int, help="interactive: only the first N volumes")
    parser.add_argument("--rounds", type=int, default=4, help="interactive: correction rounds after round 0 "
                        "(default: %(default)s)")
    parser.add_argument("--train", metavar="DATASET", help="cohort: the dataset folder to train on (points/; "
                        "labels/ for full)")
    parser.add_argument("--val", metavar="DATASET", help="cohort: the dataset folder to evaluate on (labels/)")
    parser.add_argument("--out", help="folder for the results (default runs/bench-acdc, runs/bench-interactive or "
                        "runs/bench-cohort)")
    parser.add_argument("--methods", help="comma-separated recipes to train: default (what pscv train does), "
                        "pce, ms, pscv (plain losses), pce+aff+pl (pCE + affinity + pseudo-labels), "
                        "pscv+aff+pl, pscv+default, full; or none (the report of what --out already holds). "
                        "Default: pce,ms,pscv,pce+aff+pl,default,full for acdc, pce,pscv,default,full for cohort. "
                        "interactive: pscv, grow_from_seeds, pscv_strokes, pscv_suggested (default: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--seed", type=int, default=0, help="training seed (acdc: also the clicks' seed)")
    parser.add_argument("--iterations", type=int, help="override the profile's iterations")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a training setting for every method, e.g. --set cv_weight=0.05")
    parser.set_defaults(run=_run_bench)


def _run_bench(args):
    from .base.paths import check_output_folder
    from .research.bench import COHORT_RECIPES, DEFAULT_RECIPES, run_acdc_benchmark, run_cohort_benchmark

    args.out = args.out or f"runs/bench-{args.dataset}"
    check_output_folder(args.out, "--out", [args.train, args.val] if args.dataset == "cohort" else [args.data])
    if args.dataset == "interactive":
        return _run_bench_interactive(args)
    overrides = _parse_set(args.set)
    chosen = args.methods or ",".join(DEFAULT_RECIPES if args.dataset == "acdc" else COHORT_RECIPES)
    methods = [] if chosen == "none" else [m.strip() for m in chosen.split(",") if m.strip()]
    common = dict(profile=args.profile, methods=methods, device=args.device, seed=args.seed,
                  iterations=args.iterations, overrides=overrides, progress=ConsoleProgress(),
                  command="pscv " + " ".join(sys.argv[1:]))
    if args.dataset == "acdc":
        return run_acdc_benchmark(args.data, args.out, **common)
    if not (args.train and args.val):
        raise PSCVError("bench cohort needs --train DATASET and --val DATASET (dataset folders, e.g. from pscv "
                        "prepare)")
    run_cohort_benchmark(args.train, args.val, args.out, **common)


def _run_bench_interactive(args):
    from .research.interactive import METHODS, run_interactive_benchmark

    if args.rounds < 0 or (args.cases is not None and args.cases < 1):
        raise PSCVError("--rounds must be 0 or more and --cases 1 or more")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(METHODS)
    run_interactive_benchmark(args.data, args.out, args.split, args.cases, args.rounds,
                              methods, args.seed, _parse_set(args.set))


def _add_export(subparsers):
    parser = subparsers.add_parser(
        "export", help=f"convert a segmentation to DICOM-SEG, {', '.join(f.name for f in IMAGE_FORMATS if f.export)} "
        f"or 3D Slicer {SEG_NRRD}",
        description="Convert SEG (a .seg.nrrd or a label map) to another format. DICOM-SEG references the DICOM "
        "series given by --reference; for the other formats --reference (an image or DICOM folder) is optional "
        "and puts the segmentation on that image's grid.")
    parser.add_argument("segmentation", metavar="SEG", help=f"a {SEG_NRRD} or label map ({', '.join(IMAGE_SUFFIXES)})")
    parser.add_argument("--to", choices=list(EXPORT_FORMATS),
                        help="output format (default: from the --out extension)")
    parser.add_argument("--reference", help="the source image: for dicom-seg the DICOM series folder (required)")
    parser.add_argument("--series", help="SeriesInstanceUID, when the --reference folder holds several series")
    parser.add_argument("--classes", help="classes.json (optional for a .seg.nrrd, whose segments name them)")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.set_defaults(run=_run_export)


def _run_export(args):
    from .base.paths import check_output_file
    from .data.classes import read_classes
    from .data.segmentations import export_segmentation

    check_output_file(args.out, "--out", [args.segmentation, args.reference, args.classes])
    classes = read_classes(args.classes) if args.classes else None
    fmt = export_segmentation(args.segmentation, args.out, args.to, args.reference, args.series, classes)
    print(f"wrote {fmt} {args.out}")



def _add_worker(subparsers):
    parser = subparsers.add_parser(
        "worker", help="run one job folder, printing its events as JSON lines (for the Slicer module and pscv serve)",
        description="Run the job described by JOB_DIR/job.json (segment, train, predict or finetune) and print one "
        "JSON event per line on stdout. SIGTERM or a JOB_DIR/cancel file stops it within 2 seconds. Exit status: "
        "0 done, 1 error, 3 cancelled. See docs/ENGINE_API.md, Jobs.")
    parser.add_argument("job_dir", metavar="JOB_DIR", help="the job folder")
    parser.set_defaults(run=_run_worker)


def _run_worker(args):
    from .jobs.worker import main as run_worker

    return run_worker(args.job_dir)


def _add_serve(subparsers):
    from .jobs.server import SETTING_LIMITS

    parser = subparsers.add_parser(
        "serve", help="the HTTP service that runs jobs for remote clients (e.g. on a GPU machine)",
        description="Run jobs submitted over HTTP, one at a time per GPU, keeping them under --root. Listens on "
        "127.0.0.1 unless --host says otherwise; any other address needs a token (PSCV_TOKEN, --token-file or "
        "--token), which every request must then send as 'Authorization: Bearer TOKEN'. Without a token, only "
        "requests naming this machine (Host: localhost or a loopback address, --host, --allow-host) and not sent "
        "by a web page of another origin are answered.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                        "only; 0.0.0.0: every network, needs a token)")
    parser.add_argument("--port", type=int, default=8000)
    _add_token_options(parser, "the secret clients must send")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="without a token, also answer requests whose Host is NAME (e.g. the name of an SSH "
                        "tunnel's end); localhost and loopback addresses always are")
    parser.add_argument("--root", default=None, help="folder for the jobs and their results (default ~/pscv-service)")
    parser.add_argument("--gpus", type=int, default=1,
                        help="jobs run at once, one per GPU (GPU n runs every n-th job; default 1)")
    group = parser.add_argument_group("limits")
    group.add_argument("--max-upload-mb", type=float, default=1024, help="largest request accepted (default 1024)")
    group.add_argument("--job-quota-mb", type=float, help="disk a job's inputs may take once unpacked (default: "
                       "twice --max-upload-mb)")
    group.add_argument("--keep-days", type=float, default=7, help="remove ended jobs (and their results) this many "
                       "days after they ended (default 7; 0: keep them)")
    group.add_argument("--limit", action="append", default=[], metavar="KEY=N",
                       help="the largest value of a setting a job may ask for: image_size, batch_size, widths (per "
                       "level), iterations (defaults: " + ", ".join(f"{k}={v}" for k, v in SETTING_LIMITS.items())
                       + ")")
    group.add_argument("--stall-timeout", type=float, default=30, metavar="SECONDS",
                       help="cut off a client whose request stops coming for this long (default 30)")
    parser.set_defaults(run=_run_serve)


def _service_limits(args):
    from .jobs.server import SETTING_LIMITS, Limits

    settings = dict(SETTING_LIMITS)
    for item in args.limit:
        key, _, value = item.partition("=")
        if key not in settings or not value.strip().isdigit() or int(value) < 1:
            raise PSCVError(f"--limit {item!r}: give KEY=N with KEY one of {', '.join(settings)} and N a whole number")
        settings[key] = int(value)
    for option, value in (("--max-upload-mb", args.max_upload_mb), ("--job-quota-mb", args.job_quota_mb),
                          ("--keep-days", args.keep_days), ("--stall-timeout", args.stall_timeout)):
        if value is not None and (value < 0 or value == 0 and option != "--keep-days"):
            raise PSCVError(f"{option} {value:g}: give a positive number")
    quota = None if args.job_quota_mb is None else int(args.job_quota_mb * 2**20)
    return Limits(int(args.max_upload_mb * 2**20), quota, args.keep_days, args.stall_timeout, settings)


def _run_serve(args):
    from .jobs.server import serve

    serve(host=args.host, port=args.port, token=_token(args), root=args.root, limits=_service_limits(args),
          gpus=args.gpus, allow_hosts=args.allow_host)


if __name__ == "__main__":
    sys.exit(main())
