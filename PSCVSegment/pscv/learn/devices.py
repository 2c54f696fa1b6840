"""Choosing the device torch runs on, and telling when one ran out of memory."""

from __future__ import annotations

import torch

from .. import PSCVError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA, then Apple MPS, then the CPU; a named device must be usable."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PSCVError("device 'cuda' was asked for, but torch sees no CUDA GPU "
                        f"(torch {torch.__version__}); use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PSCVError("device 'mps' was asked for, but Apple MPS is not available; use --device auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise PSCVError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): autocast to it then speeds training up
    (2x on the U-Net on an AMD EPYC with AVX512-BF16); elsewhere it would be emulated, and slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without these probes
        return False


def uses_bfloat16(device: torch.device, precision: str = "auto") -> bool:
    """Whether to train in bfloat16 autocast: `precision` bfloat16 or float32, or auto: CUDA GPUs, and CPUs
    that compute bfloat16 natively."""
    if precision != "auto":
        return precision == "bfloat16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bfloat16())


OUT_OF_MEMORY_TEXTS = ("out of memory", "ALLOC_FAILED", "can't allocate memory", "not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says a device (a GPU, or the CPU's allocator) ran out of memory."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_TEXTS)


def out_of_memory_advice(device: str | None) -> str:
    return (f"out of memory on {device or 'this machine'}: lower image_size or batch_size (--image-size, "
            "--batch-size), or run on a machine with more memory")
