"""Mean Dice of saved models (benchmarks/sweep.py --save-models) with and without the largest-piece step, on the
ACDC val patients or on the labelled cases of a dataset folder: what `largest_piece` adds, from the same networks.

    python benchmarks/largest_piece.py runs/models/default-seed0 runs/models/default-seed1 [--val-dataset DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "PSCVSegment"))


def main():
    from pscv.learn.inference import evaluate_cases
    from pscv.learn.models import load_model
    from pscv.research.bench import load_cases, load_dataset_cases

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default="../shared/data/acdc")
    parser.add_argument("--val-dataset", help="evaluate on this dataset folder's labelled cases instead of ACDC val")
    args = parser.parse_args()
    cases = load_dataset_cases(args.val_dataset, labels_needed=True)[1] if args.val_dataset \
        else load_cases(Path(args.data), "val", 0)
    for folder in args.models:
        model = load_model(folder)
        kept = model.metadata.get("one_piece_classes", [])
        with_pieces = evaluate_cases(model, cases, "cpu")["scores"]["mean"]["dice"]
        model.metadata["one_piece_classes"] = []
        every_piece = evaluate_cases(model, cases, "cpu")["scores"]["mean"]["dice"]
        print(f"{folder}: one-piece classes {kept}; mean Dice {with_pieces:.4f} with the largest-piece step, "
              f"{every_piece:.4f} without ({with_pieces - every_piece:+.4f})", flush=True)


if __name__ == "__main__":
    main()
