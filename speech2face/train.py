"""Training, both stages, with one loop.

Stage 1 (``speech2face train-decoder``) trains the face decoder on face images alone
(Cole et al.): texture L1, landmark MSE and, for a differentiable face encoder, the
negative cosine of the rendered face's embedding. Stage 2 (``speech2face train``)
trains the voice encoder with paper eq. 1 against the frozen face decoder's first layer
and the frozen identity classifier. Both are a :class:`Stage` handed to :func:`fit`, the
one loop: micro-batches with gradient accumulation, DDP under ``torchrun``, autocast on
GPU, the lr schedule, logging (progress bar, TensorBoard, CSV), validation with an image
grid, and resumable checkpoints.

Reproducibility and resuming (docs/training.md): the sample order of every epoch is a
function of ``(seed, epoch)`` only, so the data position is ``(epoch, steps done in the
epoch)``; ``--resume`` re-creates that epoch's order and skips the consumed
micro-batches. A checkpoint holds the weights (safetensors), the optimiser state
(tensors in safetensors, the rest in JSON), the scheduler, the AMP scaler, the data
position and every process's RNG state, and is renamed into place only when complete.

The file reads top to bottom as the stages, :func:`fit`, checkpoints, the two stages'
entry points and the command line. What the loop uses but is not the loop lives beside
it: the process's place, device and autocast dtype in :mod:`speech2face.distributed`;
the batches in :mod:`speech2face.data` (:class:`~speech2face.data.ShardData`,
:class:`~speech2face.data.InMemoryData`); the logs and validation grids in
:mod:`speech2face.train_log`; the checkpoint files in :mod:`speech2face.checkpoints`; the
voice encoder registry in :mod:`speech2face.model`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from speech2face.checkpoints import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    OPTIMIZER_FILE,
    RNG_FILE,
    STATE_FILE,
    check_checkpoint,
    checkpoint_dirs,
    gather_rng,
    optimizer_from_files,
    optimizer_to_files,
    prune_checkpoints,
    read_state,
)

# TrainConfig and load_config are re-exported: `from speech2face.train import TrainConfig`.
from speech2face.config import TrainConfig, config_from_settings, load_config
from speech2face.data import MANIFEST, load_manifest, training_data, training_features
from speech2face.data.loader import MemoryBudget
from speech2face.distributed import (
    Placement,
    amp_dtype,
    broadcast_linear,
    init_distributed,
    reduce_device,
    resolve_device,
    set_deterministic,
    shutdown_distributed,
)
from speech2face.errors import ConfigError, DataError, Speech2FaceError
from speech2face.losses import LossConfig
from speech2face.model import (
    RUN_MODEL_DIR,
    VOICE_ENCODERS,
    WEIGHTS_NAME,
    Speech2Face,
    build_voice_encoder,
    load_state_checked,
    read_bundle_config,
    read_safetensors,
    replacing_dir,
    state_dict_for_safetensors,
    write_bundle_files,
)
from speech2face.train_log import (
    MetricsLog,
    accumulate,
    term_shares,
    validation_grid,
    window_means,
    write_png,
)
from speech2face.utils import atomic_write, is_number, is_whole

BEST_FILE = "best.json"
TRAIN_CONFIG_FILE = "train_config.json"
IMAGES_DIR = "images"  # RUN/images/val-NNNNNNNN.png, the validation grids
# Training features read to standardise the face decoder's input (FeatureCode): enough for
# a mean and a spread, few enough to read in seconds from a million-clip split.
STANDARDIZATION_SAMPLES = 20_000


# ---------------------------------------------------------------------------- stages


class Stage:
    """What :func:`fit` needs from a training stage.

    Attributes:
        name: ``"decoder"`` or ``"voice"`` (used in messages).
        model: everything the checkpoint holds (a :class:`Speech2Face` for the real
            stages; any module in tests).
        trainable: the submodule the optimiser updates (wrapped by DDP); the rest of
            ``model`` stays frozen in eval mode.
    """

    name: str = "stage"
    model: nn.Module
    trainable: nn.Module

    def term_weights(self) -> dict[str, float]:
        """Weight of each loss term in the total, for logging each term's share."""
        return {}

    def loss(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, terms)`` of a micro-batch; ``forward`` is ``trainable`` or its DDP wrapper."""
        raise NotImplementedError

    def images(self, batch: dict) -> list[torch.Tensor]:
        """Columns of the validation grid, each ``(B, 3, H, W)`` in [0, 1] (true face first)."""
        return []

    def bundle_config(self) -> dict | None:
        """The bundle ``config.json`` of ``model``, or ``None`` when it is not a bundle."""
        return self.model.bundle_config() if isinstance(self.model, Speech2Face) else None

    def on_device(self, batch: dict, device: torch.device) -> dict:
        """The batch's tensors moved to ``device`` (non-tensor entries kept)."""
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}


def draw_feature_noise(features: torch.Tensor, scale: float) -> torch.Tensor:
    """Stage 1's training noise for ``features`` (B, D): per row, a Gaussian vector of
    standard deviation ``scale`` per dimension times a length uniform in [0, 1].

    Drawn from torch's CPU generator, which checkpoints keep (a resumed run draws on),
    in float64: torch's float32 normal draw takes another code path on CPUs with AVX2
    than on those without it or with AVX-512, which differ in the last bits, and the
    demo's training carries such differences into its printed numbers.
    """
    length = scale * torch.rand(len(features), 1, dtype=torch.float64)
    return (length * torch.randn(tuple(features.shape), dtype=torch.float64)).to(features)


class KeptTargets(MemoryBudget):
    """Each face's texture target, computed once and kept while they fit in ``budget_bytes``.

    A face's registered texture (:func:`~speech2face.face_decoder.register_texture`, its
    crop warped to the decoder's mean landmarks) depends on that sample and crop alone, and
    on the CPU a row comes out the same to the last bit whatever else is in its batch
    (tests/test_train.py compares kept and fresh targets). A split seen
    over many epochs (the demo's decoder: 67) therefore need not warp the same faces again:
    that was a fifth of the demo's decoder step. Rows are keyed by the sample's ``meta``
    (its shard key and crop among the rest: the shard loader's batches); batches without
    them (in-memory data) are computed every time. Once the kept rows pass
    ``budget_bytes`` they are dropped and nothing more is kept (a split too big to hold).
    The targets depend on the decoder's mean landmarks and size, which do not change
    during a run; a stage keeps its own.
    """

    def __init__(self, budget_bytes: int):
        super().__init__(budget_bytes)
        self._rows: dict[str, torch.Tensor] = {}

    def _drop(self) -> None:
        self._rows.clear()

    def get(self, batch: dict, compute: Callable[[torch.Tensor | None], torch.Tensor]):
        """The batch's targets; ``compute(index)`` makes those of the rows ``index`` of
        the batch (``None``: all)."""
        metas = batch.get("meta")
        if self.full or not isinstance(metas, list) or not all(
                isinstance(m, dict) and "key" in m and "crop" in m for m in metas):
            return compute(None)
        keys = [json.dumps(m, sort_keys=True) for m in metas]
        missing = sorted({key: i for i, key in enumerate(keys) if key not in self._rows}.values())
        fresh = {}
        if missing:
            fresh = dict(zip([keys[i] for i in missing], compute(torch.tensor(missing)),
                             strict=True))
        targets = torch.stack([fresh[key] if key in fresh else self._rows[key] for key in keys])
        self._keep(sum(row.nbytes for row in fresh.values()))
        if not self.full:  # clones: a row of the fresh batch would keep all of it alive
            self._rows.update((key, row.clone()) for key, row in fresh.items())
        return targets


class DecoderStage(Stage):
    """Stage 1: the face decoder learns to render the registered face of a face feature.

    Targets per face (Cole et al.): its landmarks, and its texture registered to the mean
    landmarks (kept across epochs up to ``keep_targets_bytes``: :class:`KeptTargets`).
    ``face_encoder`` (differentiable ones only) adds the perceptual term.
    """

    name = "decoder"

    def __init__(self, model: Speech2Face, loss_config: LossConfig,
                 face_encoder: nn.Module | None = None, feature_noise: float = 0.0,
                 keep_targets_bytes: int = 0):
        self.model = model
        self.trainable = model.face_decoder
        self.loss_config = loss_config
        self.face_encoder = face_encoder if getattr(face_encoder, "differentiable", False) else None
        # The longest training noise vector's standard deviation per feature dimension
        # (TrainConfig's feature_noise times the spread, over sqrt(D)).
        self.feature_noise = feature_noise
        self.kept_targets = KeptTargets(keep_targets_bytes)

    def term_weights(self):
        c = self.loss_config
        weights = {"texture": c.texture_weight, "landmarks": c.landmark_weight}
        if self.face_encoder is not None:
            weights["perceptual"] = c.perceptual_weight
        return weights

    def _targets(self, batch: dict) -> torch.Tensor:
        from speech2face.face_decoder import register_texture

        decoder = self.model.face_decoder

        def compute(index: torch.Tensor | None) -> torch.Tensor:
            faces, landmarks = batch["face"], batch["landmarks"]
            if index is not None:
                index = index.to(faces.device)
                faces, landmarks = faces[index], landmarks[index]
            with torch.no_grad():
                return register_texture(faces.float(), landmarks.float(),
                                        decoder.mean_landmarks, size=decoder.config.image_size)

        return self.kept_targets.get(batch, compute)

    def loss(self, forward, batch):
        from speech2face.losses import decoder_loss

        texture = self._targets(batch)
        features = batch["feature"]
        if self.feature_noise and self.trainable.training and torch.is_grad_enabled():
            features = features + draw_feature_noise(features, self.feature_noise)
        # The rendered image enters the loss only through the perceptual term.
        decoded = forward(features, render_image=self.face_encoder is not None)
        return decoder_loss(decoded, texture, batch["landmarks"], self.loss_config,
                            encoder=self.face_encoder, features=batch["feature"])

    def images(self, batch):
        return [batch["face"], self.model.face_decoder(batch["feature"]).image]


class VoiceStage(Stage):
    """Stage 2: the voice encoder learns to predict the face feature (paper eq. 1).

    The face decoder (its first layer f_dec) and the identity classifier are frozen.
    """

    name = "voice"

    def __init__(self, model: Speech2Face, loss_config: LossConfig):
        if model.voice_encoder is None:
            raise ValueError("the voice stage needs a model with a voice encoder")
        self.model = model
        self.trainable = model.voice_encoder
        self.loss_config = loss_config
        model.face_decoder.requires_grad_(False)
        if model.classifier is not None:
            model.classifier.requires_grad_(False)

    def term_weights(self):
        c = self.loss_config
        weights = {"decoder": 1.0, "feature": c.lambda1}
        if self.model.classifier is not None:
            weights["distill"] = c.lambda2
        return weights

    def loss(self, forward, batch):
        from speech2face.losses import speech2face_loss

        c = self.loss_config
        pred = forward(batch["spectrogram"])
        return speech2face_loss(pred.float(), batch["feature"].float(),
                                self.model.face_decoder.f_dec, self.model.classifier,
                                lambda1=c.lambda1, lambda2=c.lambda2, temperature=c.temperature)

    def images(self, batch):
        decoder = self.model.face_decoder
        return [batch["face"], decoder(batch["feature"]).image,
                decoder(self.model.voice_encoder(batch["spectrogram"])).image]


# ---------------------------------------------------------------------------- the loop


@dataclass
class FitResult:
    """What :func:`fit` returns."""

    step: int
    train_loss: float | None  # mean total loss of the last logging interval (all processes)
    best_val_loss: float | None
    best_step: int | None
    model_dir: Path | None  # RUN/model, written by rank 0


def _next_group(stream, loop: LoopState, data, accum: int):
    """``accum`` micro-batches for the next step, moving to the next epoch when one runs out.

    All processes agree on the epoch change (a process whose shards ran out first would
    otherwise leave the others waiting in an all-reduce).
    """
    while True:
        group = []
        for _ in range(accum):
            batch = next(stream, None)
            if batch is None:
                break
            group.append(batch)
        complete = torch.tensor([1 if len(group) == accum else 0])
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                complete = complete.cuda()
            dist.all_reduce(complete, op=dist.ReduceOp.MIN)
        if complete.item():
            return stream, group
        if loop.epoch_step == 0:
            processes = dist.get_world_size() if dist.is_initialized() else 1
            workers = max(1, getattr(data, "workers", 0))  # 0: the process reads itself
            hint = "" if processes * workers == 1 else (
                f"; the split's shards are dealt out whole to {processes} process(es) x "
                f"{workers} loader worker(s), and each batches only the samples of "
                f"its own shards, dropping a last short batch: prepare with a smaller "
                f"--samples-per-shard, or set fewer num_workers or processes")
            raise DataError(None, "the training data has too few samples for one step "
                                  f"({accum} micro-batch(es) on every process){hint}")
        loop.epoch += 1
        loop.epoch_step = 0
        stream = iter(data.batches(loop.epoch, 0))


def fit(
    stage: Stage,
    train_data,
    val_data,
    config: TrainConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
) -> FitResult:
    """The training loop both stages share.

    Args:
        stage: the :class:`Stage` (model, trainable part, loss, validation images).
        train_data: has ``batches(epoch, skip) -> iterator of dict`` giving this process's
            micro-batches of ``epoch`` in a fixed order, the first ``skip`` left out
            (:class:`speech2face.data.InMemoryData`, :class:`speech2face.data.ShardData`).
        val_data: the same interface, or ``None``; rank 0 validates on the first
            ``config.val_batches`` batches of its epoch 0.
        config: the :class:`TrainConfig`.
        out: the run directory (checkpoints, logs, images, the final bundle ``model``).
        resume: continue from the newest checkpoint in ``out`` (if there is none, start).
        on_step: called with the step number after each optimiser step (tests, hooks).
        progress: show a tqdm bar on rank 0.

    Under ``torchrun`` every process calls this; the trainable part is wrapped in
    ``DistributedDataParallel`` and only rank 0 writes files.
    """
    from speech2face.utils import progress as tqdm

    run = Path(out)
    placement = init_distributed(config.device)
    device = resolve_device(config, placement)
    autocast_dtype = amp_dtype(config, device)
    set_deterministic(config)
    accum = config.grad_accum
    placement.micro_batch(config)  # checks divisibility before any work

    stage.model.to(device)
    params = [p for p in stage.trainable.parameters() if p.requires_grad]
    # foreach: one operation per step for all tensors, not one per tensor (on CPU too, where
    # it is not the default); the same arithmetic, the same weights to the last bit.
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(config.beta1, config.beta2),
                                 eps=config.eps, foreach=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_decay_steps, config.lr_decay)
    # fp16 needs loss scaling (its small gradients underflow); bf16 has float32's range.
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None

    loop = LoopState()
    # What the splits hold (ShardData.fingerprint), kept by each checkpoint: a resumed run
    # on other data says so (load_checkpoint).
    data = {name: part.fingerprint for name, part in (("train", train_data), ("val", val_data))
            if getattr(part, "fingerprint", None) is not None}
    checkpoint = latest_checkpoint(run) if resume else None
    if resume and placement.is_main:
        _say_incomplete(run, checkpoint)
    if checkpoint is not None:
        loop = load_checkpoint(checkpoint, stage, optimizer, scheduler, scaler, placement, device,
                               config, data)
        if config.steps < loop.step:  # it would end at once, its config saying otherwise
            raise ConfigError(checkpoint, f"is at step {loop.step}, past steps={config.steps}: "
                                          f"resume with steps >= {loop.step}")
    if placement.is_main:
        run.mkdir(parents=True, exist_ok=True)
        with atomic_write(run / TRAIN_CONFIG_FILE, "w") as f:
            json.dump(config.to_dict(), f, indent=2)

    module = stage.trainable
    if dist.is_initialized():
        if device.type == "cuda":
            # BatchNorm statistics over the global batch; SyncBatchNorm runs on GPUs only
            # (torch 2.13 refuses CPU input), so gloo runs normalise per process. The
            # conversion is in place (stage.model keeps the same submodule) unless the
            # trainable part is itself a BatchNorm layer, which no stage has.
            if nn.SyncBatchNorm.convert_sync_batchnorm(module) is not module:
                raise ValueError("the trainable module cannot itself be a BatchNorm layer")
        ddp_args = {"device_ids": [device.index]} if device.type == "cuda" else {}
        module = nn.parallel.DistributedDataParallel(module, **ddp_args)

    log = MetricsLog(run, loop.step, placement.is_main)
    bar = tqdm(total=config.steps, initial=loop.step, desc=f"train {stage.name}", unit="step",
               disable=not (progress and placement.is_main), dynamic_ncols=True)
    stream = iter(train_data.batches(loop.epoch, loop.epoch_step * accum))
    sums: dict[str, torch.Tensor] = {}
    window_steps, window_start = 0, time.perf_counter()
    last_loss = None

    def log_window(lr: float) -> None:
        """Log the means of the steps since the last row (every process takes part)."""
        nonlocal sums, window_steps, window_start, last_loss
        values = window_means(sums, window_steps, device)
        if not all(math.isfinite(v) for k, v in values.items() if k != "grad_norm"):
            raise _diverged(run, f"the loss is {values['total']}", loop.step)
        values.update(term_shares(values, stage.term_weights()))
        elapsed = time.perf_counter() - window_start
        rate = window_steps * config.batch_size / max(elapsed, 1e-9)
        log.scalars(loop.step, "train", {**values, "lr": lr, "samples_per_s": rate})
        last_loss = values["total"]
        bar.set_postfix(loss=f"{last_loss:.4g}", samples_s=f"{rate:.1f}", refresh=False)
        sums, window_steps, window_start = {}, 0, time.perf_counter()

    def autocast():
        if autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    try:
        while loop.step < config.steps:
            stage.model.eval()
            stage.trainable.train()
            stream, group = _next_group(stream, loop, train_data, accum)
            optimizer.zero_grad(set_to_none=True)
            for i, batch in enumerate(group):
                batch = stage.on_device(batch, device)
                sync = i == accum - 1 or not isinstance(module, nn.parallel.DistributedDataParallel)
                with nullcontext() if sync else module.no_sync():
                    with autocast():
                        total, terms = stage.loss(module, batch)
                    scaled = total / accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                # Summed on the device and read only when logged: no host sync per step.
                accumulate(sums, {"total": total, **terms}, 1 / accum)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if config.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                accumulate(sums, {"grad_norm": grad_norm})
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            with warnings.catch_warnings():
                # An fp16 GradScaler skips the optimiser's step while its scale settles (the
                # gradients overflow), and torch then warns that the schedule stepped first;
                # the schedule follows the step count either way.
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
                scheduler.step()
            loop.step += 1
            loop.epoch_step += 1
            window_steps += 1

            if loop.step % config.log_every == 0 or loop.step == config.steps:
                log_window(lr)
            bar.update(1)

            validating = val_data is not None and config.val_batches > 0 and (
                loop.step % config.val_every == 0 or loop.step == config.steps)
            val_loss = None
            # Neither draws from training's random stream (a stage may draw from it, e.g.
            # dropout; precise BatchNorm runs in training mode), so that a run that ends
            # here, validated, and is resumed draws what an unbroken run draws.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if validating or loop.step == config.steps:
                    precise_batchnorm(stage, train_data, config.precise_bn_batches, device,
                                      autocast)
                if validating:
                    val_loss = _validate(stage, val_data, config, run, loop.step, log, device,
                                         placement, autocast)
            is_best = val_loss is not None and math.isfinite(val_loss) and (
                loop.best_val_loss is None or val_loss < loop.best_val_loss)
            if is_best:
                loop.best_val_loss, loop.best_step = val_loss, loop.step
            if is_best or loop.step % config.checkpoint_every == 0 or loop.step == config.steps:
                if window_steps:  # no logging window spans a checkpoint: a resumed run's
                    log_window(lr)  # rows are those of an unbroken run
                if not bool(torch.stack([p.isfinite().all() for p in params]).all()):
                    raise _diverged(run, "the weights are not finite", loop.step)
                save_checkpoint(run, stage, optimizer, scheduler, scaler, loop, config, placement,
                                device, val_loss, data)
                if is_best and placement.is_main:
                    with atomic_write(run / CHECKPOINTS_DIR / BEST_FILE, "w") as f:
                        json.dump({"step": loop.step, "val_loss": val_loss}, f)
            if on_step is not None:
                on_step(loop.step)
    finally:
        bar.close()
        log.close()

    model_dir = None
    if placement.is_main:
        model_dir = run / RUN_MODEL_DIR
        _export(stage, model_dir)
    if dist.is_initialized():
        dist.barrier()
    return FitResult(step=loop.step, train_loss=last_loss, best_val_loss=loop.best_val_loss,
                     best_step=loop.best_step, model_dir=model_dir)


def _diverged(run: Path, what: str, step: int):
    """The error that stops a run whose loss or weights are no longer finite: no
    checkpoint or model of them is written."""
    from speech2face.errors import TrainingError

    return TrainingError(run, f"training diverged: {what} at step {step} (lower lr, or set "
                              "grad_clip); the checkpoints written before are kept: "
                              "--resume with other settings continues from the last")


def precise_batchnorm(stage: Stage, data, batches: int, device: torch.device,
                      autocast=nullcontext) -> bool:
    """Re-estimate the BatchNorm running statistics of ``stage.trainable`` with its
    current weights ("precise BN", Wu & Johnson 2021): a cumulative average over the
    first ``batches`` micro-batches of ``data``'s epoch 0, forward only.

    The running averages that training keeps (momentum 0.1) trail weights that still
    change quickly, and evaluation uses them. Epoch 0's order is fixed, so a resumed run
    gets the same statistics. Under DDP every process averages its own batches and the
    results are averaged over processes. Returns False when there is nothing to do.
    """
    norms = [m for m in stage.trainable.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or batches <= 0:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    modes = [(m, m.training) for m in stage.trainable.modules()]
    stage.trainable.train()
    try:
        with torch.no_grad():
            for i, batch in enumerate(data.batches(0, 0)):
                if i == batches:
                    break
                with autocast():
                    stage.loss(stage.trainable, stage.on_device(batch, device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, training in modes:
            m.train(training)
    if dist.is_initialized():
        for m in norms:
            for stat in (m.running_mean, m.running_var):
                dist.all_reduce(stat)
                stat.div_(dist.get_world_size())
    return True


def _export(stage: Stage, folder: Path) -> None:
    """Write the stage's model to ``folder`` (a bundle when the model is a Speech2Face)."""
    with replacing_dir(folder) as tmp:
        write_bundle_files(tmp, stage.bundle_config(), state_dict_for_safetensors(stage.model))


@torch.no_grad()
def _validate(stage: Stage, val_data, config: TrainConfig, run: Path, step: int, log: MetricsLog,
              device: torch.device, placement: Placement, autocast) -> float | None:
    """Mean validation loss on rank 0 (others wait), and the image grid PNG."""
    loss = None
    if placement.is_main:
        stage.model.eval()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        first = None
        for batch in val_data.batches(0, 0):
            batch = stage.on_device(batch, device)
            with autocast():
                total, terms = stage.loss(stage.trainable, batch)
            accumulate(sums, {"total": total, **terms})
            count += 1
            if first is None:
                first = batch
            if count >= config.val_batches:
                break
        if count:
            values = {k: float(v) / count for k, v in sums.items()}
            log.scalars(step, "val", values)
            loss = values["total"]
            n = config.val_images
            columns = stage.images({k: v[:n] if isinstance(v, torch.Tensor) else v
                                    for k, v in first.items()})
            columns = [c.float().clamp(0, 1) for c in columns]
            if columns:
                grid = validation_grid(columns)
                write_png(grid, run / IMAGES_DIR / f"val-{step:08d}.png")
                log.image(step, "val/faces", grid)
    if dist.is_initialized():
        # Every process needs the loss: a new best means a checkpoint, which all join.
        shared = torch.tensor([math.nan if loss is None else loss], dtype=torch.float64,
                              device=reduce_device(device))
        dist.broadcast(shared, src=0)
        loss = None if math.isnan(shared.item()) else shared.item()
    return loss


# ---------------------------------------------------------------------------- checkpoints


def _incomplete_checkpoints(run: Path, checkpoint: Path | None) -> list[str]:
    """The checkpoint folders newer than ``checkpoint`` (None: any), which therefore lack
    their state (not written by save_checkpoint, which renames a finished folder into
    place; copied in part, say)."""
    def step(path: Path) -> int:  # -1: not a step folder
        digits = path.name.removeprefix(CHECKPOINT_PREFIX)
        return int(digits) if digits.isdigit() else -1

    newest = -1 if checkpoint is None else step(checkpoint)
    folder = run / CHECKPOINTS_DIR
    return sorted(p.name for p in folder.glob(f"{CHECKPOINT_PREFIX}*")
                  if step(p) > newest) if folder.is_dir() else []


def _say_incomplete(run: Path, checkpoint: Path | None) -> None:
    """One line when newer checkpoint folders than the one resumed lack their state: they
    are skipped, and their steps trained again."""
    skipped = _incomplete_checkpoints(run, checkpoint)
    if skipped:
        print(f"speech2face: {', '.join(skipped)} in {run / CHECKPOINTS_DIR} hold(s) no "
              f"complete checkpoint (no state.json): resuming from "
              f"{'the start' if checkpoint is None else checkpoint.name}", file=sys.stderr)


def latest_checkpoint(run: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run, or ``None``."""
    found = checkpoint_dirs(Path(run))
    return found[-1][1] if found else None


@dataclass
class LoopState:
    """The loop's position: what a checkpoint restores besides tensors."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # optimiser steps done within ``epoch`` (the data position)
    best_val_loss: float | None = None
    best_step: int | None = None


def save_checkpoint(run: Path, stage: Stage, optimizer, scheduler, scaler, loop: LoopState,
                    config: TrainConfig, placement: Placement, device: torch.device,
                    val_loss: float | None = None, data: dict[str, str] | None = None) -> Path:
    """Write ``RUN/checkpoints/step-NNNNNNNN`` (all processes call this; rank 0 writes);
    ``data`` is what the splits trained and validated on hold (their fingerprints).

    The directory is a model bundle (``config.json`` + ``model.safetensors``) plus
    ``optimizer.safetensors``, ``rng.safetensors`` and ``state.json``; it is assembled
    under a temporary name and renamed into place, so a kill leaves no partial checkpoint.
    """
    from safetensors.torch import save

    rng = gather_rng(device)
    final = run / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{loop.step:08d}"
    if not placement.is_main:
        return final
    with replacing_dir(final) as tmp:
        write_bundle_files(tmp, stage.bundle_config(), state_dict_for_safetensors(stage.model))
        opt_meta, opt_tensors = optimizer_to_files(optimizer)
        with atomic_write(tmp / OPTIMIZER_FILE) as f:
            f.write(save(opt_tensors) if opt_tensors else save({"_empty": torch.zeros(0)}))
        rng_tensors = {f"{name}.rank{r}": t.contiguous() for r, item in enumerate(rng)
                       for name, t in item.items()}
        with atomic_write(tmp / RNG_FILE) as f:
            f.write(save(rng_tensors))
        state = {
            **dataclasses.asdict(loop),
            "val_loss": val_loss,
            "world_size": placement.world_size,
            "grad_accum": config.grad_accum,
            "optimizer": opt_meta,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "train_config": config.to_dict(),
            "data": data or {},
        }
        with atomic_write(tmp / STATE_FILE, "w") as f:
            json.dump(state, f, indent=1)
    prune_checkpoints(run, config.keep_last, loop.best_step)
    return final


def load_checkpoint(path: Path, stage: Stage, optimizer, scheduler, scaler, placement: Placement,
                    device: torch.device, config: TrainConfig,
                    data: dict[str, str] | None = None) -> LoopState:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns the loop position.

    What the resumed run's settings (``config``) changed takes effect:
    the optimiser's and the schedule's settings (:func:`_follow_settings`), a new
    ``batch_size`` (the position within the epoch is re-counted in its batches), a
    new process or loader-worker count (the shards' order changes: one line says so),
    and other data (``data``, the splits' fingerprints: :func:`_follow_data`).
    """
    # Everything is read and checked before anything is restored (speech2face.checkpoints).
    state = read_state(path)
    weights = read_safetensors(path / WEIGHTS_NAME)
    opt_tensors = read_safetensors(path / OPTIMIZER_FILE)
    opt_tensors.pop("_empty", None)
    rng = read_safetensors(path / RNG_FILE)
    _check_same_model(path, state, stage, config)
    # The same process count restores each process's own stream; otherwise rank 0's.
    rng_key = check_checkpoint(path, state, opt_tensors, rng, optimizer, scheduler,
                               placement.rank)
    load_state_checked(stage.model, weights, path / WEIGHTS_NAME, same_dtype=True)
    optimizer.load_state_dict(optimizer_from_files(state["optimizer"], opt_tensors))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(rng[rng_key])
    cuda_key = rng_key.replace("cpu.", "cuda.")
    if device.type == "cuda" and cuda_key in rng:
        torch.cuda.set_rng_state(rng[cuda_key], device)
    names = {f.name for f in dataclasses.fields(LoopState)}
    loop = LoopState(**{k: v for k, v in state.items() if k in names})
    saved = state.get("train_config")
    saved = saved if isinstance(saved, dict) else {}  # informative only: checked as used
    say = (lambda line: print(f"speech2face: {line}", file=sys.stderr)) if placement.is_main \
        else (lambda line: None)
    # The shard loader splits shards by process and by loader worker: another count
    # reads another order, and the rest of this epoch may repeat or miss a few samples.
    order = []
    if state["world_size"] != placement.world_size:
        order.append(f"a {state['world_size']}-process checkpoint resumed with "
                     f"{placement.world_size} processes")
    if is_whole(saved.get("num_workers"), 0) and saved["num_workers"] != config.num_workers:
        order.append(f"num_workers {saved['num_workers']} -> {config.num_workers}")
    if order:
        say(f"{'; '.join(order)}: the shard loader's order changes from here (this epoch "
            "may repeat or miss a few samples)")
    for line in [*_follow_settings(optimizer, scheduler, config, loop.step),
                 *_follow_data(state.get("data"), data or {}, loop)]:
        say(line)
    if is_number(saved.get("classifier_l2")) and saved["classifier_l2"] != config.classifier_l2:
        say(f"classifier_l2 {config.classifier_l2} (was {saved['classifier_l2']}) has no "
            "effect on a resumed run: the identity classifier was fitted when the run "
            "started, and the checkpoint keeps it")
    changed = _other_changes(saved, config)
    if changed:
        say(f"resuming with {changed}: from step {loop.step} this run trains otherwise "
            "than the one it continues")
    old_batch = saved.get("batch_size")
    if is_whole(old_batch, 1) and old_batch != config.batch_size and loop.epoch_step:
        done = loop.epoch_step * old_batch  # samples of this epoch already trained on
        if done % config.batch_size:
            raise ConfigError(path, f"batch_size {config.batch_size} cannot continue this "
                                    f"epoch: {done} samples of it were trained in batches of "
                                    f"{old_batch}, not a multiple of {config.batch_size}; "
                                    f"resume with batch_size={old_batch}, or from a "
                                    "checkpoint where they are")
        loop.epoch_step = done // config.batch_size
        say(f"batch_size {old_batch} -> {config.batch_size}: this epoch goes on after its "
            f"first {done} samples")
    return loop


def _follow_data(saved, now: dict[str, str], loop: LoopState) -> list[str]:
    """Make the restored loop position follow other data: ``--data`` naming another
    dataset, or the same one prepared again. ``saved`` is the checkpoint's record of its
    splits (:func:`save_checkpoint`), ``now`` this run's. The checkpoint's place within its
    epoch means nothing in another training split, so the epoch starts at its beginning;
    a best validation loss from another validation split is not compared with this one's,
    so the best is chosen afresh (the checkpoint best on the old data is kept until one
    replaces it). Returns the lines that say so. A folder moved elsewhere holds the same
    data and changes nothing."""
    if not isinstance(saved, dict):  # (a checkpoint of an older version records none)
        return []
    lines = []
    if isinstance(saved.get("train"), str) and "train" in now and saved["train"] != now["train"]:
        where = f", from its first batch (the checkpoint was {loop.epoch_step} steps into " \
                f"it)" if loop.epoch_step else ""
        lines.append(f"--data: its training split is not the one this run trained on (its "
                     f"shards differ): from step {loop.step} it trains on this one, epoch "
                     f"{loop.epoch}{where}")
        loop.epoch_step = 0
    if isinstance(saved.get("val"), str) and "val" in now and saved["val"] != now["val"] \
            and loop.best_val_loss is not None:
        lines.append(f"--data: its validation split is not the one this run validated on: "
                     f"the best validation loss so far ({loop.best_val_loss:.4g}, step "
                     f"{loop.best_step}) was on other data, and the best is chosen afresh")
        loop.best_val_loss = None
    return lines


def _shown(value) -> str:
    """A checkpoint's setting as a message shows it: the checkpoint's own text, so a
    tampered one could be any length; cut to 60 characters."""
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_same_model(path: Path, state: dict, stage: Stage, config: TrainConfig) -> None:
    """ConfigError naming the settings that size the model (the preset; the voice
    encoder's kind) where the checkpoint's run had others: its tensors would not fit, and
    saying so beats an error about a tensor's shape, which reads as a damaged checkpoint
    (and whose advice, resume from the checkpoint before, fails the same way)."""
    saved = state.get("train_config")
    keys = ("preset", "encoder") if stage.name == "voice" else ("preset",)
    changed = [f"{key} {getattr(config, key)} (the checkpoint's run: {_shown(saved[key])})"
               for key in keys if isinstance(saved, dict) and isinstance(saved.get(key), str)
               and saved[key] != getattr(config, key)]
    if changed:
        given = " ".join(f"{key}={_shown(saved[key])}" for key in keys
                         if saved.get(key) is not None)
        raise ConfigError(path, f"was trained with another model: {', '.join(changed)}; "
                                f"resume with {given}, or train into a new folder")


# Settings a resumed run may change without a word: when and what it logs, checkpoints
# and validates, and where it runs (the others it announces: _other_changes).
_QUIET_ON_RESUME = {"steps", "log_every", "val_every", "val_batches", "val_images",
                    "checkpoint_every", "keep_last", "sample_cache_mb", "device",
                    "deterministic", "face_encoder_weights",
                    # said by _follow_settings and load_checkpoint themselves
                    "lr", "lr_decay", "lr_decay_steps", "beta1", "beta2", "eps", "batch_size",
                    "num_workers",
                    # fitted once, at the start; kept by the checkpoint (load_checkpoint says)
                    "classifier_l2"}


def _other_changes(saved: dict, config: TrainConfig) -> str:
    """The settings of the checkpoint's run (``saved``, its train_config) that the resumed
    ``config`` changes and nothing else reports (seed, feature_noise, loss weights, ...):
    ``"seed 5 (was 0), loss.lambda1 0.1 (was 0.025)"``, or ``""``."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in d.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    was, now = flat(saved), flat(config.to_dict())
    return ", ".join(f"{k} {now[k]} (was {_shown(was[k])})" for k in sorted(now)
                     if k in was and was[k] != now[k] and k not in _QUIET_ON_RESUME)


def _follow_settings(optimizer, scheduler, config: TrainConfig, step: int) -> list[str]:
    """Make a restored optimiser and schedule follow the resumed run's settings.

    A checkpoint restores Adam's and StepLR's settings as they were; a resumed run may
    change ``lr``, ``lr_decay``, ``lr_decay_steps``, ``beta1``, ``beta2`` and ``eps``,
    and from here the rate is the new schedule's at ``step`` (``lr * lr_decay **
    (step // lr_decay_steps)``). Nothing is touched when nothing changed (the restored
    rate is bit-identical to an unbroken run's). Returns the line that says what
    changed, or none.
    """
    group = optimizer.param_groups[0]
    was = {"lr": scheduler.base_lrs[0], "lr_decay": scheduler.gamma,
           "lr_decay_steps": scheduler.step_size, "beta1": group["betas"][0],
           "beta2": group["betas"][1], "eps": group["eps"]}
    now = {"lr": config.lr, "lr_decay": config.lr_decay,
           "lr_decay_steps": config.lr_decay_steps, "beta1": config.beta1,
           "beta2": config.beta2, "eps": config.eps}
    changed = [name for name in was if was[name] != now[name]]
    if not changed:
        return []
    lr = config.lr * config.lr_decay ** (step // config.lr_decay_steps)
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    scheduler.gamma, scheduler.step_size = config.lr_decay, config.lr_decay_steps
    scheduler._last_lr = [lr] * len(optimizer.param_groups)
    for g in optimizer.param_groups:
        g.update(lr=lr, initial_lr=config.lr, betas=(config.beta1, config.beta2),
                 eps=config.eps)
    return [f"resuming with {', '.join(f'{n} {now[n]:g} (was {was[n]:g})' for n in changed)}: "
            f"the learning rate from step {step} is {lr:g}"]


# ---------------------------------------------------------------------------- the two stages


def _face_encoder_for_loss(manifest: dict, config: TrainConfig, device: torch.device):
    """The face encoder for stage 1's perceptual term: only a differentiable one is loaded."""
    name = manifest["encoder"]
    if name == "dlib":
        return None  # not differentiable: no perceptual term, nothing to load
    from speech2face.face_encoders import load_face_encoder

    encoder = load_face_encoder(name, weights=config.face_encoder_weights, device=device,
                                option=WEIGHTS_SETTING)
    return encoder.eval().requires_grad_(False)


WEIGHTS_SETTING = "the setting face_encoder_weights=FILE"


def _check_encoder_weights(manifest: dict, config: TrainConfig) -> None:
    """A ConfigError where ``face_encoder_weights`` is set for shards whose features need
    none (dlib's): the file would be silently ignored, whatever it holds."""
    if config.face_encoder_weights is not None and manifest["encoder"] == "dlib":
        raise ConfigError(None, f"face_encoder_weights={config.face_encoder_weights}: the "
                                f"shards hold dlib features, whose encoder takes no weights "
                                f"file; remove the setting")


def _check_fresh(out: Path, resume: bool) -> None:
    _check_run_entries(out)
    if not resume and latest_checkpoint(out) is not None:
        raise ConfigError(out, "already holds checkpoints; pass --resume to continue it, "
                               "or choose another --out")
    if not resume and (out / RUN_MODEL_DIR).exists():
        raise ConfigError(out, f"already holds a trained model ({RUN_MODEL_DIR}/); choose "
                               "another --out")


def _check_run_entries(out: Path) -> None:
    """ConfigError naming an entry of the run folder that is not of the kind the run
    writes there (a folder where a file goes, or the reverse): found before any work, not
    as a traceback from deep inside the first write."""
    from speech2face.train_log import METRICS_FILE

    if out.exists() and not out.is_dir():
        raise ConfigError(out, "is in the way: the run folder is a file")
    if (out / WEIGHTS_NAME).is_file():  # RUN/model itself, say: a run there would bury it
        raise ConfigError(out, "is a model bundle, not a run folder; choose another --out")
    files = [out / METRICS_FILE, out / TRAIN_CONFIG_FILE, out / CHECKPOINTS_DIR / BEST_FILE]
    folders = [out / "tensorboard", out / CHECKPOINTS_DIR, out / RUN_MODEL_DIR,
               out / IMAGES_DIR]
    for path in files:
        if path.is_dir():
            raise ConfigError(path, "is in the way: a folder where the run writes a file")
    for path in folders:
        if path.exists() and not path.is_dir():
            raise ConfigError(path, "is in the way: a file where the run writes a folder")


def decoder_stage(data: str | os.PathLike, config: TrainConfig,
                  device: torch.device | None = None) -> DecoderStage:
    """Stage 1's :class:`DecoderStage` for the shards in ``data``: a fresh face decoder
    (``config.preset`` size, seeded) for the manifest's feature size and mean landmarks."""
    from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig, feature_spread
    from speech2face.face_encoders import ENCODERS

    manifest = load_manifest(Path(data))
    file = Path(manifest["root"]) / MANIFEST
    if manifest["encoder"] not in ENCODERS:
        raise DataError(file, f"features of an unknown face encoder {manifest['encoder']!r} "
                              f"(this version has {', '.join(ENCODERS)})")
    _check_encoder_weights(manifest, config)
    if manifest.get("mean_landmarks") is None:
        raise DataError(file, "has no mean_landmarks (prepare writes them from the "
                              "training faces): the decoder cannot be built")
    torch.manual_seed(config.seed)
    sizes = FaceDecoderConfig.tiny if config.preset == "tiny" else FaceDecoderConfig.paper
    decoder = FaceDecoder(sizes(int(manifest["feature_dim"])),
                          torch.as_tensor(manifest["mean_landmarks"], dtype=torch.float32))
    noise = 0.0
    if decoder.config.standardize_input or config.feature_noise:
        # From a sample of the training features (shards are written in mixed order, so
        # the first ones are representative); a resumed run loads the standardisation
        # from its checkpoint, and computes the same noise scale again.
        features, _ = training_features(Path(data), progress=False,
                                         max_samples=STANDARDIZATION_SAMPLES)
        if decoder.config.standardize_input:
            decoder.f_dec.set_standardization(torch.from_numpy(features))
        noise = config.feature_noise * feature_spread(features) / features.shape[1] ** 0.5
    model = Speech2Face(decoder, face_encoder_name=manifest["encoder"])
    encoder = _face_encoder_for_loss(manifest, config, device or torch.device("cpu"))
    return DecoderStage(model, config.loss, encoder, feature_noise=noise,
                        keep_targets_bytes=_target_budget(manifest, decoder, config))


def _target_budget(manifest: dict, decoder, config: TrainConfig) -> int:
    """The bytes the decoder stage may keep its texture targets in: ``sample_cache_mb``
    when the training and validation splits' targets all fit in it, else none (a
    VoxCeleb-sized split would fill the budget in its first steps only to drop it)."""
    budget = config.sample_cache_mb << 20
    samples = sum(int(manifest["splits"].get(split, {}).get("samples", 0))
                  for split in ("train", "val"))
    side = decoder.config.image_size
    need = samples * int(manifest.get("crops_per_sample", 1)) * 3 * side * side * 4
    return budget if need <= budget else 0


def voice_stage(data: str | os.PathLike, decoder: str | os.PathLike, config: TrainConfig,
                checkpoint: Path | None = None, progress: bool = True) -> VoiceStage:
    """Stage 2's :class:`VoiceStage`: a fresh voice encoder (seeded), the frozen decoder of
    the bundle ``decoder``, and the identity classifier (see :func:`train_voice`).

    ``checkpoint``: the run is resuming from it, so a fitted classifier is taken from it
    (only its shape is needed here; :func:`fit` loads the weights).
    """
    from speech2face.model import load_model

    data = Path(data)
    manifest = load_manifest(data)
    _check_encoder_weights(manifest, config)
    base = load_model(decoder)
    dim = int(manifest["feature_dim"])
    if base.feature_dim != dim or base.face_encoder_name != manifest["encoder"]:
        raise ConfigError(Path(decoder), f"the decoder takes {base.feature_dim}-D "
                                         f"{base.face_encoder_name} features but the shards "
                                         f"hold {dim}-D {manifest['encoder']} features")
    torch.manual_seed(config.seed)
    voice = build_voice_encoder(config, dim)
    _check_example_length(voice, config, manifest.get("seconds"))
    standardization = getattr(voice, "output_standardization", None)
    if standardization is not None:
        # the decoder's statistics of the training features (a resumed run loads the same
        # values from its checkpoint)
        standardization.copy_from(base.face_decoder.f_dec)
    classifier = base.classifier
    if classifier is None and checkpoint is not None:
        saved = read_bundle_config(checkpoint)  # checked like any bundle's config
        if saved.get("num_identities"):
            classifier = nn.Linear(dim, int(saved["num_identities"]))
    if classifier is None:
        classifier = _identity_classifier(data, manifest, config, progress)
    model = Speech2Face(base.face_decoder, voice, classifier.float(), manifest["encoder"])
    return VoiceStage(model, config.loss)


def _check_example_length(voice: nn.Module, config: TrainConfig,
                          stored_seconds: float | None = None) -> None:
    """A ConfigError, before any training, where ``clip_seconds`` or ``train_seconds`` give
    the voice encoder fewer spectrogram frames than its convolutions need, or where
    ``clip_seconds`` is longer than the shards' clips (``stored_seconds``, the manifest's:
    the loader would repeat each clip to fill it, at that much more cost)."""
    from speech2face.audio import frames_seconds, seconds_samples, spectrogram_frames

    if stored_seconds is not None and config.clip_seconds > stored_seconds:
        raise ConfigError(None, f"clip_seconds={config.clip_seconds:g} is longer than the "
                                f"shards' clips ({stored_seconds:g} s, prepare's); each clip "
                                "would be repeated to fill it")

    encoder_config = getattr(voice, "config", None)
    if not hasattr(encoder_config, "min_frames"):
        return
    need = encoder_config.min_frames()
    for name in ("clip_seconds", "train_seconds"):
        seconds = getattr(config, name)
        if seconds is None:
            continue
        frames = spectrogram_frames(seconds_samples(seconds))
        if frames < need:
            raise ConfigError(None, f"{name}={seconds:g} gives {frames} spectrogram frames; "
                                    f"the voice encoder needs at least {need} "
                                    f"({frames_seconds(need):.3f} s)")


def _setup(config: TrainConfig, out: Path, resume: bool) -> tuple[Placement, torch.device]:
    """Checks that need no data, before anything is read or written: the run folder, the
    process group, the device and its autocast mode."""
    _check_fresh(out, resume)
    placement = init_distributed(config.device)
    device = resolve_device(config, placement)
    amp_dtype(config, device)
    return placement, device


@contextmanager
def _settings_recorded(out: Path, config: TrainConfig, resume: bool,
                       placement: Placement) -> Iterator[None]:
    """The run's settings in RUN/train_config.json while the stage is set up (seconds,
    minutes at scale for the identity classifier), so that a run killed meanwhile, before
    its first checkpoint, resumes with them: ``--resume`` there took the paper preset's
    defaults, and a ``preset=tiny steps=24`` run went on as a 100,000-step paper one. Bad
    input found meanwhile (the run never began) takes the file away again, leaving no
    folder behind. A resumed run keeps the file it has until :func:`fit` accepts its
    settings (one refused, say steps below the checkpoint's, must not replace them)."""
    file = out / TRAIN_CONFIG_FILE
    written = placement.is_main and not (resume and file.is_file())
    if written:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(file, "w") as f:
            json.dump(config.to_dict(), f, indent=2)
    try:
        yield
    except Speech2FaceError:
        if written:
            file.unlink(missing_ok=True)
        raise


def _check_config_type(config) -> None:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig (speech2face.config.load_config makes "
                        f"one from a file or key=value settings), got {type(config).__name__}")


def _check_batch_fits(data: Path, config: TrainConfig, placement: Placement) -> None:
    """A ConfigError, before anything is fitted or written, where the training split has
    fewer samples than one step takes, or fewer shards than there are processes (each
    reads whole shards of its own; one with too few samples for a step is found by
    :func:`fit` at its first step)."""
    split = load_manifest(data)["splits"].get("train", {})
    samples = int(split.get("samples", 0))
    if samples < config.batch_size:
        raise ConfigError(data, f"has {samples} training samples, fewer than one step's "
                                f"batch_size={config.batch_size}")
    shards = len(split.get("shards", []))
    if shards < placement.world_size:
        raise ConfigError(data, f"has {shards} training shard(s) for {placement.world_size} "
                                f"processes, each of which reads whole shards: prepare it "
                                f"with a smaller --samples-per-shard, or run fewer processes")


def train_decoder(data: str | os.PathLike, out: str | os.PathLike,
                  config: TrainConfig | None = None, *, resume: bool = False,
                  progress: bool = True,
                  on_step: Callable[[int], None] | None = None) -> FitResult:
    """Stage 1: train a face decoder on the faces of ``prepare``'s shards in ``data``.

    Writes checkpoints, logs and validation grids to ``out`` and the decoder-only bundle
    (no voice encoder) to ``out/model``; the face feature size and mean landmarks come
    from the shards' manifest. Under ``torchrun`` every process calls this.
    """
    config = config or TrainConfig.paper("decoder")
    _check_config_type(config)
    data, out = Path(data), Path(out)
    placement, device = _setup(config, out, resume)
    _check_batch_fits(data, config, placement)
    _check_stage(latest_checkpoint(out) if resume else None, voice=False)
    with _settings_recorded(out, config, resume, placement):
        stage = decoder_stage(data, config, device)
        train, val = training_data(data, load_manifest(data), config, placement,
                                   spectrogram=False)
    return fit(stage, train, val, config, out, resume=resume, progress=progress, on_step=on_step)


def train_voice(data: str | os.PathLike, decoder: str | os.PathLike, out: str | os.PathLike,
                config: TrainConfig | None = None, *, resume: bool = False, progress: bool = True,
                on_step: Callable[[int], None] | None = None) -> FitResult:
    """Stage 2: train the voice encoder on ``data`` against the frozen decoder bundle ``decoder``.

    The identity classifier of the distillation term is the face encoder's own (VGG-Face
    fc8), the decoder bundle's, or else a linear classifier fitted to the training
    split's face features (``face_encoders.train_identity_classifier``); it is saved in
    the bundle ``out/model`` with the voice encoder and the face decoder.
    """
    config = config or TrainConfig.paper()
    _check_config_type(config)
    data, out = Path(data), Path(out)
    placement, _ = _setup(config, out, resume)
    _check_batch_fits(data, config, placement)
    if config.encoder not in VOICE_ENCODERS:
        build_voice_encoder(config, 0)  # the error, before anything is read or fitted
    checkpoint = latest_checkpoint(out) if resume else None
    _check_stage(checkpoint, voice=True)
    with _settings_recorded(out, config, resume, placement):
        stage = voice_stage(data, decoder, config, checkpoint, progress)
        if checkpoint is not None and placement.is_main:
            _say_if_other_decoder(checkpoint, decoder, stage.model.face_decoder)
        train, val = training_data(data, load_manifest(data), config, placement,
                                   spectrogram=True)
    return fit(stage, train, val, config, out, resume=resume, progress=progress, on_step=on_step)


def _say_if_other_decoder(checkpoint: Path, decoder, face_decoder: nn.Module) -> None:
    """A resumed voice run goes on against the frozen decoder of its checkpoint (its voice
    encoder was trained against that one): say so where ``--decoder`` holds other weights."""
    saved = read_safetensors(checkpoint / WEIGHTS_NAME)
    prefix = "face_decoder."
    same = all(torch.equal(saved.get(prefix + name, torch.empty(0)), value)
               for name, value in face_decoder.state_dict().items())
    if not same:
        print(f"speech2face: resuming against the face decoder saved in {checkpoint}: "
              f"--decoder {decoder} holds other weights, which this run does not use (its "
              "voice encoder was trained against the saved one)", file=sys.stderr)


def _check_stage(checkpoint: Path | None, voice: bool) -> None:
    """Refuse, before anything is built, a checkpoint of the other stage's run (its
    weights name a voice encoder or not): not a damaged one, so not "remove it"."""
    from speech2face.model import read_safetensors_header

    if checkpoint is None:
        return
    parts = {k.partition(".")[0] for k in read_safetensors_header(checkpoint / WEIGHTS_NAME)}
    if ("voice_encoder" in parts) != voice:
        command = "train" if "voice_encoder" in parts else "train-decoder"
        raise ConfigError(checkpoint, f"is a checkpoint of `{command}` (it holds "
                                      f"{', '.join(sorted(parts))}), not of this command's "
                                      f"stage; resume it with `{command}`, or give another --out")


def _identity_classifier(data: Path, manifest: dict, config: TrainConfig,
                         progress: bool) -> nn.Module:
    """fc8 of the face encoder, or a linear classifier fitted to the training faces' features."""
    if manifest["encoder"] != "dlib":
        from speech2face.face_encoders import load_face_encoder

        fc8 = load_face_encoder(manifest["encoder"], weights=config.face_encoder_weights,
                                option=WEIGHTS_SETTING).classifier
        if fc8 is not None:
            return _as_linear(fc8)
    from speech2face.face_encoders import fit_identity_classifier

    placement = init_distributed(config.device)
    linear = None
    if placement.is_main:
        # Fitted once per run: rank 0 fits, the other processes receive the weights.
        features, identities = training_features(data, progress)
        fit = fit_identity_classifier(features, identities, seed=config.seed,
                                      l2=config.classifier_l2,
                                      progress=progress)
        linear = fit.linear
        about = f"speech2face: identity classifier on {len(features)} clips of " \
                f"{len(fit.classes)} identities"
        if fit.heldout_nll is not None:
            print(f"{about}: held-out accuracy {fit.heldout_accuracy:.1%}, temperature "
                  f"{fit.temperature:.3g}, held-out NLL {fit.heldout_nll:.3f} (uncalibrated "
                  f"{fit.heldout_nll_uncalibrated:.3f})", file=sys.stderr)
        else:  # every identity has too few clips for one to be drawn out
            print(f"{about}: no clip held out, so not calibrated (temperature 1)",
                  file=sys.stderr)
    return broadcast_linear(linear, resolve_device(config, placement))


def _as_linear(module: nn.Module) -> nn.Linear:
    if isinstance(module, nn.Linear):
        linear = nn.Linear(module.in_features, module.out_features)
        linear.load_state_dict(module.state_dict())
        return linear.requires_grad_(False)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise ValueError("the face encoder's classifier is not a single linear layer")
    return _as_linear(linears[0])


# ---------------------------------------------------------------------------- command line


def _add_common_arguments(parser) -> None:
    parser.add_argument("--data", required=True, metavar="SHARDS",
                        help="folder written by `speech2face prepare` (manifest.json + shards)")
    parser.add_argument("-o", "--out", required=True, metavar="RUN",
                        help="run folder: checkpoints, logs, validation images and the final "
                             "bundle RUN/model")
    parser.add_argument("--config", metavar="FILE",
                        help="JSON, TOML or YAML file of TrainConfig settings "
                             "(see docs/training.md)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in RUN (its settings are the "
                             "defaults; overrides such as steps=N still apply)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="settings that replace the config file's, e.g. preset=tiny steps=500 "
                             "batch_size=16 loss.lambda1=0.025")


def _config_from_args(args, stage: str) -> TrainConfig:
    """Preset (for ``stage``), then ``--config``, then overrides; on resume the run's settings
    take the preset's place, so only what is given again changes."""
    base = None
    saved = Path(args.out) / TRAIN_CONFIG_FILE
    newest = latest_checkpoint(args.out) if args.resume else None
    if args.resume and saved.is_file():
        base = load_config(saved, stage=stage)
    elif newest is not None:  # RUN/train_config.json lost: the checkpoint's own record
        recorded = read_state(newest).get("train_config")  # (checked as a config file is)
        if isinstance(recorded, dict):
            base = config_from_settings(recorded, newest / STATE_FILE, stage=stage)
        elif args.config is None and not args.overrides:  # (the paper's sizes, then a
            # shape mismatch deep in the optimizer state was all one learned)
            raise ConfigError(saved, f"is missing and {newest / STATE_FILE} records no "
                                     "settings: give the run's settings again (--config "
                                     "FILE or key=value, e.g. preset=tiny) to resume")
    if args.resume and newest is None and \
            not _incomplete_checkpoints(Path(args.out), None) and \
            int(os.environ.get("RANK", "0")) == 0:  # (the demo resumes whatever is there)
        # (with incomplete checkpoint folders, _say_incomplete says it, naming them)
        print(f"speech2face: {args.out}: no checkpoint to resume: training from the start",
              file=sys.stderr)
    return load_config(args.config, args.overrides, base=base, stage=stage)


def _finish(result: FitResult, placement_is_main: bool) -> int:
    shutdown_distributed()
    if placement_is_main:
        best = "" if result.best_val_loss is None else \
            f", best validation loss {result.best_val_loss:.4g} at step {result.best_step}"
        print(f"trained {result.step} steps{best}; model bundle in {result.model_dir}")
    return 0


def add_train_decoder_arguments(parser) -> None:
    """``speech2face train-decoder --data SHARDS --out RUN [--config FILE] [KEY=VALUE ...]``."""
    _add_common_arguments(parser)


def train_decoder_command(args) -> int:
    config = _config_from_args(args, "decoder")
    result = train_decoder(args.data, args.out, config, resume=args.resume,
                           progress=not args.no_progress)
    return _finish(result, int(os.environ.get("RANK", "0")) == 0)


def add_train_arguments(parser) -> None:
    """``speech2face train --data SHARDS --decoder RUN_OR_BUNDLE --out RUN [...]``."""
    _add_common_arguments(parser)
    parser.add_argument("--decoder", required=True, metavar="RUN_OR_BUNDLE",
                        help="the stage-1 face decoder: a bundle or a `train-decoder` run folder")


def train_command(args) -> int:
    config = _config_from_args(args, "voice")
    result = train_voice(args.data, args.decoder, args.out, config, resume=args.resume,
                         progress=not args.no_progress)
    return _finish(result, int(os.environ.get("RANK", "0")) == 0)
