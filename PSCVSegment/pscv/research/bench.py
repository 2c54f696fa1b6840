"""`pscv bench acdc` and `pscv bench cohort`: the recipes side by side on a cohort.

`acdc`: every recipe trains with the same simulated clicks (those `pscv prepare-acdc` writes) and seed on
the ACDC train patients and is evaluated on the val patients (Dice and HD95 per class on the native grid;
ACDC stores no spacing, so HD95 is in voxels). The single-case mode has its own benchmark, a simulated
user session beside Grow from seeds: `pscv bench interactive` (`research.interactive`).

`cohort`: the same recipes on any two dataset folders, one to train on (its points, and its labels for
`full`) and one to evaluate on (its labels), such as `pscv prepare` writes from a labelled cohort (one random
click per class present per slice, background included, fixed seed: the protocol of the ACDC benchmark).
HD95 is in mm, through the images' spacing.

Results: `results.md` (tables), `results.json`, `figure.png`; each recipe's scores are kept in
`methods/<recipe>.json` so recipes can run in separate processes and be reported together.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from .. import PSCVError, __version__
from ..base.atomic import write_text_atomic
from ..data.classes import ACDC_CLASSES
from ..learn.budgets import COHORT_CPU_BUDGET, COHORT_GPU_BUDGET
from .acdc import check_acdc_folder

# What each row of the table trains: the plain losses, the earlier default (pCE + affinity + pseudo-labels),
# the paper's loss with the same two terms, `default` (whatever `pscv train` does by default) and dense labels.
PLAIN = {"affinity_weight": 0.0, "pseudo_weight": 0.0, "crf_weight": 0.0, "dmpls_weight": 0.0, "outside_weight": 0.0,
         "absent_weight": 0.0, "largest_piece": False}  # no extra term, no post-processing
RECIPES = {
    "default": {},
    "pce": {"method": "pce", **PLAIN},
    "ms": {"method": "ms", **PLAIN},
    "pscv": {"method": "pscv", **PLAIN},
    "pce+aff+pl": {"method": "pce", **PLAIN, "affinity_weight": 1.0, "pseudo_weight": 1.0},
    "pscv+aff+pl": {"method": "pscv", **PLAIN, "affinity_weight": 1.0, "pseudo_weight": 1.0},
    "pscv+default": {"method": "pscv"},
    "full": {"method": "full"},
}
DEFAULT_RECIPES = ("pce", "ms", "pscv", "pce+aff+pl", "default", "full")
COHORT_RECIPES = ("pce", "pscv", "default", "full")

# quick: what pscv train does on a CPU (2 cores: minutes per recipe); paper: on a GPU, the usual weakly-supervised
# ACDC schedule.
PROFILES = {"quick": dict(COHORT_CPU_BUDGET), "paper": dict(COHORT_GPU_BUDGET)}


def machine_description(device) -> str:
    import os

    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (torch {torch.__version__})"


def load_cases(data: Path, split: str, seed: int):
    """The cases of one split, in memory, with the clicks `pscv prepare-acdc` writes for the same seed."""
    from ..data.dataset import Case
    from .acdc import load_acdc_split

    return [Case(volume, clicks, labels, name) for name, volume, clicks, labels in
            load_acdc_split(data, split, seed)]


def run_method(method, train_cases, val_cases, classes, settings_dict, out: Path, progress=None) -> dict:
    """Train one recipe of RECIPES, save its model, evaluate it on the val cases; kept in methods/<recipe>.json."""
    from ..learn.inference import evaluate_cases
    from ..learn.models import save_model
    from ..learn.training import TrainSettings, train

    settings = TrainSettings.from_dict({**settings_dict, **RECIPES[method]})
    model = train(train_cases, classes, settings, progress)
    save_model(model, out / "models" / method)
    result = evaluate_cases(model, val_cases, settings.device)
    result.update(method=method, settings=settings.to_dict(), training=model.metadata["training"],
                  history=model.metadata["history"])
    write_text_atomic(out / "methods" / f"{method}.json", json.dumps(result, indent=1) + "\n")
    return result


def method_table(results: dict, unit: str) -> list[str]:
    """One row per recipe: Dice and HD95 per class, their means, time and speed."""
    names = [n for n in next(iter(results.values()))["scores"] if n != "mean"]
    lines = ["| method | " + " | ".join(f"Dice {n}" for n in names) + " | mean Dice | " +
             " | ".join(f"HD95 {n}" for n in names) + f" | mean HD95 ({unit}) | training s | train images/s | "
             "inference s/volume |", "|" + "---|" * (2 * len(names) + 6)]
    for method, result in results.items():
        scores = result["scores"]
        lines.append(f"| {method} | " + " | ".join(f"{scores[n]['dice']:.4f}" for n in names) +
                     f" | **{scores['mean']['dice']:.4f}** | " + " | ".join(f"{scores[n]['hd95']:.2f}" for n in names) +
                     f" | {scores['mean']['hd95']:.2f} | {result['training']['seconds']:.0f} | "
                     f"{result['training']['images_per_second']:.1f} | {result['inference_seconds_per_volume']:.3f} |")
    return lines


def markdown_report(results: dict, header: dict) -> str:
    unit = header.get("hd95_unit", "voxels")
    lines = [f"# {header.get('name', 'ACDC')} benchmark ({header['profile']} profile)", "",
             f"- date: {header['date']}", f"- machine: {header['machine']}", f"- command: `{header['command']}`",
             f"- engine: pscv {__version__}; train {header['train_cases']} volumes, val {header['val_cases']} "
             f"volumes; clicks: {header.get('clicks', 'one per class present per slice (seed 0)')}; training seed "
             f"{header['seed']}", "",
             "HD95 in voxels (ACDC stores no spacing)." if unit == "voxels" else "HD95 in mm (the images' spacing).",
             ""]
    if results:
        lines += method_table(results, unit)
        weight = next(iter(results.values()))["settings"]["cv_weight"]
        lines += ["", "Recipes: default = what `pscv train` does by default; pce, ms, pscv = the plain losses "
                  f"(pscv: pCE + contrastive variance, lambda {weight}); "
                  "+aff+pl = with the affinity (CRF-like) and EMA pseudo-label terms; pscv+default = the default "
                  "recipe with the contrastive variance term; full = dense labels (upper bound)."]
    return "\n".join(lines) + "\n"


def draw_figure(results: dict, val_cases, classes, out: Path, device) -> Path:
    """Ground truth vs each method's prediction on three slices of one val volume, and the loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from ..learn.inference import predict_volume
    from ..learn.models import load_model

    case = val_cases[0]
    slices = np.linspace(1, case.image.shape[0] - 2, 3).astype(int)
    colors = np.zeros((max(c.value for c in classes) + 1, 4))
    for c in classes:
        colors[c.value] = [*np.array(c.color) / 255, 0.0 if c.value == 0 else 0.45]
    rows = [("ground truth", case.labels)] + [
        (method, predict_volume(load_model(out / "models" / method), case.image, device)) for method in results]
    figure, axes = plt.subplots(len(rows) + 1, 3, figsize=(9, 3 * (len(rows) + 1)))
    for row, (title, labels) in enumerate(rows):
        for column, index in enumerate(slices):
            axis = axes[row, column]
            axis.imshow(case.image.array[index], cmap="gray")
            axis.imshow(labels[index], cmap=ListedColormap(colors), vmin=0, vmax=len(colors) - 1,
                        interpolation="nearest")
            axis.set_axis_off()
            axis.set_title(f"{title}, slice {index}", fontsize=8)
    gs = axes[-1, 0].get_gridspec()
    for axis in axes[-1]:
        axis.remove()
    curves = figure.add_subplot(gs[-1, :])
    for method, result in results.items():
        history = result["history"]
        curves.plot([h["step"] for h in history], [h["loss"] for h in history], label=method, linewidth=0.8)
    curves.set_xlabel("iteration")
    curves.set_ylabel("training loss")
    curves.set_yscale("log")
    curves.legend(fontsize=8)
    figure.suptitle(f"{case.name}: ground truth and predictions; loss curves", fontsize=10)
    figure.tight_layout()
    path = out / "figure.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def benchmark_settings(profile, device, seed, iterations, overrides) -> dict:
    """The training settings of every recipe in a profile."""
    if profile not in PROFILES:
        raise PSCVError(f"unknown profile {profile!r}; choose {', '.join(PROFILES)}")
    settings = {**PROFILES[profile], "device": device, "seed": seed, **(overrides or {})}
    if iterations:
        settings["iterations"] = iterations
    return settings


def check_recipes(methods) -> None:
    unknown = [m for m in methods if m not in RECIPES]
    if unknown:
        raise PSCVError(f"unknown method(s) {unknown}; choose from {', '.join(RECIPES)}")


def train_recipes(methods, train_cases, val_cases, classes, settings, out: Path, progress=None) -> None:
    for method in methods:
        print(f"bench: training {method} ({settings['iterations']} iterations)", flush=True)
        run_method(method, train_cases, val_cases, classes, settings, out, progress)


def write_results(out: Path, header: dict, val_cases, classes, device) -> Path:
    """Every recipe measured in `out` (in a fixed order): results.md, .json and the figure."""
    results = {}
    for method in RECIPES:
        path = out / "methods" / f"{method}.json"
        if path.is_file():
            results[method] = json.loads(path.read_text())
    report = markdown_report(results, header)
    write_text_atomic(out / "results.md", report)
    write_text_atomic(out / "results.json", json.dumps({"header": header, "methods": results}, indent=1) + "\n")
    if results:
        draw_figure(results, val_cases, classes, out, device)
    print(report)
    return out / "results.md"


def run_acdc_benchmark(data, out, profile="quick", methods=DEFAULT_RECIPES, device="auto", seed=0,
                       iterations=None, overrides=None, progress=None, command="pscv bench acdc") -> Path:
    from ..learn.devices import resolve_device

    settings = benchmark_settings(profile, device, seed, iterations, overrides)
    check_recipes(methods)
    data, out = Path(data), Path(out)
    check_acdc_folder(data)
    resolved = resolve_device(device)
    classes = ACDC_CLASSES
    train_cases, val_cases = load_cases(data, "train", seed), load_cases(data, "val", seed)
    train_recipes(methods, train_cases, val_cases, classes, settings, out, progress)
    header = {"name": "ACDC", "profile": profile, "date": time.strftime("%Y-%m-%d"),
              "machine": machine_description(resolved), "command": command, "train_cases": len(train_cases),
              "val_cases": len(val_cases), "seed": seed, "hd95_unit": "voxels",
              "clicks": f"one per class present per slice (seed {seed})"}
    return write_results(out, header, val_cases, classes, resolved)


def load_dataset_cases(folder, labels_needed: bool):
    """(classes, cases) of a dataset folder, each case with its clicks (when it has points) and its labels
    (when it has a label map); `labels_needed`: only the cases with labels, and at least one."""
    from ..data.dataset import load_case, read_dataset

    classes, entries = read_dataset(folder)
    if labels_needed:
        entries = [e for e in entries if e.labels is not None]
        if not entries:
            raise PSCVError(f"{folder}: no labels/<case> files to evaluate on")
    return classes, [load_case(e, classes, points=e.points is not None, labels=e.labels is not None)
                     for e in entries]


def run_cohort_benchmark(train, val, out, profile="quick", methods=COHORT_RECIPES, device="auto", seed=0,
                         iterations=None, overrides=None, progress=None, command="pscv bench cohort") -> Path:
    """The recipes trained on the dataset folder `train` and evaluated on the labelled cases of `val`."""
    from ..learn.devices import resolve_device

    settings = benchmark_settings(profile, device, seed, iterations, overrides)
    check_recipes(methods)
    classes, train_cases = load_dataset_cases(train, labels_needed="full" in methods)
    val_classes, val_cases = load_dataset_cases(val, labels_needed=True)
    if [(c.name, c.value) for c in classes] != [(c.name, c.value) for c in val_classes]:
        raise PSCVError(f"{val}: its classes differ from those of {train}; benchmark on one set of classes")
    out = Path(out)
    train_recipes(methods, train_cases, val_cases, classes, settings, out, progress)
    resolved = resolve_device(device)
    header = {"name": f"Cohort {Path(train).name} -> {Path(val).name}", "profile": profile,
              "date": time.strftime("%Y-%m-%d"), "machine": machine_description(resolved), "command": command,
              "train_cases": len(train_cases), "val_cases": len(val_cases), "seed": seed, "hd95_unit": "mm",
              "clicks": "those of the train dataset's points/ (pscv prepare: one per class present per slice)"}
    return write_results(out, header, val_cases, classes, resolved)
