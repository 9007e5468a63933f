"""GPU check: ``make gpu-check`` or ``python -m bench gpu``. Needs one CUDA GPU; about 2
minutes on an H200. Without CUDA it stops at once with one line, exit 2.

What it checks, each on generated data with the real training loop (:func:`fit`):

1. **Precision.** Both stages (tiny models) train ``STEPS`` steps in float32, bf16 autocast
   and fp16 autocast with a ``GradScaler``, from the same weights and batches, with
   ``deterministic=true``; the mean loss over the second half of each low-precision run
   must be within ``AGREEMENT`` of float32's, and every logged loss finite.
2. **torchrun + NCCL + SyncBatchNorm.** The voice stage under ``torchrun --nproc_per_node
   1``: the process joins an NCCL group, its BatchNorm layers become SyncBatchNorm and it
   trains wrapped in DistributedDataParallel; its losses must match the same run without
   torchrun (within ``AGREEMENT``).
3. **Determinism.** With ``deterministic=true`` (docs/training.md), each stage trained
   twice, and once stopped half-way and resumed, ends with bit-identical weights.
4. **The warp** (the decoder's paper settings, batch 8 x 224 px) on the GPU, in float32
   and under bf16 autocast, against the float64 CPU result: within twice the CPU's own
   float32 error; and its forward + backward time.
5. **Throughput.** The paper-preset voice encoder (Table 1) trained on 6-s spectrograms
   with bf16 autocast: samples/s, achieved TFLOP/s (FLOPs of one step counted by
   ``torch.utils.flop_counter``) and the fraction of the GPU's bf16 dense peak, both the
   datasheet's (where the GPU is in ``BF16_PEAK_TFLOPS``) and a bf16 matmul measured in
   the same run.
6. **Both stages at paper size** through :func:`fit` at the paper's batch of 8 and at
   64: step time, and the hours an epoch of VoxCeleb2 would take at that rate.

A check that stops with an error is a failed row; the others still run. First run on an
NVIDIA H200 on 2026-12-04 (115 s, every check met): the figures, and what those first runs
changed in this check, are in docs/benchmarks.md and docs/training.md.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STEPS = 300  # per stage and precision
LOG_EVERY = 25
AGREEMENT = 0.10  # relative difference allowed between final-window losses
THROUGHPUT_BATCH = 64
THROUGHPUT_STEPS = 20
# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity), by
# the name torch.cuda.get_device_name gives (an SXM H100 is "NVIDIA H100 80GB HBM3").
# The longest key found in the name wins ("L40S" over "L40" over "L4").
BF16_PEAK_TFLOPS = {
    "H200": 989.0, "H200 NVL": 835.0, "H100 80GB HBM3": 989.0, "H100 SXM": 989.0,
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "A100": 312.0, "A10G": 70.0, "A10": 125.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0,
}
WORKER = Path(__file__).with_name("gpu_worker.py")


def require_cuda() -> None:
    """One clear line and exit 2 where there is no CUDA GPU."""
    if not torch.cuda.is_available():
        print("python -m bench gpu: error: no CUDA GPU is visible to PyTorch "
              f"(torch {torch.__version__}, cuda {torch.version.cuda}); this check needs one",
              file=sys.stderr)
        raise SystemExit(2)


# ---------------------------------------------------------------------------- generated data


def _identities(n: int, feature_dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(n, feature_dim, generator=g), dim=1)
    return features, g


def voice_data(samples: int, identities: int = 32, frames: int = 301, seed: int = 0) -> dict:
    """Spectrograms carrying their speaker's pattern, and the speaker's face feature."""
    features, g = _identities(identities, 128, seed)
    voices = torch.randn(identities, 2, frames, 257, generator=g)
    who = torch.randint(0, identities, (samples,), generator=g)
    return {"spectrogram": voices[who] + torch.randn(samples, 2, frames, 257, generator=g),
            "feature": features[who], "identity": who}


def face_data(samples: int, mean_landmarks: torch.Tensor, identities: int = 32,
              seed: int = 0) -> dict:
    """Smooth random faces (224 px) and landmarks, one per identity, and its feature."""
    features, g = _identities(identities, 128, seed)
    small = torch.rand(identities, 3, 14, 14, generator=g)
    faces = torch.nn.functional.interpolate(small, size=(224, 224), mode="bilinear",
                                            align_corners=False)
    landmarks = mean_landmarks + 3 * torch.randn(identities, 68, 2, generator=g)
    who = torch.randint(0, identities, (samples,), generator=g)
    return {"face": faces[who], "landmarks": landmarks[who], "feature": features[who]}


def tiny_stage(voice: bool, seed: int = 0):
    """A stage with tiny models (the same weights for the same seed)."""
    from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig
    from speech2face.face_encoders import train_identity_classifier
    from speech2face.losses import LossConfig
    from speech2face.model import Speech2Face
    from speech2face.train import DecoderStage, VoiceStage
    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    torch.manual_seed(seed)
    mean = 60 + 100 * torch.rand(68, 2, generator=torch.Generator().manual_seed(7))
    decoder = FaceDecoder(FaceDecoderConfig.tiny(), mean)
    if not voice:
        return DecoderStage(Speech2Face(decoder), LossConfig())
    features, _ = _identities(32, 128, 0)
    classifier = train_identity_classifier(features.repeat(4, 1), torch.arange(32).repeat(4),
                                           holdout=0, min_steps=200)
    model = Speech2Face(decoder, VoiceEncoder(VoiceEncoderConfig.tiny()), classifier, "dlib")
    return VoiceStage(model, LossConfig())


def train_losses(voice: bool, amp: str, device: str, steps: int, out: Path,
                 batch_size: int = 8, resume: bool = False, **settings) -> list[float]:
    """The logged mean training losses of a run of ``steps`` steps (``settings``: other
    :class:`TrainConfig` values)."""
    from speech2face.data import InMemoryData
    from speech2face.train import TrainConfig, fit

    stage = tiny_stage(voice)
    mean = stage.model.face_decoder.mean_landmarks.cpu()
    tensors = voice_data(64) if voice else face_data(64, mean)
    tensors.pop("identity", None)
    config = TrainConfig.tiny("voice" if voice else "decoder", **{
        "steps": steps, "amp": amp, "device": device, "batch_size": batch_size,
        "log_every": min(LOG_EVERY, steps), "val_every": 10**9, "checkpoint_every": 10**9,
        "lr": 1e-3, **settings})
    data = InMemoryData(tensors, batch_size, seed=0)
    fit(stage, data, None, config, out, progress=False, resume=resume)
    return _logged_totals(out)


def _logged_totals(run: Path) -> list[float]:
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return [float(r["value"]) for r in csv.DictReader(f)
                if r["split"] == "train" and r["name"] == "total"]


# ---------------------------------------------------------------------------- the checks


def precision_check(device: str, steps: int, amps=("none", "bf16", "fp16"),
                    deterministic: bool = False, batch_size: int = 8) -> list[dict]:
    """Each stage trained in each precision from the same weights and batches; the mean
    loss over the second half of each low-precision run against float32's.

    ``deterministic``: run with ``deterministic=true`` (a process-wide setting: the GPU
    check does this in a process of its own, :func:`in_worker`). Without it, two float32
    GPU runs of the decoder stage ended 6 % apart (0.0990 and 0.0933 on an H200), a noise
    as large as what is being checked; the second half's mean varies less than the last
    window of a still-falling curve. ``batch_size``: the tests' CPU runs take 2 (a CPU
    without AVX-512 BF16 emulates bf16 convolutions: a voice step of batch 8 took 12 s
    on a Zen 1, 9x its float32 step)."""
    rows = []
    for voice in (False, True):
        stage = "voice" if voice else "decoder"
        losses = {}
        with tempfile.TemporaryDirectory() as tmp:
            for amp in amps:
                start = time.perf_counter()
                # precise BN (after the last step) changes no logged loss: not run
                losses[amp] = train_losses(voice, amp, device, steps, Path(tmp) / amp,
                                           batch_size, deterministic=deterministic,
                                           precise_bn_batches=0)
                seconds = time.perf_counter() - start
                print(f"  {stage} {amp}: losses {[round(x, 4) for x in losses[amp]]} "
                      f"({seconds:.0f} s)", flush=True, file=sys.stderr)
        reference = _second_half_mean(losses["none"])
        for amp in amps[1:]:
            mean = _second_half_mean(losses[amp])
            ok = all(map(_finite, losses[amp])) and \
                abs(mean - reference) <= AGREEMENT * abs(reference)
            rows.append({"benchmark": f"{stage} stage, {steps} steps, {amp} autocast vs float32"
                                      + ", deterministic" * deterministic,
                         "result": f"loss {mean:.4g} (mean of the second half)",
                         "reference": f"float32 {reference:.4g}",
                         "ratio": f"{mean / reference:.3f}",
                         "target": f"within {AGREEMENT:.0%}: {'met' if ok else 'NOT MET'}",
                         "ok": ok, "curve": losses[amp], "reference_curve": losses["none"]})
    return rows


def _second_half_mean(curve: list[float]) -> float:
    half = curve[len(curve) // 2:]
    return sum(half) / len(half)


def in_worker(mode: str, **args):
    """What ``bench/gpu_worker.py MODE`` prints, run in a fresh process."""
    command = [sys.executable, str(WORKER), mode, json.dumps(args)]
    worker = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=600)
    if worker.returncode != 0:
        raise RuntimeError(f"{mode} worker failed with exit code {worker.returncode}")
    return json.loads(worker.stdout.strip().splitlines()[-1])


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def torchrun_check(steps: int) -> dict:
    """The voice stage under torchrun (1 process, NCCL, SyncBatchNorm) against no torchrun."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = train_losses(True, "bf16", "cuda", steps, tmp / "plain")
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", "1", str(WORKER), "torchrun",
                   json.dumps({"steps": steps, "out": str(tmp / "ddp")})]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"torchrun failed:\n{result.stderr[-3000:]}")
        report = json.loads(result.stdout.strip().splitlines()[-1])
    final, reference = report["losses"][-1], plain[-1]
    ok = (report["backend"] == "nccl" and report["sync_batchnorm"] > 0 and report["ddp"]
          and abs(final - reference) <= AGREEMENT * abs(reference))
    return {"benchmark": f"torchrun, 1 GPU, NCCL, DDP, {report['sync_batchnorm']} SyncBatchNorm "
                         f"layers, voice stage {steps} steps bf16",
            "result": f"final loss {final:.4g}", "reference": f"without torchrun {reference:.4g}",
            "ratio": f"{final / reference:.3f}",
            "target": f"NCCL + SyncBN, within {AGREEMENT:.0%}: {'met' if ok else 'NOT MET'}",
            "ok": ok, **report}


def determinism_check(steps: int, device: str = "cuda") -> list[dict]:
    """``deterministic=true`` (docs/training.md): for each stage, two runs and a run resumed
    half-way end with bit-identical weights. In a fresh process (see gpu_worker.py)."""
    report = in_worker("determinism", steps=steps, device=device)
    rows = []
    for stage, outcome in report.items():
        ok = outcome.get("repeat") is True and outcome.get("resume") is True
        result = outcome.get("error") or (
            f"repeat {'bit-identical' if outcome['repeat'] else 'DIFFERS'}, resumed at step "
            f"{steps // 2} {'bit-identical' if outcome['resume'] else 'DIFFERS'}")
        rows.append({"benchmark": f"{stage} stage, deterministic=true, bf16, {steps} steps",
                     "result": result, "reference": "an unbroken run's final weights",
                     "ratio": "", "target": f"bit-identical: {'met' if ok else 'NOT MET'}",
                     "ok": ok, **outcome})
    return rows


def _warp_case(batch: int = 8, size: int = 224, seed: int = 0):
    """Paper-size faces and 68 landmark pairs moved by a few pixels, in float64."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=g, dtype=torch.float64)
    source = 20 + (size - 40) * torch.rand(batch, 68, 2, generator=g, dtype=torch.float64)
    dest = source + 3 * torch.randn(batch, 68, 2, generator=g, dtype=torch.float64)
    weights = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
    return image, source, dest, weights


def _decoder_warp(image, source, dest, weights, autocast: bool):
    """The decoder's warp (its paper settings), under bf16 autocast or not, and the
    backward pass of a weighted sum of it: the inputs (with their gradients), image, flow."""
    from speech2face.face_decoder import FaceDecoderConfig
    from speech2face.warp import sparse_image_warp

    config = FaceDecoderConfig.paper(4096)
    inputs = [t.detach().requires_grad_() for t in (image, source, dest)]
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=autocast):
        warped, flow = sparse_image_warp(*inputs, config.warp_order, config.warp_regularization,
                                         config.warp_boundary_points)
    (warped * weights).sum().backward()
    return inputs, warped, flow


def _warp_outputs(case, device: str, dtype: torch.dtype, autocast: bool):
    """The warp and its gradients, as float64 on the CPU."""
    inputs, warped, flow = _decoder_warp(*(t.to(device, dtype) for t in case), autocast)
    return [t.detach().double().cpu() for t in (warped, flow, *(i.grad for i in inputs))]


def warp_check(repeats: int = 20) -> list[dict]:
    """The warp on the GPU under bf16 autocast (what training does) and in float32, against
    the float64 CPU result, with the CPU's own float32 error as the yardstick; and its
    speed at the decoder's size (batch 8, 224 px, forward + backward)."""
    case = _warp_case()
    reference = _warp_outputs(case, "cpu", torch.float64, False)
    names = ("image", "flow (px)", "d/d image", "d/d source", "d/d dest")

    def errors(outputs):  # max abs error of the image and flow; relative norm of gradients
        return [float((o - r).abs().max()) if i < 2 else float((o - r).norm() / r.norm())
                for i, (o, r) in enumerate(zip(outputs, reference, strict=True))]

    cpu = errors(_warp_outputs(case, "cpu", torch.float32, False))
    rows = []
    for label, autocast in (("float32", False), ("bf16 autocast", True)):
        gpu = errors(_warp_outputs(case, "cuda", torch.float32, autocast))
        # within twice the CPU's float32 error (bf16 arithmetic inside the warp was off by
        # 0.16 in the image, against 1e-3 here)
        ok = all(g <= 2 * c + 1e-6 for g, c in zip(gpu, cpu, strict=True))
        rows.append({
            "benchmark": f"warp on GPU, {label}, batch 8 x 224 px, 68 points vs float64",
            "result": ", ".join(f"{n} {e:.1e}" for n, e in zip(names, gpu, strict=True)),
            "reference": "CPU float32: " + ", ".join(f"{e:.1e}" for e in cpu),
            "ratio": f"{max(g / max(c, 1e-12) for g, c in zip(gpu, cpu, strict=True)):.2f}",
            "target": f"<= 2x CPU float32: {'met' if ok else 'NOT MET'}", "ok": ok,
            "errors": dict(zip(names, gpu, strict=True)),
            "cpu_errors": dict(zip(names, cpu, strict=True))})
    image, source, dest, weights = (t.cuda().float() for t in case)
    times = {}
    for label, autocast in (("float32", False), ("bf16 autocast", True)):
        times[label] = _cuda_ms(lambda a=autocast: _decoder_warp(image, source, dest, weights, a),
                                repeats)
    rows.append({"benchmark": "warp forward + backward on GPU, batch 8 x 224 px, 68 points",
                 "result": f"{times['bf16 autocast']:.2f} ms under bf16 autocast",
                 "reference": f"{times['float32']:.2f} ms float32",
                 "ratio": f"{times['bf16 autocast'] / times['float32']:.2f}",
                 "target": "(measured, no target)", "ms": times})
    return rows


def _cuda_ms(fn, repeats: int) -> float:
    """Mean milliseconds of ``fn`` on the GPU (CUDA events, after three warm-up calls)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def paper_stage_check(steps: int = 12, batches=(8, 64)) -> list[dict]:
    """Both stages at paper size through :func:`fit` (bf16 autocast) at the paper's batch
    of 8 and at 64, and what that makes of an epoch of VoxCeleb2's ~1.1 M clips. Each
    step is timed to the end of its GPU work; the first (warm-up) and the last (end of
    the run: logging, precise BatchNorm, checkpoint) are left out."""
    from bench.bench_train import paper_step

    rows = []
    for voice, batch in itertools.product((True, False), batches):
        name = "voice" if voice else "decoder"
        result = paper_step(voice, "cuda", batch, steps)
        per_s = batch / result["step_s"]
        rows.append({
            "benchmark": f"{name} stage step, paper size, GPU bf16, batch {batch} (fit)",
            "result": f"{1000 * result['step_s']:.1f} ms/step, {per_s:.0f} samples/s "
                      f"(VoxCeleb2 epoch of 1.1 M clips: {1.1e6 / per_s / 3600:.1f} h)",
            "reference": f"{1000 * result['forward_s']:.1f} ms forward",
            "ratio": f"{result['step_s'] / result['forward_s']:.2f}",
            "target": "(measured, no target)", **result})
    return rows


def matmul_tflops(size: int = 8192, repeats: int = 20) -> float:
    """bf16 matmul throughput measured here: the reference for the encoder's."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def datasheet_peak(name: str) -> float | None:
    found = [key for key in BF16_PEAK_TFLOPS if key.lower() in name.lower()]
    return BF16_PEAK_TFLOPS[max(found, key=len)] if found else None


def throughput_check(batch: int = THROUGHPUT_BATCH, steps: int = THROUGHPUT_STEPS) -> dict:
    """Training samples/s and TFLOP/s of the paper-preset voice encoder, bf16 autocast."""
    from torch.utils.flop_counter import FlopCounterMode

    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    torch.manual_seed(0)
    encoder = VoiceEncoder(VoiceEncoderConfig.paper(4096)).cuda()
    encoder = encoder.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-4)
    x = torch.randn(batch, 2, 598, 257, device="cuda").to(memory_format=torch.channels_last)
    target = torch.randn(batch, 4096, device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (encoder(x).float() - target).abs().sum(1).mean()
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    achieved = flops / seconds / 1e12
    measured = matmul_tflops()
    name = torch.cuda.get_device_name()
    peak = datasheet_peak(name)
    of_peak = f"{achieved / peak:.1%} of datasheet {peak:.0f}" if peak else "datasheet peak unknown"
    return {"benchmark": f"paper voice encoder training, batch {batch} x 6 s, bf16, {name}",
            "result": f"{batch / seconds:.0f} samples/s, {achieved:.1f} TFLOP/s ({of_peak})",
            "reference": f"bf16 matmul 8192^3 {measured:.0f} TFLOP/s",
            "ratio": f"{achieved / measured:.1%}", "target": "(measured, no target)",
            "samples_per_s": batch / seconds, "tflops": achieved, "step_flops": flops,
            "matmul_tflops": measured, "datasheet_peak_tflops": peak}


def _rows(name: str, check, *args, **kwargs) -> list[dict]:
    """A check's rows; a check that raises is one failed row, and the others still run."""
    start = time.perf_counter()
    print(f"{name} ...", flush=True)
    try:
        rows = check(*args, **kwargs)
    except Exception as error:
        rows = {"benchmark": name, "result": f"{type(error).__name__}: {error}"[:400],
                "reference": "", "ratio": "", "target": "NOT MET (the check stopped)",
                "ok": False}
    rows = rows if isinstance(rows, list) else [rows]
    for row in rows:
        print(f"  {row['benchmark']}: {row['result']} | {row['reference']} | {row['target']}",
              flush=True)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def run(quick: bool = False) -> dict:
    require_cuda()
    start = time.perf_counter()
    steps = 60 if quick else STEPS
    rows = _rows("precision", in_worker, "precision", steps=steps)
    rows += _rows("torchrun", torchrun_check, steps // 3)
    rows += _rows("determinism", determinism_check, 20 if quick else 60)
    rows += _rows("warp", warp_check)
    rows += _rows("throughput", throughput_check, THROUGHPUT_BATCH,
                  5 if quick else THROUGHPUT_STEPS)
    rows += _rows("paper stages", paper_stage_check, 6 if quick else 12)
    details = {"device": torch.cuda.get_device_name(), "seconds": time.perf_counter() - start,
               "rows": rows}
    failed = [r["benchmark"] for r in rows if r.get("ok") is False]
    table = [{k: r[k] for k in ("benchmark", "result", "reference", "ratio", "target")}
             for r in rows]
    if failed:
        print("python -m bench gpu: FAILED: " + "; ".join(failed), file=sys.stderr)
    return {"rows": table, "details": details}
