"""Where the wall time of ``speech2face prepare --workers 2`` goes, event by event.

Issue 12 item 5 asks 2 workers for 1.8x the throughput of 1 on the demo corpus (292
clips); ``bench_data`` measures the ratio, this file explains it. One run of each worker
count on the demo corpus, each in a fresh process that runs the command's own ``main``
(as ``speech2face prepare`` does: torch not imported, so the command forks a child that
loads dlib's models and forks its pool of one worker from itself) with a few functions
wrapped to record when they start and end: dlib's model load, the pool's start, the
shard writer's import and every video ("unit") in every process. Reported:

- the serial part of the 2-worker run, on one core: the interpreter, imports and listing
  before the child loads dlib's models, and the end after the last unit (the models, 100
  MB of 68-point shape predictor parsed, load in the child beside the command's import
  of the shard writer);
- each computing process's busy share between its first and last unit (the child's and
  its pool worker's);
- the ceiling these give a whole run, ``T1 / (S + (T1 - S) / 2)`` with ``S`` the 2-worker
  run's serial seconds and ``T1`` the 1-worker run's: perfect halving of everything else.

Wall times are of one run each (not the rounds of ``bench_data``): the host's speed
drifts, so compare the parts of one run, not runs of different days.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from bench.common import Clock, load_average, load_by_path


def _process_age() -> float:
    """Seconds since this process started (Linux: /proc; its clock ticks are 10 ms)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def _run_timed(root: str, out: str, workers: int, logs: str) -> None:
    """In a fresh process: ``speech2face prepare voxceleb1`` with its events timed, ended
    as the command ends (``exit_now``); the events go to ``logs``, a file per process."""
    start, age = time.perf_counter(), _process_age()
    import sys

    import speech2face.data.prepare  # noqa: F401  (the module, not data.prepare)
    from speech2face import faces
    from speech2face.cli import exit_now, main

    stage = sys.modules["speech2face.data.prepare"]
    main_pid = os.getpid()
    events: list[tuple[str, float, float]] = []

    def save(**more) -> None:
        name = "main" if os.getpid() == main_pid else str(os.getpid())
        Path(logs, f"{name}.json").write_text(json.dumps({"events": events, **more}))

    def timed(owner, name: str, label: str) -> None:
        function = getattr(owner, name)

        def wrapper(*args, **kwargs):
            began = time.perf_counter() - start
            try:
                return function(*args, **kwargs)
            finally:
                events.append((label, began, time.perf_counter() - start))
                if os.getpid() != main_pid:  # a pool worker: killed at the end, not exited
                    save()

        setattr(owner, name, wrapper)

    timed(faces, "load_models", "models")
    timed(stage, "_pool", "pool")
    timed(stage, "_import_writer", "writer import")
    timed(stage._Processor, "__call__", "unit")
    code = main(["prepare", "voxceleb1", "--root", root, "--out", out, "--workers",
                 str(workers)])
    save(end=time.perf_counter() - start, age_at_start=age, code=code)
    exit_now(code)


def _timeline(root: Path, tmp: Path, workers: int) -> dict:
    """One timed run in a fresh process: its wall time and each process's events."""
    import subprocess
    import sys

    logs = tmp / f"logs-{workers}"
    logs.mkdir()
    # Not in_fresh_process: the run ends as the command does (exit_now), so its events
    # come back in files, not as the function's return value.
    args = (str(root), str(tmp / f"shards-{workers}"), workers, str(logs))
    code = f"{load_by_path(__file__)}b._run_timed(*{args!r})"
    with Clock() as clock:
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                       cwd=Path(__file__).resolve().parents[1])
    processes = {}
    for path in logs.glob("*.json"):
        log = json.loads(path.read_text())
        units = sorted((b, e) for label, b, e in log["events"] if label == "unit")
        # the command; the child that started the pool (its pool worker, forked inside
        # the pool's start, has no "pool" event); the pool's worker
        kind = "main" if path.stem == "main" else (
            "child" if any(label == "pool" for label, *_ in log["events"]) else "pool")
        processes[kind] = {
            **{k: v for k, v in log.items() if k != "events"},
            "units": len(units), "first": units[0][0] if units else None,
            "last": units[-1][1] if units else None, "busy": sum(e - b for b, e in units),
            **{label: [b, e] for label, b, e in log["events"] if label != "unit"}}
    return {"wall_s": clock.wall, "processes": processes}


def _parts(two: dict, one: dict) -> dict:
    main, child, pool = (two["processes"][k] for k in ("main", "child", "pool"))
    models_began, models_ended = child["models"]
    # Before the models: the interpreter and imports, from the command's start, the
    # listing and the child's fork. After the last unit: the manifest and the exit, to
    # the parent's clock.
    before = main["age_at_start"] + models_began
    tail = two["wall_s"] - main["age_at_start"] - max(child["last"], pool["last"])
    serial = before + tail
    t1 = one["wall_s"]
    writer_began, writer_ended = main["writer import"]
    return {
        "before_models_s": before, "models_s": models_ended - models_began, "tail_s": tail,
        "serial_s": serial, "wall_1_s": t1, "wall_2_s": two["wall_s"],
        "child_busy": child["busy"] / (child["last"] - child["first"]),
        "pool_busy": pool["busy"] / (pool["last"] - pool["first"]),
        "writer_import_s": writer_ended - writer_began,
        "ratio": t1 / two["wall_s"], "ceiling": t1 / (serial + (t1 - serial) / 2),
    }


def run(quick: bool = False) -> dict:
    from speech2face.demo_data import make_demo_data

    details = {"load_average_at_start": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        speakers = 8 if quick else 40  # the demo's corpus: 40 speakers, seed 0
        corpus = make_demo_data(tmp / "corpus", speakers=speakers, seed=0, progress=False)
        runs = {workers: _timeline(corpus, tmp, workers) for workers in (2, 1)}
    parts = _parts(runs[2], runs[1])
    details.update(runs={str(k): v for k, v in runs.items()}, parts=parts, speakers=speakers)
    row = {
        "benchmark": (f"speech2face prepare voxceleb1 --workers 2, demo corpus ({speakers} "
                      f"speakers), where the wall time goes: one run of each count, events "
                      f"timed inside the command"),
        "result": (f"{parts['wall_2_s']:.2f} s: serial {parts['serial_s']:.2f} s on one core "
                   f"(interpreter, imports and listing {parts['before_models_s']:.2f}, end "
                   f"{parts['tail_s']:.2f}); dlib's models {parts['models_s']:.2f} s in the "
                   f"child beside the command's {parts['writer_import_s']:.2f}-s import of "
                   f"the shard writer; then the child's units {parts['child_busy']:.0%} busy "
                   f"and its pool worker's {parts['pool_busy']:.0%}"),
        "reference": f"1 worker {parts['wall_1_s']:.2f} s",
        "ratio": (f"{parts['ratio']:.2f}x this pair; {parts['ceiling']:.2f}x with everything "
                  f"but the serial part halved"),
        "target": "(explains the 292-clip row of data)",
    }
    return {"rows": [row], "details": details}
