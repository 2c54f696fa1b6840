"""`pscv bench interactive`: a simulated user session, the single-case mode against Grow from seeds.

For each volume a simulated user clicks, looks at the result and corrects it, round after round:
- round 0: one random pixel per class present in each slice, background included (the dataset's clicks);
- round r >= 1: in every slice, one more click at the most interior pixel of the largest connected region the
  method labelled wrongly, with its true class. Each method gets its own corrections, from its own errors.

After every round each method runs on all the clicks so far and is scored (Dice and HD95 per class, seconds).
The methods (`METHODS`): the single-case mode (`pscv`); 3D Slicer's Grow from seeds (FastGrowCut from
`itk-growcut`) on the very same clicks; the single-case mode started from strokes instead of clicks (one
straight stroke per class per slice, then clicked corrections); and a user who clicks the places the
single-case mode suggests (`--suggest`, each moved into its true class) instead of the largest error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from .. import PSCVError
from ..base.atomic import write_text_atomic
from ..data.clicks import Clicks
from ..data.metrics import evaluate_case, mean_scores

METHODS = ("pscv", "grow_from_seeds", "pscv_strokes", "pscv_suggested")
LABELS = {"pscv": "pscv segment (random walker)", "grow_from_seeds": "Grow from seeds (FastGrowCut)",
          "pscv_strokes": "pscv segment, strokes in round 0",
          "pscv_suggested": "pscv segment, clicking its suggestions"}


def load_session_cases(data, split: str = "val", seed: int = 0, count: int | None = None):
    """(classes, cases with clicks and labels): an ACDC folder's split, or a dataset folder with labels/
    (`pscv prepare`), whose points are round 0's clicks."""
    from .bench import load_cases, load_dataset_cases

    data = Path(data)
    if (data / "classes.json").is_file() and (data / "images").is_dir():
        classes, cases = load_dataset_cases(data, labels_needed=True)
        unclicked = [case.name for case in cases if case.clicks is None]
        if unclicked:
            raise PSCVError(f"{data}: case(s) {', '.join(unclicked[:5])} have no points/; the session starts from "
                            "them (make the folder with `pscv prepare`)")
        cases = cases[:count]
    elif (data / "volumes").is_dir():
        from ..data.classes import ACDC_CLASSES

        classes, cases = ACDC_CLASSES, load_cases(data, split, seed)[:count]
    else:
        raise PSCVError(f"{data}: neither the ACDC folder (volumes/, *_patients.txt) nor a dataset folder "
                        "(classes.json, images/, points/, labels/: `pscv prepare`); pass --data")
    if not cases:
        raise PSCVError(f"{data}: no cases to run")
    return classes, cases


def correction_clicks(prediction: np.ndarray, truth: np.ndarray, slice_axis: int) -> Clicks:
    """In every slice with an error, one click at the most interior pixel of the largest connected region
    labelled wrongly, with its true class."""
    kji, values = [], []
    for index in range(truth.shape[slice_axis]):
        predicted, true = np.take(prediction, index, axis=slice_axis), np.take(truth, index, axis=slice_axis)
        components, found = ndimage.label(predicted != true)
        if not found:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        depth = ndimage.distance_transform_edt(np.pad(components == sizes.argmax(), 1))[1:-1, 1:-1]
        row, column = np.unravel_index(depth.argmax(), depth.shape)
        point = [row, column]
        point.insert(slice_axis, index)
        kji.append(point)
        values.append(int(true[row, column]))
    return Clicks(np.array(kji, dtype=np.int64).reshape(-1, 3), np.array(values, dtype=np.int64))


def stroke_clicks(truth: np.ndarray, slice_axis: int) -> Clicks:
    """One straight stroke per class present in each slice: through the most interior pixel of the class's
    largest region, along that region's long axis, kept to pixels at least 2 pixels inside it."""
    kji, values = [], []
    for index in range(truth.shape[slice_axis]):
        plane = np.take(truth, index, axis=slice_axis)
        for value in np.unique(plane):
            components, _ = ndimage.label(plane == value)
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            region = components == sizes.argmax()
            depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
            centre = np.array(np.unravel_index(depth.argmax(), depth.shape), dtype=float)
            rows, columns = np.nonzero(region)
            spread = np.cov(np.stack([rows, columns])) if len(rows) > 2 else np.eye(2)
            direction = np.linalg.eigh(np.atleast_2d(spread))[1][:, -1]
            steps = np.arange(-max(plane.shape), max(plane.shape) + 1)
            line = np.rint(centre + steps[:, None] * direction).astype(int)
            line = line[np.all((line >= 0) & (line < plane.shape), axis=1)]
            line = np.unique(line[depth[line[:, 0], line[:, 1]] >= 2] if (depth >= 2).any() else
                             centre[None].astype(int), axis=0)
            for row, column in line:
                point = [row, column]
                point.insert(slice_axis, index)
                kji.append(point)
                values.append(int(value))
    return Clicks(np.array(kji, dtype=np.int64).reshape(-1, 3), np.array(values, dtype=np.int64))


def grow_from_seeds(volume, clicks: Clicks) -> np.ndarray:
    """3D Slicer's Grow from seeds (FastGrowCut, `itk-growcut`) from the clicks, as Slicer's effect runs it on
    the image scaled like ours (no distance penalty)."""
    import itk

    from ..data.intensity import DEFAULT_NORMALIZATION, normalize

    seeds = np.zeros(volume.shape, dtype=np.uint8)
    values = np.unique(clicks.values)
    lookup = {int(v): n + 1 for n, v in enumerate(values)}  # growcut: 0 = unlabelled
    seeds[tuple(clicks.kji.T)] = [lookup[int(v)] for v in clicks.values]
    scaled = (normalize(volume.array, DEFAULT_NORMALIZATION) * 1000).astype(np.int16)
    image, seed_image = itk.image_from_array(scaled), itk.image_from_array(seeds)
    for item in (image, seed_image):
        item.SetSpacing([float(s) for s in volume.spacing])
    grown = itk.array_from_image(itk.fast_grow_cut(image, seed_image=seed_image, distance_penalty=0.0))
    return np.concatenate([[0], values])[grown]


def run_session(case, classes, method: str, rounds: int, settings=None) -> list[dict]:
    """One simulated user session of `method` on `case`: per round the clicks so far, the scores, seconds.
    `settings`: the single-case mode's `CaseSettings` (default: the defaults)."""
    from ..learn.single_case import segment_case, suggest_points

    axis = case.image.slice_axis()
    clicks = stroke_clicks(case.labels, axis) if method == "pscv_strokes" else case.clicks
    actions = len(case.clicks)  # what the user did: a click or a stroke each (one per class per slice in round 0)
    rows = []
    for round_number in range(rounds + 1):
        started = time.monotonic()
        if method == "grow_from_seeds":
            labelmap, result = grow_from_seeds(case.image, clicks), None
        else:
            result = segment_case(case.image, clicks, classes, settings)
            labelmap = result.labelmap
        seconds = time.monotonic() - started
        rows.append({"round": round_number, "clicks": actions, "seconds": round(seconds, 3),
                     "scores": evaluate_case(labelmap, case.labels, classes, case.image.spacing[::-1])})
        if round_number == rounds:
            break
        if method == "pscv_suggested":
            suggested = suggest_points(result, classes, axis, case.image.shape[axis])
            added = Clicks(suggested.kji, case.labels[tuple(suggested.kji.T)])
        else:
            added = correction_clicks(labelmap, case.labels, axis)
        clicks, actions = clicks.extended(added), actions + len(added)
    return rows


def summarize(per_case: dict, classes) -> list[dict]:
    """Per round, the mean over cases of clicks, seconds and scores."""
    summary = []
    for round_number in range(len(next(iter(per_case.values())))):
        rows = [case_rows[round_number] for case_rows in per_case.values()]
        scores = {info.name: mean_scores([row["scores"][info.name] for row in rows])
                  for info in classes if info.value != 0}
        scores["mean"] = mean_scores([row["scores"]["mean"] for row in rows])
        summary.append({"round": round_number, "clicks": float(np.mean([row["clicks"] for row in rows])),
                        "seconds": float(np.mean([row["seconds"] for row in rows])),
                        "seconds_max": float(np.max([row["seconds"] for row in rows])), "scores": scores})
    return summary


def markdown_report(results: dict, classes, header: dict) -> str:
    names = [info.name for info in classes if info.value != 0]
    lines = [f"# Interactive session: {header['data']} ({header['cases']} volumes)", "",
             f"{header['date']}, {header['machine']}, commit {header['commit']}; settings {header['settings']}. "
             "Round 0: one random click per class "
             "present in each slice, background included; round r: one click per slice at the most interior "
             "pixel of the largest wrong region, with its true class.", "",
             "| method | round | clicks (or strokes) | mean Dice | " + " | ".join(names)
             + " | HD95 | seconds (mean / max) |",
             "|---|---|---|---|" + "---|" * len(names) + "---|---|"]
    for method, result in results.items():
        for row in result["summary"]:
            scores = row["scores"]
            lines.append(f"| {LABELS[method]} | {row['round']} | {row['clicks']:.1f} | "
                         f"**{scores['mean']['dice']:.3f}** | " + " | ".join(f"{scores[n]['dice']:.3f}" for n in names)
                         + f" | {scores['mean']['hd95']:.1f} | {row['seconds']:.1f} / {row['seconds_max']:.1f} |")
    return "\n".join(lines) + "\n"


def draw_figure(results: dict, header: dict, path: Path) -> Path:
    """Mean Dice against the mean number of clicks, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method, result in results.items():
        summary = result["summary"]
        axis.plot([row["clicks"] for row in summary], [row["scores"]["mean"]["dice"] for row in summary], marker="o",
                  label=LABELS[method])
    axis.set_xlabel("clicks per volume (mean; a stroke counts as one)")
    axis.set_ylabel("mean Dice")
    axis.set_title(f"Interactive session, {header['data']} ({header['cases']} volumes)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def run_interactive_benchmark(data, out, split="val", cases=None, rounds=4, methods=METHODS, seed=0,
                              overrides=None) -> dict:
    """Run the session for every method on every case; write results.json, results.md and figure.png.
    `overrides`: segmentation settings (`CaseSettings` keys) other than the defaults."""
    import importlib.util
    import os
    import platform
    import subprocess

    from ..learn.single_case import CaseSettings

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise PSCVError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if "grow_from_seeds" in methods:
        if importlib.util.find_spec("itk") is None:
            raise PSCVError("Grow from seeds needs itk-growcut (pip install itk-growcut), or leave grow_from_seeds "
                            "out of --methods")
        import itk

        _ = itk.fast_grow_cut  # itk loads its modules lazily (about 10 s): not inside the first volume's time
    settings = CaseSettings(**(overrides or {}))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes, loaded = load_session_cases(data, split, seed, cases)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    header = {"data": f"{Path(data).name}" + (f" {split}" if not (Path(data) / "images").is_dir() else ""),
              "cases": len(loaded), "rounds": rounds, "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "settings": settings.to_dict()}
    results = {}
    for method in methods:
        per_case = {}
        for number, case in enumerate(loaded, start=1):
            per_case[case.name] = run_session(case, classes, method, rounds, settings)
            dice = " ".join(f"{row['scores']['mean']['dice']:.3f}" for row in per_case[case.name])
            print(f"bench interactive: {method} {number}/{len(loaded)} {case.name}: Dice by round {dice}", flush=True)
        results[method] = {"cases": per_case, "summary": summarize(per_case, classes)}
    write_text_atomic(out / "results.json", json.dumps({"header": header, "methods": results}, indent=1) + "\n")
    report = markdown_report(results, classes, header)
    write_text_atomic(out / "results.md", report)
    draw_figure(results, header, out / "figure.png")
    print(report)
    return results
