"""Where a training process runs: its place in a ``torchrun`` group, its device, its
autocast dtype, and the collective operations the loop needs.

Kept apart from :mod:`speech2face.train` so that the loop reads as the loop: everything
here is about the process (rank, device, determinism), nothing about a stage or its
data. Outside ``torchrun`` every function is a cheap no-op or single-process answer, so
the same code trains on one CPU and on many GPUs.
"""

from __future__ import annotations

import gc
import inspect
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from speech2face.errors import ConfigError
from speech2face.utils import device_problem

if TYPE_CHECKING:
    from speech2face.config import TrainConfig


@dataclass(frozen=True)
class Placement:
    """Where this process sits in a (possibly distributed) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def micro_batch(self, config: TrainConfig) -> int:
        """Samples per micro-batch of this process: batch_size / (world_size * grad_accum)."""
        share = self.world_size * config.grad_accum
        if config.batch_size % share:
            raise ConfigError(None, f"batch_size {config.batch_size} is not divisible by "
                                    f"{self.world_size} processes x grad_accum {config.grad_accum}")
        return config.batch_size // share


def init_distributed(device: str = "auto") -> Placement:
    """Join the process group that ``torchrun`` describes in the environment (if any).

    NCCL when this process trains on a GPU, gloo on CPU. A run launched by ``torchrun``
    joins its group even with one process (DDP and SyncBatchNorm then run as they would
    on many GPUs: the GPU check uses that); otherwise, without ``WORLD_SIZE`` > 1, this is
    a single-process run and nothing is initialised. Safe to call twice.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    launched = world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if launched and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(local_rank)
            # Bound to its GPU (torch >= 2.3): NCCL sets up at once, and barrier() knows
            # the device instead of warning that it guesses it.
            bound = {"device_id": torch.device("cuda", local_rank)} if "device_id" in \
                inspect.signature(dist.init_process_group).parameters else {}
            dist.init_process_group("nccl", **bound)
        else:
            dist.init_process_group("gloo")
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return Placement(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown_distributed() -> None:
    """End a torchrun process cleanly: free what holds the process group, then destroy it.

    DDP's reference cycles keep the gloo process group alive past
    ``destroy_process_group`` until the garbage collector runs; if that is at interpreter
    exit, gloo's threads are torn down with it and the process aborts ("terminate called
    without an active exception", about 1 run in 4 on a busy machine with torch 2.13),
    so a finished training run exits non-zero. Collecting first avoids it.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def leave_launched_process(code: int) -> None:
    """End a ``torchrun`` worker whose command has finished: shut the process group down,
    flush the output, and leave with ``code`` without the interpreter's teardown
    (``os._exit``, as multiprocessing's own child processes leave).

    Collecting before ``destroy_process_group`` (:func:`shutdown_distributed`) made the
    abort at teardown rare, not impossible (the 2-process test met it in 1 of 12 runs
    beside a busy process, and in 1 of 7 full test runs), and an aborting worker makes
    ``torchrun`` stop the others, maybe while rank 0 still writes. Everything the
    command writes is written (and fsynced) before it returns. Outside ``torchrun`` this
    does nothing and returns.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    shutdown_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resolve_device(config: TrainConfig, placement: Placement) -> torch.device:
    if config.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", placement.local_rank)
        return torch.device("cpu")
    # mps, xpu and meta, or cuda:N past the GPUs there are: one line, as for --device.
    if problem := device_problem(config.device):
        raise ConfigError(None, f"device: {problem}")
    device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", placement.local_rank)
    return device


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``config.amp`` on ``device`` (``None``: float32).

    ``auto``: bf16 on a GPU that has it, else fp16 (with loss scaling); float32 on CPU.
    ``bf16`` runs on CPU too (CPU autocast: the tests compare it with float32); ``fp16``
    on CPU is a :class:`ConfigError`.
    """
    if config.amp == "none":
        return None
    if device.type == "cpu":
        if config.amp == "fp16":
            raise ConfigError(None, "amp: fp16 needs a CUDA GPU (on CPU use amp=bf16 or "
                                    "amp=none)")
        return torch.bfloat16 if config.amp == "bf16" else None
    if device.type != "cuda":
        return None  # other accelerators train in float32
    if config.amp == "fp16" or (config.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def set_deterministic(config: TrainConfig) -> None:
    """With ``config.deterministic``: deterministic cuDNN and torch algorithms (a process-
    wide setting; an operation with no deterministic version then raises)."""
    if not config.deterministic:
        return
    # cuBLAS needs a fixed workspace for repeatable results; read when CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def reduce_device(device: torch.device) -> torch.device:
    """Where tensors for a collective operation live: ``device`` under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the processes (returned as is outside a process group)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def broadcast_linear(linear: nn.Linear | None, device: torch.device) -> nn.Linear:
    """Rank 0's ``linear`` on every process (a no-op outside a process group)."""
    if not dist.is_initialized():
        return linear
    where = reduce_device(device)
    shape = torch.tensor(list(linear.weight.shape) if linear is not None else [0, 0],
                         device=where)
    dist.broadcast(shape, src=0)
    if linear is None:
        linear = nn.Linear(int(shape[1]), int(shape[0])).requires_grad_(False)
    for tensor in (linear.weight, linear.bias):
        moved = tensor.detach().to(where)
        dist.broadcast(moved, src=0)
        tensor.data.copy_(moved.cpu())
    return linear
