"""Subprocesses of the GPU check (bench/bench_gpu.py); each prints one JSON line.

- ``torchrun`` (check 2), started by ``torchrun``: trains the tiny voice stage through
  :func:`speech2face.train.fit` and reports the backend, whether the trainable module was
  wrapped in DDP, how many SyncBatchNorm layers it has, and the logged losses.
- ``precision`` (check 1), a plain process: :func:`bench.bench_gpu.precision_check`
  with ``deterministic=true``, which stays set for the rest of the process.
- ``determinism`` (check 3), a plain process, so that the deterministic settings (which
  are process-wide, and cuBLAS reads its workspace setting when CUDA starts) apply from
  the first CUDA call: for each stage, with ``deterministic=true``, two unbroken runs and
  one run stopped half-way and resumed; reports whether their final weights are
  bit-identical, or the error a run stopped with.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_gpu import (  # noqa: E402
    LOG_EVERY,
    _logged_totals,
    precision_check,
    tiny_stage,
    train_losses,
    voice_data,
)
from speech2face.data import InMemoryData  # noqa: E402
from speech2face.distributed import leave_launched_process  # noqa: E402
from speech2face.train import TrainConfig, fit  # noqa: E402


def under_torchrun(args: dict) -> None:
    out = Path(args["out"])
    stage = tiny_stage(voice=True)
    tensors = voice_data(64)
    tensors.pop("identity")
    config = TrainConfig.tiny(steps=args["steps"], amp="bf16", device="cuda", batch_size=8,
                              log_every=min(LOG_EVERY, args["steps"]), val_every=10**9,
                              checkpoint_every=10**9, lr=1e-3)
    seen = {}

    def on_step(step: int) -> None:
        if step == 1:
            seen["backend"] = dist.get_backend() if dist.is_initialized() else None
            seen["sync_batchnorm"] = sum(isinstance(m, torch.nn.SyncBatchNorm)
                                         for m in stage.trainable.modules())

    fit(stage, InMemoryData(tensors, 8, seed=0), None, config, out, progress=False,
        on_step=on_step)
    if dist.get_rank() == 0:
        print(json.dumps({**seen, "ddp": seen.get("backend") is not None,
                          "losses": _logged_totals(out)}))
    leave_launched_process(0)  # as the CLI does


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def determinism(args: dict) -> None:
    steps, device, report = args["steps"], args.get("device", "cuda"), {}
    settings = {"deterministic": True, "checkpoint_every": steps // 2}
    for voice in (False, True):
        name = "voice" if voice else "decoder"
        try:
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                for run in ("first", "second"):
                    train_losses(voice, "bf16", device, steps, tmp / run, **settings)
                train_losses(voice, "bf16", device, steps // 2, tmp / "split", **settings)
                train_losses(voice, "bf16", device, steps, tmp / "split", resume=True,
                             **settings)
                first = _final_weights(tmp / "first")
                report[name] = {"repeat": _same(first, _final_weights(tmp / "second")),
                                "resume": _same(first, _final_weights(tmp / "split"))}
        except Exception as error:  # reported as the check's result, not hidden
            report[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
    print(json.dumps(report))


def precision(args: dict) -> None:
    rows = precision_check(args.get("device", "cuda"), args["steps"],
                           tuple(args.get("amps", ("none", "bf16", "fp16"))), deterministic=True,
                           batch_size=args.get("batch_size", 8))
    print(json.dumps(rows))


if __name__ == "__main__":
    mode, arguments = sys.argv[1], json.loads(sys.argv[2])
    {"torchrun": under_torchrun, "determinism": determinism, "precision": precision}[mode](
        arguments)
