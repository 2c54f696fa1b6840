"""Training throughput of N concurrent training processes on one device, on synthetic slices.

    python benchmarks/gpu_probe.py --processes 4 --iterations 200 --image-size 256 --device cuda

Prints one JSON line: seconds per iteration and images/s of each process (the warm-up included).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "PSCVSegment"))


def one(args) -> dict:
    import numpy as np

    from pscv.data.classes import ACDC_CLASSES
    from pscv.data.clicks import simulate_clicks
    from pscv.data.dataset import Case
    from pscv.data.volumes import Volume
    from pscv.learn.training import TrainSettings, train

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (40, 216, 256)).astype(np.uint8)
    volume = Volume(rng.random(labels.shape).astype(np.float32))
    settings = TrainSettings(method=args.method, iterations=args.iterations, image_size=args.image_size,
                             batch_size=args.batch_size, device=args.device)
    model = train([Case(volume, simulate_clicks(labels, 0), labels)], ACDC_CLASSES, settings)
    seconds = model.metadata["training"]["seconds"]
    return {"seconds_per_iteration": seconds / args.iterations,
            "images_per_second": model.metadata["training"]["images_per_second"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--method", default="pscv")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    command = [sys.executable, __file__, "--one", "--iterations", str(args.iterations), "--image-size",
               str(args.image_size), "--batch-size", str(args.batch_size), "--method", args.method,
               "--device", args.device]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(args.processes)]
    results = [json.loads(w.communicate()[0].strip().splitlines()[-1]) for w in workers]
    slowest = max(r["seconds_per_iteration"] for r in results)
    print(json.dumps({"processes": args.processes, "image_size": args.image_size, "batch_size": args.batch_size,
                      "method": args.method, "slowest_seconds_per_iteration": round(slowest, 5),
                      "total_images_per_second": round(sum(r["images_per_second"] for r in results), 1)}))


if __name__ == "__main__":
    main()
