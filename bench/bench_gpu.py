"""GPU check: ``make gpu-check`` or ``python -m bench gpu``. Needs one CUDA GPU; under 8
minutes on a current data-centre GPU. Without CUDA it stops at once with one line, exit 2.

What it checks, each on generated data with the real training loop (:func:`fit`):

1. **Precision.** Both stages (tiny models) train ``STEPS`` steps in float32, bf16 autocast
   and fp16 autocast with a ``GradScaler``, from the same weights and batches; the mean
   loss of the last logging window of each low precision must be within ``AGREEMENT`` of
   float32's, and every logged loss finite.
2. **torchrun + NCCL + SyncBatchNorm.** The voice stage under ``torchrun --nproc_per_node
   1``: the process joins an NCCL group, its BatchNorm layers become SyncBatchNorm and it
   trains wrapped in DistributedDataParallel; its losses must match the same run without
   torchrun (within ``AGREEMENT``).
3. **Throughput.** The paper-preset voice encoder (Table 1) trained on 6-s spectrograms
   with bf16 autocast: samples/s, achieved TFLOP/s (FLOPs of one step counted by
   ``torch.utils.flop_counter``) and the fraction of the GPU's bf16 dense peak, both the
   datasheet's (where the GPU is in ``BF16_PEAK_TFLOPS``) and a bf16 matmul measured in
   the same run.

No GPU was lent to the session that wrote this, so its numbers are not yet in
docs/benchmarks.md: whoever runs it first on a GPU records them there.
"""

from __future__ import annotations

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
# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity).
BF16_PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0,
    "RTX 4090": 165.0, "RTX 3090": 71.0,
}
WORKER = Path(__file__).with_name("gpu_torchrun_worker.py")


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
                 batch_size: int = 8) -> list[float]:
    """The logged mean training losses of a run of ``steps`` steps."""
    from speech2face.data import InMemoryData
    from speech2face.train import TrainConfig, fit

    stage = tiny_stage(voice)
    mean = stage.model.face_decoder.mean_landmarks.cpu()
    tensors = voice_data(64) if voice else face_data(64, mean)
    tensors.pop("identity", None)
    config = TrainConfig.tiny("voice" if voice else "decoder", steps=steps, amp=amp,
                              device=device, batch_size=batch_size, log_every=min(LOG_EVERY, steps),
                              val_every=10**9, checkpoint_every=10**9, lr=1e-3)
    data = InMemoryData(tensors, batch_size, seed=0)
    fit(stage, data, None, config, out, progress=False)
    return _logged_totals(out)


def _logged_totals(run: Path) -> list[float]:
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return [float(r["value"]) for r in csv.DictReader(f)
                if r["split"] == "train" and r["name"] == "total"]


# ---------------------------------------------------------------------------- the checks


def precision_check(device: str, steps: int, amps=("none", "bf16", "fp16")) -> list[dict]:
    rows = []
    for voice in (False, True):
        stage = "voice" if voice else "decoder"
        losses = {}
        with tempfile.TemporaryDirectory() as tmp:
            for amp in amps:
                start = time.perf_counter()
                losses[amp] = train_losses(voice, amp, device, steps, Path(tmp) / amp)
                seconds = time.perf_counter() - start
                print(f"  {stage} {amp}: losses {[round(x, 4) for x in losses[amp]]} "
                      f"({seconds:.0f} s)", flush=True)
        reference = losses["none"][-1]
        for amp in amps[1:]:
            final = losses[amp][-1]
            ok = all(map(_finite, losses[amp])) and \
                abs(final - reference) <= AGREEMENT * abs(reference)
            rows.append({"benchmark": f"{stage} stage, {steps} steps, {amp} autocast vs float32",
                         "result": f"final loss {final:.4g}",
                         "reference": f"float32 {reference:.4g}",
                         "ratio": f"{final / reference:.3f}",
                         "target": f"within {AGREEMENT:.0%}: {'met' if ok else 'NOT MET'}",
                         "ok": ok, "curve": losses[amp], "reference_curve": losses["none"]})
    return rows


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
                   "--nproc_per_node", "1", str(WORKER),
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
    for key, value in BF16_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


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


def run(quick: bool = False) -> dict:
    require_cuda()
    start = time.perf_counter()
    steps = 60 if quick else STEPS
    rows = precision_check("cuda", steps)
    rows.append(torchrun_check(steps // 3))
    rows.append(throughput_check(steps=5 if quick else THROUGHPUT_STEPS))
    details = {"device": torch.cuda.get_device_name(), "seconds": time.perf_counter() - start,
               "rows": rows}
    failed = [r["benchmark"] for r in rows if r.get("ok") is False]
    table = [{k: r[k] for k in ("benchmark", "result", "reference", "ratio", "target")}
             for r in rows]
    if failed:
        print("python -m bench gpu: FAILED: " + "; ".join(failed), file=sys.stderr)
    return {"rows": table, "details": details}
