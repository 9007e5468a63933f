"""Benchmark runner: ``python -m bench [NAME ...] [--quick] [--with-tf]`` (or ``make bench``).

Each ``bench/bench_<name>.py`` defines ``run(quick: bool) -> dict`` returning
``{"rows": [row, ...], "details": {...}}``; a row is a dict with the keys of
``COLUMNS``. Results go to ``bench/results/<name>.json``; the summary table in
``docs/benchmarks.md`` (between the markers) is rebuilt from every results file, so
entries run on different days keep their own machine description. With several names,
each benchmark runs in a fresh process: thread settings and warmed-up caches of one must
not leak into the next. Every results file records the machine (with its float32 peak
from the CPU's own report, :mod:`bench.common`) and the load average when it ran: the
development machine is shared, and ratios within one run are what a result means.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
COLUMNS = ("benchmark", "result", "reference", "ratio", "target")


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def machine() -> dict:
    import torch

    from bench.common import peak

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "peak": peak().describe(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def render_table() -> str:
    lines = ["| " + " | ".join(COLUMNS) + " | run |", "|" + "---|" * (len(COLUMNS) + 1)]
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        for row in result["rows"]:
            cells = [str(row.get(c, "")) for c in COLUMNS]
            if row.get("did_not_hold"):  # a figure later re-measured and found wrong
                cells[COLUMNS.index("ratio")] += f" **did not hold: {row['did_not_hold']}**"
            load = result.get("load_average", {}).get("start", [None])[0]
            load = "load not recorded" if load is None else f"load {load}"
            lines.append("| " + " | ".join(cells) + f" | {result['date']} ({path.stem}, {load}) |")
    return "\n".join(lines)


def update_doc() -> None:
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(f"{head}{BEGIN}\n{render_table()}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {available()}")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, for a smoke test (rows printed, not recorded: "
                             "bench/results and docs/benchmarks.md hold full runs only)")
    parser.add_argument(
        "--with-tf",
        action="store_true",
        help="warp: also run TensorFlow Addons 0.23 / TF 2.15 beside ours (installs them once "
        "into bench/.tf-venv)",
    )
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = set(names) - set(available())
    if unknown:
        print(f"python -m bench: error: unknown benchmark(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    # As every speech2face command does at start-up: benchmarks measure what users run.
    from speech2face.runtime import setup_process

    setup_process()
    if len(names) > 1:  # each in its own process; one that fails does not stop the others
        flags = ["--quick"] * args.quick + ["--with-tf"] * args.with_tf
        failed = [f"{name} (exit {code})" for name in names
                  if (code := subprocess.run([sys.executable, "-m", "bench", name, *flags])
                      .returncode)]
        if failed:
            print(f"python -m bench: error: failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0
    for name in names:
        print(f"== {name}", flush=True)
        start, load = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
        run = importlib.import_module(f"bench.bench_{name}").run
        takes_tf = "with_tf" in inspect.signature(run).parameters
        options = {"with_tf": args.with_tf} if takes_tf else {}
        result = run(quick=args.quick, **options)
        result.update(
            name=name,
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            seconds=round(time.perf_counter() - start, 1),
            machine=machine(),
            load_average={"start": load, "end": [round(x, 2) for x in os.getloadavg()]},
            quick=args.quick,
        )
        for row in result["rows"]:
            print("  " + " | ".join(f"{c}: {row.get(c, '')}" for c in COLUMNS))
        if args.quick:  # (a quick run replaced the published full run's rows before)
            print("quick run: not recorded (bench/results and docs/benchmarks.md hold full "
                  "runs)")
            return 0
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    update_doc()
    print(f"results in {RESULTS}, summary in {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
