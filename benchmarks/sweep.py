"""Research sweep: many training configurations on ACDC, each trained on the train patients (cohort mode)
or on one val volume's own clicks (single mode), evaluated on the val patients, several in parallel.

    python benchmarks/sweep.py CONFIGS.json --out runs/sweep --workers 4 [--mode cohort|single] [--device cuda]
        [--profile quick|paper]

CONFIGS.json: [{"name": "pce", "settings": {"method": "pce", ...}, "seeds": [0, 1]}, ...] ("seeds" optional:
--seeds for every config otherwise); every run appends one JSON line
to OUT/results.jsonl (name, seed, settings, mean and per-class Dice, HD95, seconds), so an interrupted
sweep keeps what finished and a rerun skips it. The table at the end groups the seeds of each name.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "PSCVSegment"))
from pscv.research.bench import PROFILES  # noqa: E402 (after the engine's folder joins the path)


def run_one(config: dict, args) -> dict:
    """Train and evaluate one configuration in this process."""
    import torch

    from pscv.data.classes import ACDC_CLASSES
    from pscv.data.metrics import evaluate_case, mean_scores
    from pscv.learn.inference import evaluate_cases
    from pscv.learn.single_case import CaseSettings, segment_case
    from pscv.learn.training import TrainSettings, train
    from pscv.research.bench import load_cases
    from pscv.research.interactive import grow_from_seeds

    torch.set_num_threads(args.threads)
    classes = ACDC_CLASSES
    if args.train_dataset:  # any two dataset folders (pscv prepare), e.g. another cohort
        from pscv.research.bench import load_dataset_cases

        classes, train_cases = load_dataset_cases(args.train_dataset, labels_needed=False)
        _, val_cases = load_dataset_cases(args.val_dataset, labels_needed=True)
    else:
        val_cases = load_cases(Path(args.data), "val", 0)
    last = [0.0]

    def progress(event):  # a line every 30 s on stderr (the run's log)
        if event.get("stage") == "train" and time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            print(f"[train] {event['step']}/{event['total']} loss {event.get('loss')} "
                  f"~{event.get('seconds_left')} s left", file=sys.stderr, flush=True)

    settings = {"device": args.device, **config["settings"]}
    started = time.monotonic()
    if args.mode == "cohort":
        if not args.train_dataset:
            train_cases = load_cases(Path(args.data), "train", 0)
        model = train(train_cases, classes, TrainSettings.from_dict(settings), progress)
        if args.save_models:
            from pscv.learn.models import save_model

            save_model(model, Path(args.save_models) / f"{config['name']}-seed{settings.get('seed', 0)}")
        result = evaluate_cases(model, val_cases, args.device)
        scores = result["scores"]
    else:
        per_case, grown = [], []
        for case in val_cases[: args.single_cases]:
            labelmap = segment_case(case.image, case.clicks, classes,
                                    CaseSettings(**{k: v for k, v in settings.items() if k != "device"})).labelmap
            per_case.append(evaluate_case(labelmap, case.labels, classes))
            if config.get("growcut"):
                grown.append(evaluate_case(grow_from_seeds(case.image, case.clicks), case.labels, classes))
        names = list(per_case[0])
        scores = {n: mean_scores([s[n] for s in per_case]) for n in names}
        if grown:
            scores["growcut_mean"] = mean_scores([g["mean"] for g in grown])
    commit = os.environ.get("PSCV_COMMIT") or subprocess.run(  # PSCV_COMMIT: a snapshot's (git archive) commit
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    return {"name": config["name"], "seed": settings.get("seed", 0), "settings": settings, "scores": scores,
            "seconds": round(time.monotonic() - started, 1), "mode": args.mode, "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs")
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--data", default="../shared/data/acdc")
    parser.add_argument("--train-dataset", help="cohort mode on dataset folders (pscv prepare) instead of ACDC: "
                        "train on this one...")
    parser.add_argument("--val-dataset", help="...and evaluate on the labelled cases of this one")
    parser.add_argument("--mode", choices=["cohort", "single"], default="cohort")
    parser.add_argument("--single-cases", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds for every config")
    parser.add_argument("--deadline", type=float, help="seconds after which no new run starts")
    parser.add_argument("--max-runs", type=int, help="run at most this many of the pending runs (in file order), "
                        "then stop: a queue that a loop calls again picks up edits to CONFIGS.json")
    parser.add_argument("--profile", choices=["quick", "paper"], help="cohort mode: the budget of pscv bench's "
                        "profile (quick: pscv train's CPU budget; paper: its GPU budget) under every config's settings")
    parser.add_argument("--base", default="{}", help="JSON settings under every config's own (over the profile's)")
    parser.add_argument("--force", default="{}", help="JSON settings over every config's own (for dry runs)")
    parser.add_argument("--save-models", metavar="DIR", help="keep each cohort run's model in DIR/NAME-seedS")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config given as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one), args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = set()
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            done.add((row["name"], row["seed"]))
    runs = []
    base = {**(PROFILES[args.profile] if args.profile else {}), **json.loads(args.base)}
    for config in json.loads(Path(args.configs).read_text()):
        for seed in config.get("seeds", [int(s) for s in args.seeds.split(",")]):
            if (config["name"], seed) not in done:
                settings = {**base, **config["settings"], **json.loads(args.force), "seed": seed}
                runs.append({**config, "settings": settings})

    runs = runs[:args.max_runs] if args.max_runs is not None else runs
    started = time.monotonic()

    def launch(config):
        if args.deadline and time.monotonic() - started > args.deadline:
            print(f"SKIPPED {config['name']} seed {config['settings']['seed']}: past the deadline", flush=True)
            return
        datasets = ["--train-dataset", args.train_dataset, "--val-dataset", args.val_dataset] \
            if args.train_dataset else []
        command = [sys.executable, __file__, args.configs, "--one", json.dumps(config), "--mode", args.mode,
                   "--device", args.device, "--data", args.data, *datasets,
                   "--threads", str(args.threads), "--single-cases", str(args.single_cases),
                   *(["--save-models", str(Path(args.save_models).resolve())] if args.save_models else [])]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        log = out / "logs" / f"{config['name']}-seed{config['settings']['seed']}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "w") as stderr:
            finished = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        if finished.returncode:
            print(f"FAILED {config['name']}: {log.read_text()[-2000:]}", flush=True)
            return
        row = json.loads(finished.stdout.strip().splitlines()[-1])
        with open(results_path, "a") as file:
            file.write(json.dumps(row) + "\n")
        print(f"{row['name']:<28} seed {row['seed']}  mean Dice {row['scores']['mean']['dice']:.4f}  "
              f"{row['seconds']:.0f} s", flush=True)

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(launch, runs))
    if results_path.exists():
        print_table(results_path)


def print_table(results_path: Path) -> None:
    rows = [json.loads(line) for line in results_path.read_text().splitlines()]
    names = list(dict.fromkeys(r["name"] for r in rows))
    print(f"\n{'config':<28}{'seeds':>6}{'mean Dice':>11}{'sd':>8}{'RV':>8}{'Myo':>8}{'LV':>8}{'HD95':>8}{'s':>7}")
    for name in names:
        group = [r for r in rows if r["name"] == name]
        mean = [r["scores"]["mean"]["dice"] for r in group]
        per = {k: np.mean([r["scores"][k]["dice"] for r in group]) for k in ("RV", "Myo", "LV")}
        extra = ""
        if "growcut_mean" in group[0]["scores"]:
            extra = f"  growcut {np.mean([r['scores']['growcut_mean']['dice'] for r in group]):.4f}"
        print(f"{name:<28}{len(group):>6}{np.mean(mean):>11.4f}{np.std(mean):>8.4f}{per['RV']:>8.4f}"
              f"{per['Myo']:>8.4f}{per['LV']:>8.4f}{np.mean([r['scores']['mean']['hd95'] for r in group]):>8.2f}"
              f"{np.mean([r['seconds'] for r in group]):>7.0f}{extra}")


if __name__ == "__main__":
    main()
