"""Training configuration: :class:`TrainConfig`, its presets, and reading it from files and
``key=value`` overrides.

A configuration is built in layers: a preset (``paper`` or ``tiny``, for a stage), then a
JSON/TOML file, then command-line overrides, each replacing the one before. OmegaConf
(a structured config over the dataclasses) does the merging, the key checks and the type
conversion of strings such as ``steps=500`` or ``loss.lambda1=0.1``; the value ranges are
checked by :meth:`TrainConfig.__post_init__`. Every problem is one
:class:`speech2face.errors.ConfigError` naming the file (or the command line) and the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from speech2face.audio import MIN_SECONDS
from speech2face.errors import ConfigError
from speech2face.losses import LossConfig
from speech2face.utils import is_whole, seed_problem

# The smallest normal and the largest float32 (numpy.finfo(numpy.float32).tiny and .max).
FLOAT32_TINY = 2.0 ** -126
FLOAT32_MAX = (2 - 2.0 ** -23) * 2.0 ** 127
MAX_LOADER_WORKERS = 1024
# Step counts and intervals: beyond 2^53 not one a run reaches, nor one float64 or a log
# file holds exactly (steps=1e20 trained until killed).
MAX_STEPS = 2**53

# Paper section 4 ("Implementation details"), the same for both stages here.
LEARNING_RATE = 1e-3
ADAM_BETA1 = 0.5
ADAM_BETA2 = 0.999  # not given in the paper: Adam's default
ADAM_EPS = 1e-4
# Stage 1 (the face decoder) is not the paper's training: its losses are means over
# pixels, whose gradients per weight are mostly far below the paper's epsilon (on the demo
# corpus 99.99 % < 1e-4), which turns Adam into plain SGD with a tiny step; its presets
# use Adam's usual epsilon (docs/training.md).
DECODER_ADAM_EPS = 1e-8
LR_DECAY = 0.95  # the learning rate is multiplied by this ...
LR_DECAY_STEPS = 10_000  # ... every this many steps
BATCH_SIZE = 8

STAGES = ("voice", "decoder")
PRESETS = ("paper", "tiny")
AMP_MODES = ("auto", "none", "bf16", "fp16")
COMMAND_LINE = "<command line>"


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of a training run; ``paper()`` and ``tiny()`` are the presets.

    Set from a JSON/TOML file and ``key=value`` overrides with :func:`load_config`
    (``loss.lambda1=0.1`` reaches into :class:`speech2face.losses.LossConfig`).
    """

    # Model sizes of the voice encoder and face decoder: "paper" or "tiny" (tests, CPU demos).
    preset: str = "paper"
    # The voice encoder of stage 2, built by model.build_voice_encoder: "paper" is the
    # network of paper Table 1 (sized by `preset`); "resemblyzer" the pretrained-speaker-
    # embedding baseline (speech2face.resemblyzer_encoder). Other names are registered there.
    encoder: str = "paper"
    # Optimiser steps in all (the run ends there; --resume with a larger value continues).
    steps: int = 100_000
    # Samples per optimiser step, over all processes and accumulation steps, so the
    # result does not depend on how many GPUs share the work (paper: 8).
    batch_size: int = BATCH_SIZE
    # Micro-batches per process and step; each is batch_size / (processes * grad_accum).
    grad_accum: int = 1
    # Adam (paper section 4).
    lr: float = LEARNING_RATE
    beta1: float = ADAM_BETA1
    beta2: float = ADAM_BETA2
    eps: float = ADAM_EPS
    # Staircase decay: lr * lr_decay ** (step // lr_decay_steps) (paper: 0.95 every 10k).
    lr_decay: float = LR_DECAY
    lr_decay_steps: int = LR_DECAY_STEPS
    # Clip the global gradient norm to this; 0 turns clipping off (the paper does not clip).
    grad_clip: float = 0.0
    # Autocast: "auto" is bf16 on a GPU that has it, else fp16 with loss scaling, and
    # float32 on CPU; "bf16" also runs on CPU (autocast there too); "fp16" needs a GPU.
    amp: str = "auto"
    # Bitwise-repeatable GPU runs: deterministic cuDNN kernels and
    # torch.use_deterministic_algorithms (slower; CPU runs are repeatable without it).
    deterministic: bool = False
    # "auto" (cuda:LOCAL_RANK when there is a GPU, else cpu), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # Seeds the initial weights and every epoch's sample order.
    seed: int = 0
    # Progress-bar and scalar logging interval, in steps.
    log_every: int = 10
    # Validation interval in steps, and how many validation batches it averages
    # (0: no validation; otherwise the shards need a `val` split).
    val_every: int = 1000
    val_batches: int = 8
    # Faces in the validation image grid.
    val_images: int = 8
    # Precise BatchNorm: before each validation and at the end of training, BatchNorm's
    # running statistics are re-estimated with the current weights over this many training
    # micro-batches (0: keep the running averages). The averages lag weights that still
    # move fast; on the demo they put the voice encoder's predictions 72 degrees from the
    # true features at step 150, where re-estimated statistics give 21.
    precise_bn_batches: int = 32
    # Checkpoint interval in steps; the last keep_last are kept, plus the best by validation.
    checkpoint_every: int = 1000
    keep_last: int = 3
    # Data-loading worker processes per training process.
    num_workers: int = 4
    # Seconds of speech per example (paper section 3.1: 6 s; it also reports 3 s). The
    # voice encoder averages over time, so a model trained on one length runs on others.
    clip_seconds: float = 6.0
    # Stage 2: train on a random window of this many seconds of each clip, a new window
    # at each visit (None: the whole clip_seconds from its start, as the paper). Fewer
    # frames make a step cheaper, and the windows vary what the encoder hears of a
    # speaker; validation and evaluation keep clip_seconds.
    train_seconds: float | None = None
    # Stage 1: noise on the decoder's input features while it trains (0: none). Each
    # feature moves by a Gaussian vector whose length is drawn uniformly between 0 and
    # feature_noise times the features' spread (their root-mean-square distance to their
    # mean); the target stays the clean face. At inference the decoder's input is the
    # voice encoder's prediction, which misses the true feature by about the spread (the
    # demo: 1.1 on held-out speakers); trained on clean features only, the decoder draws
    # blends of faces there. Lengths from 0 up keep it sharp on exact features.
    feature_noise: float = 0.0
    # Shuffle buffer of the shard loader, in samples (bigger mixes more, costs memory).
    shuffle_buffer: int = 1000
    # With num_workers=0, shards read and samples decoded are kept in memory for later
    # epochs up to this many MiB (0: never); a split that does not fit is read from disk
    # every epoch. The batches are the same either way (data.loader.SampleCache). The face
    # decoder's texture targets are kept up to the same budget (train.KeptTargets).
    sample_cache_mb: int = 1024
    # Weights of a VGG-Face encoder when the shards' features came from it.
    face_encoder_weights: str | None = None
    # L2 penalty of the stand-in identity classifier against its summed cross-entropy
    # (dlib features; scikit-learn's 1 / C; face_encoders.CLASSIFIER_L2 says why summed).
    # Its temperature is calibrated afterwards on held-out clips, so this matters little
    # unless far too large.
    classifier_l2: float = 16.0
    # All loss weights (speech2face.losses.LossConfig).
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self):
        problems = _type_problems(self)
        if not isinstance(self.loss, LossConfig):
            problems.append(f"loss must be a LossConfig, got {type(self.loss).__name__}")
        else:
            problems += [f"loss.{p}" for p in _type_problems(self.loss)]
        if problems:  # the range checks below compare numbers
            raise ConfigError(None, "; ".join(problems))
        if self.preset not in PRESETS:
            problems.append(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.amp not in AMP_MODES:
            problems.append(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        from speech2face.model import VOICE_ENCODERS  # (model imports this module)

        if self.encoder not in VOICE_ENCODERS:  # train-decoder kept encoder=foo unchecked
            problems.append(f"encoder must be one of {sorted(VOICE_ENCODERS)}, got "
                            f"{self.encoder!r}")
        for name in ("steps", "batch_size", "grad_accum", "lr_decay_steps", "log_every",
                     "val_every", "checkpoint_every", "keep_last", "val_images", "shuffle_buffer"):
            if not 1 <= getattr(self, name) <= MAX_STEPS:
                problems.append(f"{name} must be from 1 to 2^53, got {getattr(self, name)}")
        for name in ("val_batches", "num_workers", "precise_bn_batches", "sample_cache_mb"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.num_workers > MAX_LOADER_WORKERS:  # each is a process
            problems.append(f"num_workers must be at most {MAX_LOADER_WORKERS}, "
                            f"got {self.num_workers}")
        for name in ("lr", "eps"):
            # Adam holds them in float32: 1e308 overflows it, 1e-320 rounds to 0 there.
            if not FLOAT32_TINY <= getattr(self, name) <= FLOAT32_MAX:
                problems.append(f"{name} must be a float32 number in [{FLOAT32_TINY:.3g}, "
                                f"{FLOAT32_MAX:.3g}], got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        # Adam's first step is lr / (1 - beta1), a float32 too (lr=1.8e38 overflowed it).
        if not problems and self.lr / (1 - self.beta1) > FLOAT32_MAX:
            problems.append(f"lr must be at most (1 - beta1) x {FLOAT32_MAX:.3g} = "
                            f"{FLOAT32_MAX * (1 - self.beta1):.3g} (Adam's first step, "
                            f"lr / (1 - beta1), is a float32), got {self.lr}")
        if problem := seed_problem(self.seed):
            problems.append(problem)
        # A negative weight rewards the error it measures; temperature 0 divides by zero
        # (every loss NaN from the first step).
        for name in ("lambda1", "lambda2", "texture_weight", "landmark_weight",
                     "perceptual_weight"):
            value = getattr(self.loss, name)
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                problems.append(f"loss.{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.loss.temperature, (int, float))
                and 0 < self.loss.temperature < math.inf):
            problems.append(f"loss.temperature must be a finite number > 0, "
                            f"got {self.loss.temperature!r}")
        if not 0 < self.lr_decay <= 1:
            problems.append(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if not MIN_SECONDS <= self.clip_seconds < math.inf:
            problems.append(f"clip_seconds must be a finite number >= {MIN_SECONDS} (one STFT "
                            f"window), got {self.clip_seconds}")
        if self.train_seconds is not None and not (
                MIN_SECONDS <= self.train_seconds <= self.clip_seconds):
            problems.append(f"train_seconds must be from {MIN_SECONDS} (one STFT window) to "
                            f"clip_seconds ({self.clip_seconds}), got {self.train_seconds}")
        # grad_clip 0 turns clipping off; an infinite one is the same and allowed.
        if not self.grad_clip >= 0:
            problems.append(f"grad_clip must be a number >= 0 (0: off), got {self.grad_clip}")
        for name in ("classifier_l2", "feature_noise"):
            if not 0 <= getattr(self, name) < math.inf:
                problems.append(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.grad_accum >= 1 and self.batch_size % self.grad_accum:
            problems.append(f"batch_size {self.batch_size} is not a multiple of grad_accum "
                            f"{self.grad_accum}")
        if problems:
            raise ConfigError(None, "; ".join(problems))

    @classmethod
    def paper(cls, stage: str = "voice", **changes) -> TrainConfig:
        """The paper's settings (section 4): batch 8, Adam 1e-3, x0.95 every 10k steps.

        ``stage="decoder"`` differs in Adam's epsilon only (``DECODER_ADAM_EPS``).
        """
        return cls(**{**_stage_defaults(stage), **changes})

    @classmethod
    def tiny(cls, stage: str = "voice", **changes) -> TrainConfig:
        """Tiny models and a short schedule, for tests and CPU demos."""
        base = dict(preset="tiny", steps=200, lr_decay_steps=100, log_every=5, val_every=50,
                    val_batches=2, checkpoint_every=50, keep_last=2, num_workers=0,
                    shuffle_buffer=100)
        return cls(**{**base, **_stage_defaults(stage), **changes})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _stage_defaults(stage: str) -> dict:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return {"eps": DECODER_ADAM_EPS} if stage == "decoder" else {}


# ---------------------------------------------------------------------------- reading


MAX_CONFIG_FILE_BYTES = 1 << 20  # a training config is a few hundred bytes


def read_config_file(path: str | os.PathLike) -> dict:
    """The settings of a JSON, TOML or YAML file (by suffix; others are read as JSON),
    nested."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():  # a FIFO waited forever, /dev/zero ate memory
            raise ConfigError(path, "cannot read the config file: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_FILE_BYTES + 1)
        if len(raw) > MAX_CONFIG_FILE_BYTES:
            raise ConfigError(path, f"cannot read the config file: larger than "
                                    f"{MAX_CONFIG_FILE_BYTES >> 20} MB")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(path, f"cannot read the config file: {error}") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser, packaged as tomli
                import tomli as tomllib

            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # PyYAML: OmegaConf's own dependency

            try:
                data = _safe_yaml(yaml, text)  # plain data: no tags that build objects
            except yaml.YAMLError as error:
                raise ValueError(str(error).replace("\n", " ")) from None
        else:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ConfigError(path, "nested too deeply to be a config file") from None
    except ValueError as error:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        kind = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}.get(path.suffix.lower(), "JSON")
        raise ConfigError(path, f"not valid {kind}: "
                                f"{str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "the config file must hold a table/object of settings")
    return data


def _no_duplicate_keys(pairs: list) -> dict:
    """A JSON object, refusing a key given twice (``json`` keeps the last silently; YAML
    and TOML files are refused for it too)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _safe_yaml(yaml, text: str):
    """``yaml.safe_load`` without anchors and aliases. A config file is untrusted input,
    and an alias can point into itself (a recursive structure no merge can walk) or
    expand exponentially ("billion laughs": seven lines took minutes of CPU and GBs);
    a settings file never needs them. A key given twice is refused too (PyYAML keeps
    the last silently)."""

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.YAMLError(f"line {event.start_mark.line + 1}: YAML aliases (*name) "
                                     "are not accepted in a config file; write the values out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key, deep=True) for key, _ in node.value]
            for i, key in enumerate(keys):
                if key in keys[:i]:  # as TOML refuses them
                    line = node.value[i][0].start_mark.line + 1
                    raise yaml.YAMLError(f"line {line}: duplicate key {key!r}")
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["steps=100", "loss.lambda1=0.1"]`` -> ``{"steps": "100", "loss.lambda1": "0.1"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(COMMAND_LINE, f"expected key=value, got {item!r}")
        if key.strip() in out:  # as in a config file (the last one won silently)
            raise ConfigError(COMMAND_LINE, f"{key.strip()} is given twice "
                                            f"({out[key.strip()]!r:.30} and {value.strip()!r:.30})")
        out[key.strip()] = value.strip()
    return out


def _nest(flat: dict, source) -> dict:
    """``{"loss.lambda1": v}`` -> ``{"loss": {"lambda1": v}}`` (nested keys kept as they are).
    A setting given both ways (``"loss.lambda1"`` and ``{"loss": {"lambda1": ...}}``) is
    refused: merged, the later silently won."""
    nested: dict = {}

    def put(node: dict, path: list[str], value, shown: str) -> None:
        *parents, last = path
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(source, f"{shown}: {part!r} is a setting, not a group")
            node = child
        if isinstance(value, dict):  # a group: its settings go in one by one
            group = node.setdefault(last, {})
            if not isinstance(group, dict):
                raise ConfigError(source, f"{shown} is given twice")
            for key, item in value.items():
                put(group, [str(key)], item, f"{shown}.{key}")
        elif last in node:
            raise ConfigError(source, f"{shown} is given twice")
        else:
            node[last] = value

    for key, value in flat.items():
        put(nested, str(key).split("."), value, str(key))
    return nested


def _one_line(error: Exception) -> str:
    """``key: problem`` from OmegaConf's message, without its ``full_key``/``object_type``
    trailer lines."""
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{key}: {message}" if key else message


def _settings_text(values: dict) -> dict:
    """Command-line strings as OmegaConf expects them: "none"/"null"/"" are None for the
    settings that can be None; elsewhere they stay words (``amp=none`` is a mode)."""
    optional = {f.name for f in dataclasses.fields(TrainConfig) if "None" in str(f.type)}
    optional |= {f"loss.{f.name}" for f in dataclasses.fields(LossConfig)
                 if "None" in str(f.type)}
    return {k: None if k in optional and isinstance(v, str)
            and v.lower() in ("none", "null", "") else v
            for k, v in values.items()}


def _merge(config: TrainConfig, layer: dict, source) -> TrainConfig:
    """``config`` with one layer of settings applied, checked by OmegaConf and the dataclass."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not layer:
        return config
    if "loss" in layer and not isinstance(layer["loss"], dict):  # OmegaConf: "Merge error"
        raise ConfigError(source, f"loss: a group of settings (a [loss] table, or "
                                  f"loss.lambda1=...), got {layer['loss']!r:.40}")
    from omegaconf.errors import ConfigKeyError

    try:
        merged = OmegaConf.merge(OmegaConf.structured(config), layer)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as error:
        known = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "loss"]
        losses = [f.name for f in dataclasses.fields(LossConfig)]
        raise ConfigError(source, f"unknown setting {error.full_key!r}; settings are "
                                  f"{', '.join(known)} and loss.<{'|'.join(losses)}>") from None
    except OmegaConfBaseException as error:  # a value of the wrong type
        raise ConfigError(source, _one_line(error)) from None
    except ConfigError as error:  # a value out of range (TrainConfig.__post_init__)
        raise ConfigError(source, error.problem) from None


# What each annotated kind of setting must hold (the Python API builds TrainConfig
# directly; OmegaConf checks the same for files and overrides).
_KINDS = {
    "int": ("a whole number", lambda v: is_whole(v)),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
}


def _type_problems(settings) -> list[str]:
    """``name must be KIND, got VALUE`` for each field of the dataclass ``settings`` whose
    value is not of its annotated kind (``X | None`` also takes None)."""
    problems = []
    for item in dataclasses.fields(settings):
        kind, _, optional = str(item.type).partition(" | ")
        if kind not in _KINDS:
            continue
        value = getattr(settings, item.name)
        if value is None and optional == "None":
            continue
        words, ok = _KINDS[kind]
        if not ok(value):
            problems.append(f"{item.name} must be {words}, got {value!r:.40}")
    return problems


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict | list[str] | tuple[str, ...] = (),
    base: TrainConfig | None = None,
    stage: str = "voice",
) -> TrainConfig:
    """A :class:`TrainConfig` from a preset, a JSON/TOML file, then ``key=value`` overrides.

    The preset (``preset=tiny`` in the file or the overrides; default ``base`` or
    ``paper``, for ``stage``) gives the starting values; the file's keys replace them, then
    the overrides'. Nested loss weights are ``loss.<name>`` (or a ``[loss]`` table in
    TOML). Unknown keys and bad values raise :class:`ConfigError` naming the file and key.
    """
    if path is not None:
        return config_from_settings(read_config_file(path), Path(path), overrides, base, stage)
    return config_from_settings({}, None, overrides, base, stage)


def config_from_settings(
    settings: dict,
    source,
    overrides: dict | list[str] | tuple[str, ...] = (),
    base: TrainConfig | None = None,
    stage: str = "voice",
) -> TrainConfig:
    """:func:`load_config` with the file's settings already read (``settings``, from
    ``source``: a checkpoint's record of its run, say), checked the same way."""
    if base is not None and not isinstance(base, TrainConfig):
        raise TypeError(f"base must be a TrainConfig, got {type(base).__name__}")
    overrides = () if overrides is None else overrides
    if isinstance(overrides, (str, bytes)):  # (it was read a character at a time)
        raise TypeError(f"overrides is a list of 'key=value' strings or a dict, not "
                        f"{type(overrides).__name__} {overrides!r:.60}")
    layers: list[tuple[object, dict]] = []
    if settings:
        layers.append((source, _nest(settings, source)))
    if not isinstance(overrides, dict):
        overrides = parse_overrides(list(overrides))
    layers.append((COMMAND_LINE, _nest(_settings_text(overrides), COMMAND_LINE)))

    preset = None
    for source, values in layers:
        if "preset" in values:
            preset = values["preset"]
            if preset not in PRESETS:
                raise ConfigError(source, f"preset must be one of {PRESETS}, got {preset!r}")
    if preset is None:
        config = base or TrainConfig.paper(stage)
    else:
        config = TrainConfig.tiny(stage) if preset == "tiny" else TrainConfig.paper(stage)
        if base is not None and base.preset == preset:
            config = base
    for source, values in layers:
        config = _merge(config, values, source)
    return config


__all__ = [
    "AMP_MODES",
    "PRESETS",
    "STAGES",
    "TrainConfig",
    "load_config",
    "parse_overrides",
    "read_config_file",
]
