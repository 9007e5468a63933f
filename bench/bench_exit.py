"""What the console command's quick exit (``speech2face.cli.exit_now``) saves per command.

Each case runs as a fresh process twice, alternately, in several rounds: once ending as a
normal interpreter exit does (``raise SystemExit(main(...))``: every object freed one by
one, the C++ destructors of torch's operator registry) and once through ``exit_now`` (the
threads waited for, the ``atexit`` handlers run, the streams flushed, then ``os._exit``),
as the ``speech2face`` command and ``python -m speech2face`` end. CPU time of the child
(user + system, ``RUSAGE_CHILDREN``): the machine is shared, and wall time would count
its other load. A ratio is taken within a round and the median over rounds reported.

- ``speech2face spectrogram`` of one 6-s WAV: a short command that imports torch.
- The exit alone after ``import torch`` and after ``import torch._dynamo`` (which the
  first ``torch.optim`` optimiser imports: every training command), each against the same
  import ended by ``exit_now``.
"""

from __future__ import annotations

import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import round_ratios

NORMAL = "import sys; from speech2face.cli import main; raise SystemExit(main(sys.argv[1:]))"
QUICK = "import sys; from speech2face.cli import main, exit_now; exit_now(main(sys.argv[1:]))"


def _child_cpu(code: str, args: list[str], clean: Path | None = None) -> float:
    """CPU seconds of ``python -c code *args`` (which must exit 0)."""
    if clean is not None:
        shutil.rmtree(clean, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{code!r} {args} failed: {result.stderr.strip()[-500:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _compare(name: str, normal, quick, rounds: int) -> dict:
    times: dict[str, list[float]] = {"normal": [], "quick": []}
    for index in range(rounds):
        order = (("normal", normal), ("quick", quick))
        for label, run in order[::-1] if index % 2 else order:
            times[label].append(run())
    ratio, text = round_ratios(times["normal"], times["quick"])
    saved = statistics.median(a - b for a, b in zip(times["normal"], times["quick"],
                                                    strict=True))
    return {
        "benchmark": f"{name}: fresh process ended by exit_now vs a normal interpreter exit, "
                     f"CPU s; {text}; {saved:.2f} s saved",
        "result": f"{statistics.median(times['quick']):.2f} s CPU",
        "reference": f"normal exit {statistics.median(times['normal']):.2f} s CPU",
        "ratio": f"{ratio:.2f}x less CPU",
        "target": "",
        "_times": times,
    }


def run(quick: bool = False) -> dict:
    import soundfile as sf

    rounds = 2 if quick else 6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wav, out = Path(tmp) / "clip.wav", Path(tmp) / "out"
        rng = np.random.default_rng(0)
        sf.write(wav, (0.1 * rng.standard_normal(6 * 16_000)).astype(np.float32), 16_000)
        args = ["spectrogram", str(wav), "-o", str(out)]
        rows.append(_compare("speech2face spectrogram, one 6-s WAV",
                             lambda: _child_cpu(NORMAL, args, out),
                             lambda: _child_cpu(QUICK, args, out), rounds))
    for module in ("torch", "torch._dynamo"):
        rows.append(_compare(
            f"interpreter exit after import {module}",
            lambda m=module: _child_cpu(f"import {m}", []),
            lambda m=module: _child_cpu(f"import {m}; from speech2face.cli import exit_now; "
                                        "exit_now(0)", []), rounds))
    details = {row["benchmark"].split(":")[0]: row.pop("_times") for row in rows}
    return {"rows": rows, "details": {"cpu_s": details}}
