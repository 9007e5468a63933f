"""The demo's two training stages on two torch threads against one (``demo.TORCH_THREADS``).

The demo's corpus (40 speakers, seed 0) is prepared once; then each round runs, in fresh
processes, alternately on 1 and 2 threads (the order reversed round by round), the face
decoder's training and the voice encoder's with the demo's own settings
(``demo.DECODER_OVERRIDES`` / ``VOICE_OVERRIDES``), for fewer steps than the demo. A
step's time is the time between optimiser steps after the first few (warm-up: the
first epoch reads and keeps the samples) and before the last (which also writes the
bundle); reported is the median over rounds of each round's 1-thread / 2-thread
wall-time ratio, with CPU time beside it: two threads buy wall time, not CPU time.
Every command sleeps its waiting OpenMP threads
(``runtime.passive_threads``), as the demo does.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

WARM_UP = 5  # steps not timed: the first epoch reads and keeps the samples


def _child(stage: str, threads: int, steps: int, shards: str, out: str, decoder: str) -> dict:
    """Train ``stage`` for ``steps`` demo steps on ``threads`` threads in this fresh process,
    into the new folder ``out``; ``decoder`` is the voice stage's frozen decoder."""
    import time

    from speech2face.runtime import setup_process

    setup_process()
    import torch

    from speech2face.demo import DECODER_OVERRIDES, VOICE_OVERRIDES, _train_config
    from speech2face.train import train_decoder, train_voice

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    stamps = []

    def on_step(step: int) -> None:
        stamps.append((time.perf_counter(), time.process_time()))

    if stage == "decoder":
        config = _train_config("decoder", steps, DECODER_OVERRIDES, 0)
        train_decoder(shards, out, config, progress=False, on_step=on_step)
    else:
        config = _train_config("voice", steps, VOICE_OVERRIDES, 0)
        train_voice(shards, decoder, out, config, progress=False, on_step=on_step)
    # up to the last step but one: the last also writes the bundle
    (w0, c0), (w1, c1) = stamps[WARM_UP - 1], stamps[-2]
    timed = len(stamps) - 1 - WARM_UP
    return {"wall_s": (w1 - w0) / timed, "cpu_s": (c1 - c0) / timed}


def _spawn(*args) -> dict:
    from bench.common import in_fresh_process

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return in_fresh_process(__file__, "_child", args, env)


def run(quick: bool = False) -> dict:
    from bench.bench_train import _demo_shards
    from bench.common import round_ratios
    from speech2face.demo import DEMO_SPEAKERS, TORCH_THREADS

    rounds = 1 if quick else 3
    steps = {"decoder": 40 if quick else 200, "voice": 12 if quick else 40}
    rows, details = [], {"rounds": rounds, "steps": steps, "warm_up_steps": WARM_UP}
    with tempfile.TemporaryDirectory() as tmp:
        shards = _demo_shards(Path(tmp), DEMO_SPEAKERS)
        times = {(stage, n): [] for stage in steps for n in (1, TORCH_THREADS)}
        for r in range(rounds):
            order = (1, TORCH_THREADS) if r % 2 == 0 else (TORCH_THREADS, 1)
            for stage in steps:  # the decoder first: the voice stage trains against it
                for n in order:
                    out = f"{tmp}/{stage}-{n}-{r}"
                    times[stage, n].append(_spawn(stage, n, steps[stage], str(shards), out,
                                                  f"{tmp}/decoder-1-0"))
    for stage, count in steps.items():
        one, many = times[stage, 1], times[stage, TORCH_THREADS]
        ratio, text = round_ratios([t["wall_s"] for t in one], [t["wall_s"] for t in many])
        cpu = statistics.median(m["cpu_s"] / o["cpu_s"] for o, m in zip(one, many, strict=True))
        details[stage] = {"1": one, str(TORCH_THREADS): many}
        med = lambda runs, key: 1000 * statistics.median(t[key] for t in runs)  # noqa: E731
        rows.append({
            "benchmark": f"demo {stage} training step (demo settings, {count} steps, steps "
                         f"{WARM_UP + 1}-{count - 1} timed), {TORCH_THREADS} threads vs 1; "
                         f"{text}",
            "result": f"{med(many, 'wall_s'):.0f} ms/step (CPU {med(many, 'cpu_s'):.0f})",
            "reference": f"1 thread {med(one, 'wall_s'):.0f} ms/step "
                         f"(CPU {med(one, 'cpu_s'):.0f})",
            "ratio": f"{ratio:.2f}x faster (wall); CPU {cpu:.2f}x",
            "target": "",
        })
    return {"rows": rows, "details": details}
