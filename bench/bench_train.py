"""Training step time at paper size, and what the shard loader costs against in-memory batches.

Rows:
- ``voice step, paper, CPU`` / ``decoder step, paper, CPU``: seconds per optimiser step of
  the shared loop (:func:`speech2face.train.fit`) at paper size, batch 8, on this CPU; the
  reference is the same step's forward pass alone (so the ratio is backward + optimiser
  overhead, ~3 for a convnet). Also on GPU (bf16 autocast) when one is available.
- ``loader cost, tiny voice stage``: step time of a tiny stage-2 run reading the demo
  corpus's shards (spectrograms on the fly), against the same run fed the same batches
  from memory, with the tiny preset's 0 loader workers and with 1. Target: the loader
  adds <= 10 %.
- ``loader cost, paper voice stage``: the shard loader's time per batch of 8 (read,
  decode, spectrogram) as a fraction of the paper-size CPU step. Target <= 10 %.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from speech2face.data import InMemoryData
from speech2face.losses import LossConfig
from speech2face.train import DecoderStage, TrainConfig, VoiceStage, fit

PAPER_FEATURE_DIM = 4096  # VGG-Face fc7, the paper's face feature (section 3)


def _paper_model(voice: bool, device: str):
    from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig
    from speech2face.model import Speech2Face
    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    torch.manual_seed(0)
    mean = 40 + 144 * torch.rand(68, 2)
    decoder = FaceDecoder(FaceDecoderConfig.paper(PAPER_FEATURE_DIM), mean)
    encoder = VoiceEncoder(VoiceEncoderConfig.paper(PAPER_FEATURE_DIM)) if voice else None
    classifier = torch.nn.Linear(PAPER_FEATURE_DIM, 2622) if voice else None  # VGG-Face fc8
    return Speech2Face(decoder, encoder, classifier, "vggface").to(device)


def _batches(voice: bool, n: int, mean: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {"feature": torch.rand(n, PAPER_FEATURE_DIM, generator=g)}
    if voice:
        out["spectrogram"] = torch.randn(n, 2, 598, 257, generator=g)
    else:
        out["face"] = torch.rand(n, 3, 224, 224, generator=g)
        out["landmarks"] = mean + 2 * torch.randn(n, 68, 2, generator=g)
    return out


def _step_times(stage, data, steps: int, device: str, batch: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each optimiser step of fit(). The first includes warm-up, the
    last the end of the run (logging, precise BatchNorm, the checkpoint); the others are
    the steps of a run between its log rows and checkpoints."""
    stamps = [(time.perf_counter(), time.process_time())]
    config = TrainConfig.paper(steps=steps, batch_size=batch, device=device, log_every=10**6,
                               val_every=10**6, checkpoint_every=10**6, num_workers=0)
    cuda = device.startswith("cuda")

    def stamp(step: int) -> None:
        if cuda:  # the GPU's work of the step, not just its queueing
            torch.cuda.synchronize()
        stamps.append((time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory() as run:
        fit(stage, data, None, config, run, progress=False, on_step=stamp)
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:], strict=False)]


def paper_step(voice: bool, device: str, batch: int, steps: int) -> dict:
    if steps < 3:
        raise ValueError("paper_step needs 3 steps or more: the first and last are not timed")
    cuda = device.startswith("cuda")
    model = _paper_model(voice, device)
    stage = VoiceStage(model, LossConfig()) if voice else DecoderStage(model, LossConfig())
    tensors = _batches(voice, batch * steps, model.face_decoder.mean_landmarks.cpu())
    data = InMemoryData(tensors, batch, shuffle=False)
    times = _step_times(stage, data, steps, device, batch)
    timed = times[1:-1]
    # forward alone, same batch, for the backward/forward ratio (warm: after the steps;
    # on a GPU the mean of 5, under the run's bf16 autocast)
    batch_data = stage.on_device(next(iter(data.batches(0))), torch.device(device))
    repeats = 5 if cuda else 1
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            stage.loss(stage.trainable, batch_data)
        if cuda:
            torch.cuda.synchronize()
        forward = (time.perf_counter() - start) / repeats
        forward_cpu = (time.process_time() - cpu) / repeats
    return {"step_s": sum(t[0] for t in timed) / len(timed),
            "step_cpu_s": sum(t[1] for t in timed) / len(timed),
            "first_step_s": times[0][0], "last_step_s": times[-1][0],
            "forward_s": forward, "forward_cpu_s": forward_cpu,
            "params": sum(p.numel() for p in stage.trainable.parameters())}


def _demo_shards(folder: Path, speakers: int) -> Path:
    from speech2face.data import prepare
    from speech2face.demo_data import make_demo_data

    make_demo_data(folder / "corpus", speakers=speakers, seed=0, progress=False)
    prepare("voxceleb1", folder / "corpus", folder / "shards", samples_per_shard=32,
            progress=False)
    return folder / "shards"


def _untrained_decoder(shards: Path, folder: Path) -> Path:
    from speech2face.data import load_manifest
    from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig
    from speech2face.model import Speech2Face, save_model

    manifest = load_manifest(shards)
    decoder = FaceDecoder(FaceDecoderConfig.tiny(manifest["feature_dim"]),
                          torch.tensor(manifest["mean_landmarks"]))
    return save_model(Speech2Face(decoder, face_encoder_name=manifest["encoder"]), folder / "dec")


class _TimedData:
    """Wraps a data source and adds up the time the loop waits inside ``next()``."""

    def __init__(self, data):
        self.data, self.wait = data, 0.0

    def batches(self, epoch: int, skip: int = 0):
        stream = iter(self.data.batches(epoch, skip))
        while True:
            start = time.perf_counter()
            batch = next(stream, None)
            self.wait += time.perf_counter() - start
            if batch is None:
                return
            yield batch


def loader_cost(quick: bool, workers: int) -> dict:
    """Tiny stage-2 step time reading shards vs the same samples from memory."""
    from speech2face.data import ShardData, load_split
    from speech2face.train import voice_stage

    steps = 24 if quick else 60
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = _demo_shards(tmp, 16 if quick else 32)
        decoder = _untrained_decoder(shards, tmp)
        config = TrainConfig.tiny(steps=steps, num_workers=workers, log_every=10**6,
                                  val_every=10**6, checkpoint_every=10**6)
        times = {}
        memory = load_split(shards, "train", spectrogram=True)
        tensors = {k: memory[k] for k in ("spectrogram", "feature")}
        for source in ("memory", "shards"):
            stage = voice_stage(shards, decoder, config, progress=False)
            if source == "shards":
                data = ShardData(shards, "train", config.batch_size, config, spectrogram=True)
            else:
                data = InMemoryData(tensors, config.batch_size, seed=config.seed)
            data = _TimedData(data)
            stamps = []
            with tempfile.TemporaryDirectory() as run:
                start = time.perf_counter()
                fit(stage, data, None, config, run, progress=False,
                    on_step=lambda step, s=stamps: s.append(time.perf_counter()))
            # the first steps warm up (allocations, first loader start): time the rest
            skip = 4
            times[source] = (stamps[-1] - stamps[skip - 1]) / (steps - skip)
            times[f"{source}_total_s"] = stamps[-1] - start
            times[f"{source}_wait_fraction"] = data.wait / (stamps[-1] - start)
        samples = len(tensors["feature"])
    times["train_samples"] = samples
    times["steps_per_epoch"] = samples // config.batch_size
    return times


def loader_batch_time(quick: bool) -> float:
    """Seconds for the shard loader to give one batch of 8 with 6-s spectrograms (1 process)."""
    from speech2face.data import ShardData

    with tempfile.TemporaryDirectory() as tmp:
        shards = _demo_shards(Path(tmp), 8)
        config = TrainConfig.paper(num_workers=0)
        data = ShardData(shards, "train", 8, config, spectrogram=True)
        count, start = 0, time.perf_counter()
        for _ in data.batches(0):
            count += 1
        return (time.perf_counter() - start) / count


def run(quick: bool) -> dict:
    rows, details = [], {}
    threads = torch.get_num_threads()
    batch = 8
    steps = 3 if quick else 4  # the first and last are not timed
    for voice in (True, False):
        name = "voice" if voice else "decoder"
        result = paper_step(voice, "cpu", batch, steps)
        details[f"{name}_paper_cpu"] = result
        rows.append({
            "benchmark": f"{name} step, paper, CPU ({threads} threads), batch {batch}",
            "result": f"{result['step_s']:.2f} s/step (CPU {result['step_cpu_s']:.2f})",
            "reference": f"{result['forward_s']:.2f} s forward (CPU {result['forward_cpu_s']:.2f})",
            "ratio": f"{result['step_s'] / result['forward_s']:.2f}",
            "target": "",
        })
    if torch.cuda.is_available():
        for voice in (True, False):
            name = "voice" if voice else "decoder"
            result = paper_step(voice, "cuda", batch, 12)
            details[f"{name}_paper_gpu"] = result
            rows.append({
                "benchmark": f"{name} step, paper, GPU bf16, batch {batch}",
                "result": f"{1000 * result['step_s']:.1f} ms/step",
                "reference": f"{1000 * result['forward_s']:.1f} ms forward",
                "ratio": f"{result['step_s'] / result['forward_s']:.2f}",
                "target": "",
            })

    # 0 workers is the tiny preset's setting (samples kept in memory after the first
    # epoch); 1 worker shows what a loader process costs beside training on few cores.
    preset = TrainConfig.tiny().num_workers
    for workers in (preset, 1):
        cost = loader_cost(quick, workers)
        details[f"loader_tiny_{workers}_workers"] = cost
        ratio = cost["shards"] / cost["memory"]
        what = f"{workers} worker{'s' * (workers != 1)}" + (
            ", the tiny preset's" if workers == preset else "")
        rows.append({
            "benchmark": f"loader cost, tiny voice stage, batch 8, {what}",
            "result": f"{1000 * cost['shards']:.0f} ms/step (shards)",
            "reference": f"{1000 * cost['memory']:.0f} ms/step (memory)",
            "ratio": f"{ratio:.3f}",
            "target": "<= 1.10" + (" (met)" if ratio <= 1.10 else " (NOT met)"),
        })
        wait = cost["shards_wait_fraction"]
        rows.append({
            "benchmark": f"loader wait, tiny voice stage, {what}: time the loop waits for "
                         "shard batches",
            "result": f"{100 * wait:.1f} % of training time",
            "reference": f"{100 * cost['memory_wait_fraction']:.1f} % (memory)",
            "ratio": f"{wait:.3f}",
            "target": "<= 0.10" + (" (met)" if wait <= 0.10 else " (NOT met)"),
        })
    batch_s = loader_batch_time(quick)
    paper = details["voice_paper_cpu"]["step_s"]
    details["loader_batch_s"] = batch_s
    rows.append({
        "benchmark": "loader cost, paper voice stage: one batch of 8 (6 s, 1 process)",
        "result": f"{batch_s:.3f} s/batch",
        "reference": f"{paper:.1f} s/step (paper CPU step)",
        "ratio": f"{batch_s / paper:.4f}",
        "target": "<= 0.10" + (" (met)" if batch_s / paper <= 0.10 else " (NOT met)"),
    })
    return {"rows": rows, "details": details}
