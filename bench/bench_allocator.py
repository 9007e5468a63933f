"""What keeping freed memory (``speech2face.tune_allocator``, done by every command) is worth.

Each case runs twice in fresh processes, alternately: with glibc's default behaviour (the
``MALLOC_*`` variables removed from the environment) and after ``tune_allocator()``.
Reported: median wall and CPU time per unit of work, and minor page faults (memory the
kernel had to map and zero afresh).

- A tiny voice training step, batch 8: spectrograms of the 6-s clips, voice encoder
  forward, the paper's loss through the frozen face decoder's first layer, backward,
  Adam (each code's as its training loop made it: multi-tensor ``foreach`` now, one
  tensor at a time then). Target (issue 17): >= 1.4x faster than the code the issue
  measured (commit ``TODAY``, extracted from git history into a temporary folder and
  run, with glibc's default allocator as it ran then, in the same rounds). The tuned
  against default allocator ratio of today's code is shown beside it: what the
  allocator alone is worth.
- ``spectrogram()`` of a batch of 64 clips against one clip at a time, per clip (tuned).
  Target: the batch no slower per clip. The two take turns call by call in one process.

Five rounds, each running every process once, in the reverse order of the round before.
A ratio is taken within a round (the host's speed drifts between rounds: on a shared
2-core VM the same step took 645 to 839 ms of CPU in one hour) and the median over the
rounds is reported, with each round's ratio.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

STEPS = 12  # per process; the first two warm up
SPECTROGRAM_BATCH = 64
# main when issue 17 was filed (its "today"): the last commit before this wave's work.
TODAY = "6546ed6"


def _child(case: str, tuned: bool, quick: bool, foreach: bool | None = True) -> dict:
    """Run ``case`` in this (fresh) process; returns per-unit medians. ``foreach``: Adam's
    (True, as ``train.py`` makes it; None, PyTorch's default, as the old code made it)."""
    import resource
    import time

    import torch

    if tuned:
        from speech2face.runtime import tune_allocator

        if not tune_allocator():
            raise SystemExit("tune_allocator() changed nothing on this system")
    torch.set_num_threads(1)  # CPU time per unit of work; the machine is shared
    torch.manual_seed(0)

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def measure(fns: dict, repeats: int, units: int = 1) -> dict:
        """Per-unit medians of each function; the functions take turns, call by call, so
        that the host's drift falls on all of them alike."""
        for fn in fns.values():
            fn()
            fn()
        times = {name: {"wall_s": [], "cpu_s": [], "minor_faults": []} for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                f, w, c = faults(), time.perf_counter(), time.process_time()
                fn()
                times[name]["wall_s"].append((time.perf_counter() - w) / units)
                times[name]["cpu_s"].append((time.process_time() - c) / units)
                times[name]["minor_faults"].append((faults() - f) / units)
        return {name: {k: statistics.median(v) for k, v in t.items()}
                for name, t in times.items()}

    from speech2face.audio import CLIP_SAMPLES, spectrogram

    if case == "voice_step":
        from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig
        from speech2face.losses import speech2face_loss
        from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

        encoder = VoiceEncoder(VoiceEncoderConfig.tiny())
        decoder = FaceDecoder(FaceDecoderConfig.tiny(), 40 + 144 * torch.rand(68, 2))
        decoder.requires_grad_(False)
        optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-4, foreach=foreach)
        waves = 0.1 * torch.randn(8, CLIP_SAMPLES)
        target = torch.rand(8, encoder.config.output_dim)

        def step():
            loss, _ = speech2face_loss(encoder(spectrogram(waves)), target, decoder.f_dec, None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return measure({"step": step}, 4 if quick else STEPS)["step"]
    waves = 0.1 * torch.randn(SPECTROGRAM_BATCH, CLIP_SAMPLES)
    return measure({"batch": lambda: spectrogram(waves),
                    "single": lambda: [spectrogram(w) for w in waves]},
                   3 if quick else 8, SPECTROGRAM_BATCH)


def _spawn(case: str, tuned: bool, quick: bool, tree: Path | None = None) -> dict:
    """``_child`` in a fresh process, on this checkout's code or on ``tree``'s (the old
    code first on the path; this file is loaded by its path, not as ``bench``)."""
    from bench.common import in_fresh_process

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    foreach = True if tree is None else None  # each code's Adam as its training made it
    return in_fresh_process(__file__, "_child", (case, tuned, quick, foreach), env, cwd=tree)


@contextlib.contextmanager
def _old_code(commit: str):
    """The ``speech2face`` package of ``commit``, from this checkout's git history, in a
    temporary folder; None where there is no such history (a source archive)."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(root), "archive", commit, "speech2face"],
                                 capture_output=True)
        if archive.returncode != 0:
            yield None
            return
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        yield Path(tmp)


def _ratio(slow: list[dict], fast: list[dict]) -> tuple[float, str]:
    """:func:`bench.common.round_ratios` of the runs' CPU times (imported here: the child
    processes load this file by its path, where ``bench`` is not importable)."""
    from bench.common import round_ratios

    return round_ratios([r["cpu_s"] for r in slow], [r["cpu_s"] for r in fast])


def _row(name, tuned, default, ratios, target, ratio_ok) -> dict:
    ratio, rounds = ratios
    return {
        "benchmark": f"{name}; {rounds}",
        "result": f"{1000 * tuned['wall_s']:.0f} ms (CPU {1000 * tuned['cpu_s']:.0f}), "
                  f"{tuned['minor_faults']:.0f} faults",
        "reference": f"{1000 * default['wall_s']:.0f} ms (CPU {1000 * default['cpu_s']:.0f}), "
                     f"{default['minor_faults']:.0f} faults",
        "ratio": f"{ratio:.2f}x (CPU)",
        "target": "(the allocator's share of the row above)" if ratio_ok is None else
        target + (" (met)" if ratio_ok(ratio) else " (NOT met)"),
    }


def run(quick: bool = False) -> dict:
    rounds = 1 if quick else 5
    results: dict[str, list] = {}
    with _old_code(TODAY) as old:
        for index in range(rounds):
            # Each round runs every process once, in the reverse order of the round
            # before, so that a drift in the host's speed falls on all of them alike.
            runs = [("voice_step", "default", False, None), ("voice_step", "tuned", True, None)]
            if old is not None:
                runs.append(("voice_step", "today", False, old))
            runs += [("spectrogram", "default", False, None), ("spectrogram", "tuned", True, None)]
            for case, label, tuned, tree in runs[::-1] if index % 2 else runs:
                results.setdefault(f"{case}_{label}", []).append(
                    _spawn(case, tuned, quick, tree=tree))

    def median(runs: list[dict]) -> dict:
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    step = {k: median(results[f"voice_step_{k}"])
            for k in ("default", "tuned", "today") if f"voice_step_{k}" in results}
    spec = {k: {part: median([r[part] for r in results[f"spectrogram_{k}"]])
                for part in ("batch", "single")} for k in ("default", "tuned")}
    name = ("tiny voice training step, batch 8 (spectrograms, encoder, loss, backward, Adam), "
            "1 thread")
    tuned_runs = results["voice_step_tuned"]
    rows = []
    if "today" in step:
        rows.append(_row(f"{name}: this code as commands run it vs the code of {TODAY} "
                         "(issue 17's today, glibc default)", step["tuned"], step["today"],
                         _ratio(results["voice_step_today"], tuned_runs),
                         ">= 1.4x", lambda r: r >= 1.4))
    else:
        rows.append({"benchmark": f"{name}: vs the code of {TODAY}", "result": "not measured",
                     "reference": "no git history in this checkout", "ratio": "",
                     "target": ">= 1.4x"})
    rows.append(_row(f"{name}: tuned allocator vs glibc default, this code", step["tuned"],
                     step["default"], _ratio(results["voice_step_default"], tuned_runs),
                     "", None))
    for setting in ("tuned", "default"):
        batch, single = spec[setting]["batch"], spec[setting]["single"]
        runs = results[f"spectrogram_{setting}"]
        ratio, rounds = _ratio([r["single"] for r in runs], [r["batch"] for r in runs])
        rows.append({
            "benchmark": f"spectrogram() per clip, batch of {SPECTROGRAM_BATCH} vs one clip at "
                         f"a time, 1 thread, allocator {setting}; {rounds}",
            "result": f"{1000 * batch['wall_s']:.2f} ms (CPU {1000 * batch['cpu_s']:.2f}), "
                      f"{batch['minor_faults']:.0f} faults",
            "reference": f"{1000 * single['wall_s']:.2f} ms (CPU {1000 * single['cpu_s']:.2f})"
                         f", {single['minor_faults']:.0f} faults",
            "ratio": f"{ratio:.2f}x (CPU)",
            "target": "" if setting == "default" else
            ">= 1x" + (" (met)" if ratio >= 1 else " (NOT met)"),
        })
    return {"rows": rows, "details": {"runs": results, "voice_step": step, "spectrogram": spec,
                                      "today_commit": TODAY}}
