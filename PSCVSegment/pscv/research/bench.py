"""`pscv bench acdc`: the methods side by side on the paper's own data set.

Every method trains with the same simulated clicks (those `pscv prepare-acdc` writes) and seed on the
ACDC train patients and is evaluated on the val patients (Dice and HD95 per class on the native grid;
ACDC stores no spacing, so HD95 is in voxels). Then the single-case mode (train on one volume's own
clicks, every slice clicked) runs on some val volumes beside 3D Slicer's Grow from seeds (FastGrowCut,
PyPI `itk-growcut`) given the very same clicks. Results: `results.md` (tables), `results.json`,
`figure.png`; each method's scores are kept in `methods/<method>.json` so methods can run in separate
processes and be reported together.
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

# What each row of the table trains: the plain losses, the default recipe (pCE + affinity + pseudo-labels)
# and the paper's loss with the same two terms.
RECIPES = {
    "pce": {"method": "pce", "affinity_weight": 0.0, "pseudo_weight": 0.0},
    "ms": {"method": "ms", "affinity_weight": 0.0, "pseudo_weight": 0.0},
    "pscv": {"method": "pscv", "affinity_weight": 0.0, "pseudo_weight": 0.0},
    "pce+aff+pl": {"method": "pce", "affinity_weight": 1.0, "pseudo_weight": 1.0},
    "pscv+aff+pl": {"method": "pscv", "affinity_weight": 1.0, "pseudo_weight": 1.0},
    "full": {"method": "full"},
}
DEFAULT_RECIPES = ("pce", "ms", "pscv", "pce+aff+pl", "full")

PROFILES = {
    # 2 CPU cores, well inside 45 minutes for everything.
    "quick": {"image_size": 128, "iterations": 1000, "batch_size": 12, "single_case_volumes": 4},
    # A GPU: the usual weakly-supervised ACDC recipe.
    "paper": {"image_size": 256, "iterations": 30000, "batch_size": 12, "single_case_volumes": 20},
}


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


def grow_from_seeds(volume, clicks) -> np.ndarray:
    """3D Slicer's Grow from seeds (FastGrowCut) from the same clicks: label map of class values."""
    import itk

    from ..data.intensity import DEFAULT_NORMALIZATION, normalize

    seeds = np.zeros(volume.shape, dtype=np.uint8)
    values = np.unique(clicks.values)
    lookup = {int(v): n + 1 for n, v in enumerate(values)}  # growcut: 0 = unlabelled
    seeds[tuple(clicks.kji.T)] = [lookup[int(v)] for v in clicks.values]
    scaled = normalize(volume.array, DEFAULT_NORMALIZATION) * 1000  # FastGrowCut takes short integers
    image = itk.image_from_array(scaled.astype(np.int16))
    image.SetSpacing([float(s) for s in volume.spacing])
    seed_image = itk.image_from_array(seeds)
    seed_image.SetSpacing([float(s) for s in volume.spacing])
    grown = itk.array_from_image(itk.fast_grow_cut(image, seed_image=seed_image, distance_penalty=0.0))
    return np.concatenate([[0], values])[grown].astype(np.uint8)


def run_single_case(cases, classes, device, count, progress=None) -> dict:
    """The single-case mode (default budget) and Grow from seeds on the first `count` val volumes.

    Grow from seeds is left out, and said so, where `itk-growcut` is not installed.
    """
    import importlib.util

    from ..data.metrics import evaluate_case, mean_scores
    from ..learn.single_case import case_settings, segment_case

    growcut = importlib.util.find_spec("itk") is not None
    if not growcut:
        print("bench: itk-growcut is not installed: Grow from seeds not measured (pip install itk-growcut)")
    rows = []
    for case in cases[:count]:
        spacing = case.image.spacing[::-1]
        started = time.monotonic()
        labelmap, _ = segment_case(case.image, case.clicks, classes, case_settings(device), progress)
        row = {"case": case.name, "clicks": len(case.clicks), "pscv_seconds": time.monotonic() - started,
               "pscv": evaluate_case(labelmap, case.labels, classes, spacing)}
        if growcut:
            started = time.monotonic()
            grown = grow_from_seeds(case.image, case.clicks)
            row["grow_from_seeds_seconds"] = time.monotonic() - started
            row["grow_from_seeds"] = evaluate_case(grown, case.labels, classes, spacing)
        rows.append(row)
    summary = {}
    for method in ("pscv", "grow_from_seeds") if growcut else ("pscv",):
        summary[method] = {"mean": mean_scores([r[method]["mean"] for r in rows]),
                           "seconds": float(np.mean([r[f"{method}_seconds"] for r in rows]))}
    return {"settings": case_settings(device).to_dict(), "cases": rows, "summary": summary}


def markdown_report(results: dict, single: dict | None, header: dict) -> str:
    lines = [f"# ACDC benchmark ({header['profile']} profile)", "",
             f"- date: {header['date']}", f"- machine: {header['machine']}", f"- command: `{header['command']}`",
             f"- engine: pscv {__version__}; train patients {header['train_cases']} volumes, val "
             f"{header['val_cases']} volumes; clicks: one per class present per slice (seed {header['seed']})", "",
             "HD95 in voxels (ACDC stores no spacing).", ""]
    if results:
        names = [n for n in next(iter(results.values()))["scores"] if n != "mean"]
        lines.append("| method | " + " | ".join(f"Dice {n}" for n in names) +
                     " | mean Dice | mean HD95 | training s | train images/s | inference s/volume |")
        lines.append("|" + "---|" * (len(names) + 6))
        for method, result in results.items():
            scores = result["scores"]
            lines.append(f"| {method} | " + " | ".join(f"{scores[n]['dice']:.4f}" for n in names) +
                         f" | **{scores['mean']['dice']:.4f}** | {scores['mean']['hd95']:.2f} | "
                         f"{result['training']['seconds']:.0f} | {result['training']['images_per_second']:.1f} | "
                         f"{result['inference_seconds_per_volume']:.3f} |")
        lines += ["", "Recipes: pce, ms, pscv = the plain losses (pscv: pCE + contrastive variance, lambda "
                  f"{next(iter(results.values()))['settings']['cv_weight']}); +aff+pl = with the affinity (CRF-like) "
                  "and EMA pseudo-label terms; full = dense labels (upper bound)."]
    if single:
        settings = single["settings"]
        lines += ["", f"## Single-case mode vs Grow from seeds ({len(single['cases'])} val volumes, every slice "
                  f"clicked; default budget {settings['iterations']} iterations at {settings['image_size']} px, "
                  f"{settings['method']} + affinity {settings['affinity_weight']} + pseudo-labels "
                  f"{settings['pseudo_weight']}, region margin {settings['roi_margin']})", "",
                  "| case | clicks | pscv segment Dice | pscv segment s | Grow from seeds Dice | Grow from seeds s |",
                  "|---|---|---|---|---|---|"]
        for row in single["cases"]:
            growcut = row.get("grow_from_seeds")
            lines.append(f"| {row['case']} | {row['clicks']} | {row['pscv']['mean']['dice']:.4f} | "
                         f"{row['pscv_seconds']:.1f} | " + (f"{growcut['mean']['dice']:.4f} | "
                         f"{row['grow_from_seeds_seconds']:.1f} |" if growcut else "not measured | |"))
        summary = single["summary"]
        growcut = summary.get("grow_from_seeds")
        lines.append(f"| **mean** | | **{summary['pscv']['mean']['dice']:.4f}** | {summary['pscv']['seconds']:.1f} | "
                     + (f"**{growcut['mean']['dice']:.4f}** | {growcut['seconds']:.1f} |" if growcut
                        else "not measured | |"))
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


def run_acdc_benchmark(data, out, profile="quick", methods=DEFAULT_RECIPES, device="auto", seed=0,
                       iterations=None, single_case_volumes=None, overrides=None, progress=None,
                       command="pscv bench acdc") -> Path:
    from ..learn.devices import resolve_device

    if profile not in PROFILES:
        raise PSCVError(f"unknown profile {profile!r}; choose {', '.join(PROFILES)}")
    unknown = [m for m in methods if m not in RECIPES]
    if unknown:
        raise PSCVError(f"unknown method(s) {unknown}; choose from {', '.join(RECIPES)}")
    data, out = Path(data), Path(out)
    if not (data / "volumes").is_dir():
        raise PSCVError(f"{data}: not the ACDC folder (expected volumes/ and *_patients.txt); pass --data")
    resolved = resolve_device(device)
    profile_settings = dict(PROFILES[profile])
    default_count = profile_settings.pop("single_case_volumes")
    count = default_count if single_case_volumes is None else single_case_volumes
    settings = {**profile_settings, "device": device, "seed": seed, **(overrides or {})}
    if iterations:
        settings["iterations"] = iterations
    classes = ACDC_CLASSES
    train_cases, val_cases = load_cases(data, "train", seed), load_cases(data, "val", seed)
    for method in methods:
        print(f"bench: training {method} ({settings['iterations']} iterations)", flush=True)
        run_method(method, train_cases, val_cases, classes, settings, out, progress)
    single = None
    if count:
        print(f"bench: single-case mode and Grow from seeds on {count} val volumes", flush=True)
        single = run_single_case(val_cases, classes, device, count, progress)
        write_text_atomic(out / "single_case.json", json.dumps(single, indent=1) + "\n")
    elif (out / "single_case.json").is_file():
        single = json.loads((out / "single_case.json").read_text())
    results = {}
    for method in RECIPES:  # every recipe measured in this folder, in a fixed order
        path = out / "methods" / f"{method}.json"
        if path.is_file():
            results[method] = json.loads(path.read_text())
    header = {"profile": profile, "date": time.strftime("%Y-%m-%d"), "machine": machine_description(resolved),
              "command": command, "train_cases": len(train_cases), "val_cases": len(val_cases), "seed": seed}
    report = markdown_report(results, single, header)
    write_text_atomic(out / "results.md", report)
    write_text_atomic(out / "results.json", json.dumps({"header": header, "methods": results, "single_case": single},
                                                       indent=1) + "\n")
    if results:
        draw_figure(results, val_cases, classes, out, resolved)
    print(report)
    return out / "results.md"
