"""Several processes training one model, with PyTorch's own engine: torchrun + DistributedDataParallel.

`pscv train --nproc N` re-launches itself under `torch.distributed.run` (torchrun, `launch`); any
process torchrun starts finds its place through the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/MASTER_PORT), and the training loop joins the others (`join`): NCCL on GPUs
(each process on the GPU of its local rank), gloo on the CPU. One process without torchrun is the
ordinary single-process run: nothing here then communicates.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .. import PSCVError
from .devices import resolve_device


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes: `rank` of `size` (`local_rank` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 logs, reports progress and writes checkpoints and the model."""
        return self.rank == 0


def from_environment() -> Processes:
    """The processes torchrun started, from its environment variables; one process without them."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise PSCVError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (they are set by torchrun)") from None
    if size < 1 or not 0 <= rank < size:
        raise PSCVError(f"RANK {rank} and WORLD_SIZE {size} do not fit: rank must lie in 0..WORLD_SIZE-1")
    return Processes(rank, size, local_rank)


def join(processes: Processes, device_name: str = "auto") -> torch.device:
    """This process's device; with several processes, also joins their process group (once).

    GPUs: NCCL, process `local_rank` on GPU `local_rank`. CPU: gloo. Apple MPS cannot be shared."""
    device = resolve_device(device_name)
    if processes.size == 1:
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise PSCVError(f"device {device_name!r}: with several processes each one uses the GPU of its local "
                            "rank; give --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
        count = torch.cuda.device_count()
        if processes.local_rank >= count:
            raise PSCVError(f"process {processes.rank} (local rank {processes.local_rank}) has no GPU: torch sees "
                            f"{count}; start at most {count} processes per machine")
        device = torch.device("cuda", processes.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise PSCVError(f"device {device.type!r} cannot be shared by several processes; use cuda or cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend)
        atexit.register(leave)
    return device


def leave() -> None:
    """Leave the process group (when `join` made one); called at exit, while Python is still whole.

    DistributedDataParallel sits in reference cycles: collected first, so that no object holding the process
    group is left for the interpreter's teardown, which would then abort the process now and then
    ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(count: int, processes: Processes) -> torch.Tensor:
    """The training slices of this process: every `size`-th one from `rank` on (disjoint, together all)."""
    if count < processes.size:
        raise PSCVError(f"{processes.size} processes need at least {processes.size} training slices; "
                        f"there are {count}: use fewer processes")
    return torch.arange(processes.rank, count, processes.size)


class _GatherBatch(torch.autograd.Function):
    """All processes' tensors concatenated along the batch axis; each gets the gradient of its own part,
    summed over the processes (every process's loss uses every part)."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, gradient):
        gradient = gradient.contiguous()
        size, rank = dist.get_world_size(), dist.get_rank()
        own = torch.empty_like(gradient.chunk(size)[rank])
        if dist.get_backend() == "nccl":
            dist.reduce_scatter_tensor(own, gradient)
        else:  # gloo has no reduce-scatter: all-reduce, keep this process's part
            gradient = gradient.clone()
            dist.all_reduce(gradient)
            own.copy_(gradient.chunk(size)[rank])
        return own


def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """The batches of every process, concatenated in rank order (B * size, ...); the tensor itself in one
    process. Differentiable for floating-point tensors. Every process must give the same shape."""
    if not active():
        return tensor
    if tensor.is_floating_point():
        return _GatherBatch.apply(tensor)
    parts = [torch.empty_like(tensor, dtype=torch.uint8) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.to(torch.uint8).contiguous())
    return torch.cat(parts).to(tensor.dtype)


def mean_and_any(values: dict, flag: bool) -> tuple[dict, bool]:
    """Scalar tensors averaged over the processes, and whether `flag` is true in any: one all-reduce."""
    numbers = [v.detach().float() for v in values.values()]
    stacked = torch.stack(numbers + [torch.tensor(float(flag), device=numbers[0].device)])
    if active():
        dist.all_reduce(stacked)
        stacked[:-1] /= dist.get_world_size()
    numbers = stacked.tolist()
    return dict(zip(values, numbers[:-1])), numbers[-1] > 0


def gather_objects(item) -> list:
    """`item` of every process, in rank order (small picklable objects such as random-generator states)."""
    if not active():
        return [item]
    items = [None] * dist.get_world_size()
    dist.all_gather_object(items, item)
    return items


def torchrun_command(nproc: int, module_arguments: list[str]) -> list[str]:
    """The command that runs `python -m pscv.cli ARGUMENTS` in `nproc` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "pscv.cli", *module_arguments]


def launch(nproc: int, module_arguments: list[str]) -> tuple[int, bool]:
    """Run `pscv ARGUMENTS` under torchrun in `nproc` local processes and wait for them.

    Returns torchrun's exit status and whether this process was asked to stop. Ctrl+C reaches torchrun and
    the training processes directly (one terminal process group), which stop after a step and write a
    checkpoint: this process only waits for them. SIGTERM is passed on to torchrun."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # the same pscv in every process
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    child = subprocess.Popen(torchrun_command(nproc, module_arguments), env=env)
    stopped = []

    def on_signal(number, frame):
        stopped.append(number)
        if number == signal.SIGTERM:
            child.send_signal(number)

    previous = {number: signal.signal(number, on_signal) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait(), bool(stopped)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
