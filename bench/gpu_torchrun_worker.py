"""One process of the GPU check's torchrun run (bench/bench_gpu.py, check 2).

Trains the tiny voice stage through :func:`speech2face.train.fit` as ``torchrun`` started
it, then prints one JSON line: the backend, whether the trainable module was wrapped in
DDP, how many SyncBatchNorm layers it has, and the logged losses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_gpu import LOG_EVERY, _logged_totals, tiny_stage, voice_data  # noqa: E402
from speech2face.data import InMemoryData  # noqa: E402
from speech2face.distributed import leave_launched_process  # noqa: E402
from speech2face.train import TrainConfig, fit  # noqa: E402


def main() -> None:
    args = json.loads(sys.argv[1])
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


if __name__ == "__main__":
    main()
