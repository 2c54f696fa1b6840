"""Run by torchrun in test_distributed.py: train on a dataset folder as `pscv train` does, and stop when
the loss has been recorded RECORDS times (what Ctrl+C does, at a step the test can choose).

    python -m torch.distributed.run --standalone --nproc-per-node 2 train_and_stop.py DATASET OUT SETTINGS RECORDS
"""

import json
import sys

from pscv.base.progress import Cancelled
from pscv.data.dataset import load_training_cases
from pscv.learn.training import TrainSettings, train

dataset, out, settings, records = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
settings = TrainSettings.from_dict(settings)
classes, cases = load_training_cases(dataset, settings.method)
calls = []


def should_stop() -> bool:  # with several processes, asked at each step that records the loss
    calls.append(1)
    return len(calls) >= records


stopped = False
try:
    train(cases, classes, settings, should_stop=should_stop, checkpoint_dir=out)
except Cancelled:
    stopped = True
sys.exit(0 if stopped else "the training was not stopped")
