"""Sparse image warp and face decoder speed on CPU, against references run beside it.

The warp case is the face decoder's: a batch of 8 RGB 224 x 224 images, 68 control points,
order 1, regularisation 0.1, 2 boundary points. References, all in this run on the same
inputs:

- TensorFlow Addons 0.23 on TensorFlow 2.15 (the implementation the paper's code used),
  both under ``tf.function`` and eagerly, with the same thread counts. Only with
  ``python -m bench warp --with-tf``: that installs them once into the benchmark's own
  virtual environment ``bench/.tf-venv`` (about 600 MB, from PyPI) and runs them there.
- A naive PyTorch port: TensorFlow's formulation (float32 solve, the full ``(B, H*W, N)``
  kernel matrix from ``|q|^2 - 2 q.c + |c|^2``, plain autograd), same bilinear sampling.
- The same port in float64, as the accuracy reference for both float32 implementations:
  the warped image, and the gradient of a fixed linear loss with respect to the
  destination points (the path by which the face decoder learns its landmarks).

Threading: the same forward pass on 1 and 2 threads, on an otherwise idle machine and
with one competing busy process started by the benchmark, with OpenMP's default
(spinning) threads and with the sleeping ones every command sets up
(``speech2face.runtime.passive_threads``); wall time with CPU time beside it. Target: 2
threads beside a busy process no slower than 1 thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import load_average, timed_ms
from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig
from speech2face.runtime import torch_threads
from speech2face.warp import boundary_points, dense_image_warp, phi, sparse_image_warp

BATCH, SIZE, POINTS = 8, 224, 68
ORDER, REGULARIZATION, BOUNDARY = 1, 0.1, 2
TF_VENV = Path(__file__).resolve().parent / ".tf-venv"
TF_PACKAGES = ("tensorflow-cpu==2.15.1", "tensorflow-addons==0.23.0")


def naive_warp(image, source, dest, order=ORDER, reg=REGULARIZATION, k=BOUNDARY):
    """TensorFlow Addons' algorithm written directly in PyTorch (plain autograd)."""
    b, _, h, w = image.shape
    dtype = image.dtype
    border = boundary_points(h, w, k, dtype).expand(b, -1, -1)
    c = torch.cat([dest, border], 1)
    f = torch.cat([dest - source, torch.zeros_like(border)], 1)
    n = c.shape[1]
    cc = c @ c.transpose(1, 2)
    sq = cc.diagonal(dim1=1, dim2=2)
    a = phi(sq[:, :, None] - 2 * cc + sq[:, None, :], order) + reg * torch.eye(n, dtype=dtype)
    p = torch.cat([c, torch.ones(b, n, 1, dtype=dtype)], 2)
    lhs = torch.cat([torch.cat([a, p], 2),
                     torch.cat([p.transpose(1, 2), torch.zeros(b, 3, 3, dtype=dtype)], 2)], 1)
    wv = torch.linalg.solve(lhs, torch.cat([f, torch.zeros(b, 3, 2, dtype=dtype)], 1))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype),
                            indexing="ij")
    q = torch.stack([ys, xs], -1).reshape(1, h * w, 2).expand(b, -1, -1)
    d2 = (q * q).sum(-1, keepdim=True) - 2 * q @ c.transpose(1, 2) + sq[:, None, :]
    flow = phi(d2, order) @ wv[:, :n] + torch.cat([q, torch.ones(b, h * w, 1, dtype=dtype)],
                                                  2) @ wv[:, n:]
    return dense_image_warp(image, flow.view(b, h, w, 2)), flow.view(b, h, w, 2)


def ours(image, source, dest):
    return sparse_image_warp(image, source, dest, ORDER, REGULARIZATION, BOUNDARY)


@contextlib.contextmanager
def competing_process():
    """One busy process beside the benchmark for the duration of the block."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it get going
        yield
    finally:
        busy.kill()
        busy.wait()


def warp_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(BATCH, 3, SIZE, SIZE, generator=g)
    source = 30 + 164 * torch.rand(BATCH, POINTS, 2, generator=g)
    dest = source + 4 * torch.randn(BATCH, POINTS, 2, generator=g)
    weights = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    return image, source, dest, weights


def _forward_backward(warp_fn, image, source, dest):
    image, source, dest = (t.detach().requires_grad_() for t in (image, source, dest))

    def step():
        warped, _ = warp_fn(image, source, dest)
        warped.square().mean().backward()
    return step


def dest_gradient(warp_fn, image, source, dest, weights):
    """d/d dest of sum(warped * weights), and the warped image."""
    dest = dest.detach().requires_grad_()
    warped, _ = warp_fn(image, source, dest)
    (warped * weights).sum().backward()
    return warped.detach(), dest.grad


# --------------------------------------------------------------------- TensorFlow Addons


def tf_python() -> Path:
    """The TF environment's interpreter, made on first use (TF 2.15 needs Python <= 3.11)."""
    python = TF_VENV / "bin" / "python"
    check = [str(python), "-c", "import tensorflow, tensorflow_addons"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    if sys.version_info >= (3, 12):
        raise SystemExit("python -m bench warp --with-tf: TensorFlow 2.15 needs Python <= 3.11")
    print(f"installing {' '.join(TF_PACKAGES)} into {TF_VENV} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TF_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *TF_PACKAGES], check=True)
    return python


def run_tf(inputs, threads: int, repeats: int) -> tuple[dict, dict]:
    """Times and outputs of TensorFlow Addons on ``inputs``, in a fresh process."""
    python = tf_python()
    worker = Path(__file__).resolve().parent / "tf_warp_worker.py"
    image, source, dest, weights = inputs
    with tempfile.TemporaryDirectory() as tmp:
        given, got = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(given, image=image.numpy(), source=source.numpy(), dest=dest.numpy(),
                 weights=weights.numpy(), order=ORDER, regularization=REGULARIZATION,
                 boundary=BOUNDARY)
        out = subprocess.run([str(python), str(worker), str(given), str(got), str(threads),
                              str(repeats)], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"TensorFlow worker failed:\n{out.stderr[-3000:]}")
        times = json.loads(out.stdout.strip().splitlines()[-1])
        arrays = dict(np.load(got))
    return times, arrays


def threads_child(threads: int, repeats: int) -> dict:
    """Forward times on 1 and ``threads`` threads in this process (see _spawn_threads).

    The two settings alternate call by call, so that the other jobs of a shared machine
    weigh on both alike (measured one after the other, the ratio measured the load).
    """
    image, source, dest, _ = warp_inputs()
    runs: dict[str, list] = {"1": [], str(threads): []}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for n in (1, threads):
                with torch_threads(n):
                    runs[str(n)].append(timed_ms(lambda: ours(image, source, dest), 1))
    return {n: {k: statistics.median(r[k] for r in rs[1:]) for k in rs[0]}
            for n, rs in runs.items()}


def _spawn_threads(policy: str, threads: int, repeats: int) -> dict:
    drop = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    code = ("import json, bench.bench_warp as b; "
            f"print(json.dumps(b.threads_child({threads}, {repeats})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ decoder


def _decoder_ms(config: FaceDecoderConfig, batch: int, repeats: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    decoder = FaceDecoder(config, 60 + 100 * torch.rand(68, 2))
    features = torch.randn(batch, config.feature_dim)

    def forward():
        with torch.no_grad():
            decoder(features)

    def forward_backward():
        out = decoder(features)
        (out.image.mean() + out.landmarks.mean()).backward()
    return timed_ms(forward, repeats), timed_ms(forward_backward, repeats)


# ---------------------------------------------------------------------------------- run


def _ms(t: dict) -> str:
    return f"{t['wall_ms']:.1f} ms (CPU {t['cpu_ms']:.1f})"


def run(quick: bool, with_tf: bool = False) -> dict:
    repeats = 3 if quick else 7
    threads = max(2, torch.get_num_threads())
    inputs = warp_inputs()
    image, source, dest, weights = inputs
    case = (f"B={BATCH} RGB {SIZE}x{SIZE}, {POINTS} pts, order {ORDER}, reg {REGULARIZATION}, "
            f"{BOUNDARY} boundary pts")
    rows, details = [], {"load_average_at_start": load_average()}

    # Ours against the naive port, 1 thread.
    t = {}
    with torch_threads(1):
        with torch.no_grad():
            t["ours_forward"] = timed_ms(lambda: ours(image, source, dest), repeats)
            t["naive_forward"] = timed_ms(lambda: naive_warp(image, source, dest), repeats)
        t["ours_forward_backward"] = timed_ms(
            _forward_backward(ours, image, source, dest), repeats)
        t["naive_forward_backward"] = timed_ms(
            _forward_backward(naive_warp, image, source, dest), repeats)
    details["ours_vs_naive_1_thread"] = t
    for kind in ("forward", "forward_backward"):
        a, b = t[f"ours_{kind}"], t[f"naive_{kind}"]
        rows.append({
            "benchmark": f"warp {kind.replace('_', '+')} ({case}) vs naive PyTorch port, "
                         "1 thread",
            "result": _ms(a), "reference": _ms(b),
            "ratio": f"{b['cpu_ms'] / a['cpu_ms']:.1f}x faster (CPU)", "target": "faster"})

    # Accuracy against the float64 port.
    with torch.no_grad():
        ref_image, _ = naive_warp(image.double(), source.double(), dest.double())
    ref_warped, ref_grad = dest_gradient(naive_warp, *(x.double() for x in inputs))
    our_warped, our_grad = dest_gradient(ours, *inputs)
    grad_scale = ref_grad.abs().max().item()

    def errors(warped, grad) -> dict:
        return {"image_max_abs_error": float(np.abs(warped - ref_warped.numpy()).max()),
                "dest_gradient_max_error_relative":
                    float(np.abs(grad - ref_grad.numpy()).max()) / grad_scale,
                "dest_gradient_norm_error_relative":
                    float(np.linalg.norm(grad - ref_grad.numpy()) / ref_grad.norm())}

    accuracy = {"ours": errors(our_warped.double().numpy(), our_grad.double().numpy())}

    # TensorFlow Addons, same inputs, same thread counts.
    if with_tf:
        tf_times = {}
        for n in (1, threads):
            tf_times[n], arrays = run_tf(inputs, n, repeats)
            with torch_threads(n), torch.no_grad():
                tf_times[n]["ours_forward"] = timed_ms(lambda: ours(image, source, dest),
                                                       repeats)
        accuracy["tensorflow_addons"] = errors(arrays["warped"].astype(np.float64),
                                               arrays["dest_gradient"].astype(np.float64))
        details["tensorflow_addons"] = {str(k): v for k, v in tf_times.items()}
        for n, tt in tf_times.items():
            mine = tt["ours_forward"]
            for mode, label in (("function_forward", "tf.function"), ("eager_forward", "eager")):
                rows.append({
                    "benchmark": f"warp forward ({case}), {n} thread{'s' * (n > 1)}, vs "
                                 f"TF Addons {tt['addons']} / TF {tt['tensorflow']} {label}",
                    "result": _ms(mine), "reference": _ms(tt[mode]),
                    "ratio": f"{tt[mode]['cpu_ms'] / mine['cpu_ms']:.1f}x faster (CPU), "
                             f"{tt[mode]['wall_ms'] / mine['wall_ms']:.1f}x (wall, other "
                             "process)",
                    "target": ">= 3x"})
    details["accuracy_vs_float64"] = accuracy
    acc = "; ".join(f"{name}: image {a['image_max_abs_error']:.4f}, gradient "
                    f"{100 * a['dest_gradient_max_error_relative']:.2f}% / "
                    f"{100 * a['dest_gradient_norm_error_relative']:.2f}%"
                    for name, a in accuracy.items())
    rows.append({"benchmark": "warp float32 accuracy against the float64 port: max abs "
                              "image error; dest-point gradient error, max (of the largest "
                              "component) / norm (of the gradient's norm)",
                 "result": acc, "reference": "float64 naive port", "ratio": "",
                 "target": "ours within 0.005"})

    # Threads, idle and beside one busy process, with OpenMP's default spinning threads
    # and with the sleeping ones every command sets up (runtime.passive_threads): each in
    # a fresh process, since OpenMP reads its policy when torch loads.
    scaling = {}
    for competing in (False, True):
        with competing_process() if competing else contextlib.nullcontext():
            for policy in ("spinning", "passive"):
                scaling[(policy, competing)] = _spawn_threads(policy, threads, repeats)
    details["threads_forward"] = {f"{p}{'_competing' if c else ''}": v
                                  for (p, c), v in scaling.items()}
    for (policy, competing), t in scaling.items():
        one, many = t["1"], t[str(threads)]
        beside = "beside one busy process" if competing else "otherwise idle"
        rows.append({
            "benchmark": f"warp forward, {threads} threads vs 1 thread, {beside}, "
                         f"{policy} OpenMP threads",
            "result": _ms(many), "reference": _ms(one),
            "ratio": f"{one['wall_ms'] / many['wall_ms']:.2f}x (wall)",
            "target": "" if not competing or policy == "spinning" else
            ">= 1x" + (" (met)" if one["wall_ms"] >= many["wall_ms"] else " (NOT met)")})

    with torch_threads(1):
        paper_fwd, paper_fb = _decoder_ms(FaceDecoderConfig.paper(), BATCH, 2 if quick else 5)
        tiny_fwd, tiny_fb = _decoder_ms(FaceDecoderConfig.tiny(), 16, repeats)
    rows += [
        {"benchmark": f"face decoder paper, B={BATCH}, forward / forward+backward, 1 thread",
         "result": f"{paper_fwd['wall_ms']:.0f} / {paper_fb['wall_ms']:.0f} ms (CPU "
                   f"{paper_fwd['cpu_ms']:.0f} / {paper_fb['cpu_ms']:.0f})",
         "reference": "", "ratio": "", "target": ""},
        {"benchmark": "face decoder tiny (64 px), B=16, forward+backward, 1 thread",
         "result": f"{_ms(tiny_fb)}, forward {_ms(tiny_fwd)}", "reference": "", "ratio": "",
         "target": ""},
    ]
    details.update(decoder_paper_batch8={"forward": paper_fwd, "forward_backward": paper_fb},
                   decoder_tiny_batch16={"forward": tiny_fwd, "forward_backward": tiny_fb},
                   repeats=repeats, statistic="median")
    return {"rows": rows, "details": details}
