"""The model bundle: everything inference needs, in one directory, without pickles.

A bundle is a directory (docs/architecture.md, "Model bundle")::

    config.json         format, voice encoder and face decoder configs, face-encoder
                        name, feature size, number of identities
    model.safetensors   voice_encoder.*  (absent in a stage-1 bundle)
                        face_decoder.*   (including the mean-landmarks buffer)
                        classifier.*     (the identity classifier, when there is one)

Training writes one at ``RUN/model`` (and every checkpoint directory is one too);
:func:`load_model` reads either a bundle directory or a training run's directory. The
networks are built here too: :func:`build_model` from a bundle's config, and
:func:`build_voice_encoder` a fresh voice encoder from a training config, so the kinds
of voice encoder (``config.encoder``, a bundle's ``kind``) are listed in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from speech2face.config import FLOAT32_MAX
from speech2face.errors import ConfigError, WeightsError
from speech2face.faces import CROP_SIZE, FACE_ENCODERS
from speech2face.utils import (
    atomic_write,
    cache_dir,
    device_problem,
    float_type_problem,
    is_number,
    is_whole,
    publishing_dir,
    temp_dir_beside,
)

if TYPE_CHECKING:
    from speech2face.config import TrainConfig

BUNDLE_FORMAT = "speech2face-bundle"
BUNDLE_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
RUN_MODEL_DIR = "model"  # a training run keeps its final bundle in RUN/model


def config_to_dict(config) -> dict:
    """A model config dataclass as JSON-ready data (its own ``to_dict`` when it has one)."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return _jsonable(dataclasses.asdict(config))


def config_from_dict(cls, data: dict, path: str | os.PathLike | None = None):
    """Rebuild a config dataclass written by :func:`config_to_dict`; JSON lists become tuples."""
    if not isinstance(data, dict):
        raise WeightsError(path, f"{cls.__name__} must be a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise WeightsError(path, f"{cls.__name__} has no field(s) {unknown}")
    flags = [f.name for f in dataclasses.fields(cls) if f.type in ("bool", bool)]
    for name in flags:  # "yes" would be taken as true
        if name in data and not isinstance(data[name], bool):
            raise WeightsError(path, f"{cls.__name__}.{name} must be true or false, "
                                     f"got {data[name]!r:.40}")
    try:
        if hasattr(cls, "from_dict"):
            return cls.from_dict(data)
        return cls(**{k: _tuples(v) for k, v in data.items()})
    except (TypeError, ValueError, KeyError) as error:
        raise WeightsError(path, f"bad {cls.__name__}: {error}") from None


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class Speech2Face(nn.Module):
    """Voice encoder + face decoder + identity classifier, and what is needed to use them.

    Args:
        face_decoder: a :class:`speech2face.face_decoder.FaceDecoder` (holds the mean
            landmarks as a buffer).
        voice_encoder: a :class:`speech2face.voice_encoder.VoiceEncoder`, or ``None`` for a
            stage-1 model (decoder only).
        classifier: the identity classifier ``(B, D) -> (B, K)`` used by the distillation
            term (VGG-Face fc8, or a linear one trained on the training identities), or
            ``None``.
        face_encoder_name: which face encoder gave the features (``"dlib"``, ``"vggface"``).
    """

    def __init__(
        self,
        face_decoder: nn.Module,
        voice_encoder: nn.Module | None = None,
        classifier: nn.Linear | None = None,
        face_encoder_name: str = "dlib",
    ):
        super().__init__()
        self.face_decoder = face_decoder
        self.voice_encoder = voice_encoder
        self.classifier = classifier
        self.face_encoder_name = face_encoder_name
        if voice_encoder is not None and voice_encoder.config.output_dim != self.feature_dim:
            raise ValueError(
                f"voice encoder output ({voice_encoder.config.output_dim}) does not match the "
                f"face decoder's feature size ({self.feature_dim})"
            )
        if classifier is not None and classifier.in_features != self.feature_dim:
            raise ValueError(
                f"classifier input ({classifier.in_features}) does not match the feature size "
                f"({self.feature_dim})"
            )

    @property
    def feature_dim(self) -> int:
        """Face feature size D (128 for dlib, 4096 for VGG-Face)."""
        first = next(m for m in self.face_decoder.f_dec.modules() if isinstance(m, nn.Linear))
        return first.in_features

    @property
    def num_identities(self) -> int | None:
        return None if self.classifier is None else self.classifier.out_features

    def predict_features(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """Voice encoder: ``(B, 2, T, 257)`` compressed spectrograms -> ``(B, D)`` face features."""
        if self.voice_encoder is None:
            raise WeightsError(None, "this model has no voice encoder "
                                     "(a stage-1, decoder-only bundle)")
        return self._finite(self.voice_encoder(spectrogram), "voice encoder")

    def decode(self, features: torch.Tensor):
        """Face decoder: ``(B, D)`` features -> ``DecodedFace(image, texture, landmarks)``."""
        decoded = self.face_decoder(features)
        for part in (decoded.landmarks, decoded.texture, decoded.image):
            if part is not None:
                self._finite(part, "face decoder")
        return decoded

    def _finite(self, output: torch.Tensor, part: str) -> torch.Tensor:
        """``output``, or a :class:`WeightsError` where it is not finite: weights that are
        finite but so large that they overflow (the bundle's checks let any finite value
        through) gave black faces, a report's traceback and the web page's error 500."""
        if not bool(torch.isfinite(output).all()):
            raise WeightsError(getattr(self, "source", None),
                               f"the {part} gives values that are not finite (NaN or "
                               "infinity): its weights are damaged or far too large")
        return output

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Identity logits ``(B, K)`` of ``(B, D)`` features."""
        if self.classifier is None:
            raise WeightsError(None, "this model has no identity classifier")
        return self.classifier(features)

    def forward(self, spectrogram: torch.Tensor):
        """Speech to face: ``(B, 2, T, 257)`` -> ``DecodedFace`` (image ``(B, 3, H, W)``)."""
        return self.decode(self.predict_features(spectrogram))

    def bundle_config(self) -> dict:
        """The ``config.json`` of this model's bundle."""
        return {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "face_encoder": self.face_encoder_name,
            "feature_dim": self.feature_dim,
            "num_identities": self.num_identities,
            "voice_encoder": None if self.voice_encoder is None
            else config_to_dict(self.voice_encoder.config),
            "face_decoder": config_to_dict(self.face_decoder.config),
        }


def state_dict_for_safetensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` on the CPU, contiguous and unshared, as safetensors wants it."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def write_bundle_files(folder: Path, config: dict | None, state: dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` (when given) and ``model.safetensors`` into ``folder``, atomically."""
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        with atomic_write(folder / CONFIG_NAME, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    with atomic_write(folder / WEIGHTS_NAME) as f:
        f.write(save(state, metadata={"format": "pt"}))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` onto ``final``, replacing an older one."""
    old = None
    if final.exists():
        old = temp_dir_beside(final, "old-")
        os.replace(final, old / final.name)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def replacing_dir(final: Path):
    """A new folder beside ``final`` to fill in the ``with`` block: it then replaces
    ``final`` (:func:`replace_dir`); after an error it is deleted and ``final`` is left
    as it was. A crash leaves the old folder or the new one, never a mix."""
    return publishing_dir(final, replace_dir)


def save_model(model: Speech2Face, path: str | os.PathLike) -> Path:
    """Write ``model`` as a bundle directory at ``path`` (replacing an older bundle there).

    The directory is assembled under a temporary name beside ``path`` and renamed into
    place, so a crash leaves the old bundle or the new one, never a mix. A file at
    ``path``, or a folder holding anything but a bundle, is refused (WeightsError): the
    replacement would delete it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WeightsError(path, "is a file: a model bundle is a folder; choose another path")
    if path.is_dir() and not (path / CONFIG_NAME).is_file() and any(path.iterdir()):
        raise WeightsError(path, "is a folder that holds no model bundle: saving there would "
                                 "delete what it holds; choose another path")
    with replacing_dir(path) as tmp:
        write_bundle_files(tmp, model.bundle_config(), state_dict_for_safetensors(model))
    return path


def find_bundle(path_or_name: str | os.PathLike) -> Path:
    """The bundle directory for a bundle path, a training run (``RUN/model``) or a cached name."""
    if not isinstance(path_or_name, (str, os.PathLike)) or os.fspath(path_or_name) in ("", b""):
        # (Path("") is the current folder, which the error would then have named)
        raise WeightsError(None, f"a model is a bundle's path or an installed model's name, "
                                 f"got {path_or_name!r:.60}")
    path = Path(path_or_name)
    candidates = [path, path / RUN_MODEL_DIR]
    if not path.exists() and not path.is_absolute() and len(path.parts) == 1:
        candidates += [cache_dir() / "models" / path.name]
    for candidate in candidates:
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    if not path.exists():
        raise WeightsError(path, "no such model bundle or training run")
    from speech2face.checkpoints import checkpoint_dirs

    if checkpoints := checkpoint_dirs(path):  # a run still training (or stopped early)
        raise WeightsError(path, f"a training run without its final model yet (no "
                                 f"{RUN_MODEL_DIR}/); its newest checkpoint loads: "
                                 f"{checkpoints[-1][1]}")
    installed = cache_dir() / "models" / path.name
    hint = (f"; the installed model of that name is {installed}"
            if len(path.parts) == 1 and (installed / CONFIG_NAME).is_file() else "")
    raise WeightsError(path, f"not a model bundle (no {CONFIG_NAME}) nor a training run "
                             f"(no {RUN_MODEL_DIR}/{CONFIG_NAME}){hint}")


def read_bundle_config(folder: Path) -> dict:
    """``config.json`` of a bundle, checked for format, version and sane sizes."""
    file = folder / CONFIG_NAME
    try:
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise WeightsError(file, f"too large for a bundle config "
                                     f"({file.stat().st_size} bytes)")
        config = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise WeightsError(file, f"cannot read the bundle config: {error}") from None
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        raise WeightsError(file, f"not a {BUNDLE_FORMAT} config")
    if not is_whole(config.get("version")) or config["version"] != BUNDLE_VERSION:  # not True
        raise WeightsError(file, f"bundle version {config.get('version')!r:.40} is not "
                                 f"supported (this code reads version {BUNDLE_VERSION!r})")
    unknown = sorted(set(config) - _BUNDLE_KEYS)
    if unknown:
        raise WeightsError(file, f"unknown key(s) {unknown[:3]} in a bundle config")
    check_bundle_config(config, file)
    return config


# ---- bounds on a bundle's config, checked before anything is built from it. They lie far
# above any real model (paper: 4096 features, 1000-wide code, 256 channels, 224 pixels,
# Table 1's 13 layers) and far below sizes that would exhaust memory: a downloaded model
# folder is not trusted. The weights file's header then fixes every size exactly.
MAX_CONFIG_BYTES = 1 << 20
_BUNDLE_KEYS = {"format", "version", "face_encoder", "feature_dim", "num_identities",
                "voice_encoder", "face_decoder"}  # Speech2Face.bundle_config's
MAX_WIDTH = 1 << 16  # features, code, hidden units, channels
MAX_IDENTITIES = 1 << 24  # VoxCeleb2 has 6,112; VGG-Face 2,622
MAX_LAYERS = 64
MAX_IMAGE_SIZE = 1024  # the decoder's output side S (paper 224)
MAX_KERNEL = 15
MAX_STRIDE = 8
MAX_VOICE_FRAMES = 6000  # the voice encoder's shortest input: 60 s (paper: 598 frames, 6 s)
# Elements of one clip's largest feature map: small weights can still ask for enormous
# activations (65,536 4x4 filters are 8 MB of weights but a 40-GB first feature map for
# 6 s). The paper's largest is 64 x 595 x 254 = 9.7 M (voice) and 32 x 224^2 = 1.6 M
# (decoder); this allows 14 times that, 512 MB of float32 per clip.
MAX_ACTIVATION = 1 << 27
MAX_WEIGHTS_BYTES = 8 << 30  # the paper's full model is about 0.82 GB (204.6 M float32)

# (field, kind, low, high) per config section; kind "int", "float" or "ints" (a list).
_DECODER_FIELDS = (
    ("feature_dim", "int", 1, MAX_WIDTH),
    ("code_dim", "int", 1, MAX_WIDTH),
    ("landmark_hidden", "ints", 1, MAX_WIDTH),
    ("texture_base_size", "int", 1, MAX_IMAGE_SIZE),
    ("texture_base_channels", "int", 1, MAX_WIDTH),
    ("texture_channels", "ints", 1, MAX_WIDTH),
    ("texture_kernel", "int", 1, MAX_KERNEL),
    ("warp_order", "int", 1, 4),
    ("warp_regularization", "float", 0.0, 1e6),
    ("warp_boundary_points", "int", 0, 16),
)
_VOICE_FIELDS = (
    ("n_freq", "int", 1, MAX_WIDTH),
    ("fc_dim", "int", 1, MAX_WIDTH),
    ("output_dim", "int", 1, MAX_WIDTH),
    ("bn_momentum", "float", 0.0, 1.0),
)

_RESEMBLYZER_FIELDS = (
    ("output_dim", "int", 1, MAX_WIDTH),
    ("hidden_dims", "ints", 1, MAX_WIDTH),
    ("n_freq", "int", 1, MAX_WIDTH),
)


def _check_number(value, kind: str, low, high, where: str, file: Path) -> None:
    if not (is_whole if kind == "int" else is_number)(value, low, high):
        what = "a whole number" if kind == "int" else "a number"
        raise WeightsError(file, f"{where} must be {what} from {low} to {high}, got {value!r:.40}")


def _check_fields(section, fields, name: str, file: Path) -> None:
    if not isinstance(section, dict):
        raise WeightsError(file, f"{name} must be a JSON object")
    for field, kind, low, high in fields:
        if field not in section:
            continue  # the dataclass default applies
        value = section[field]
        if kind == "ints":
            if not isinstance(value, list) or len(value) > MAX_LAYERS:
                raise WeightsError(file, f"{name}.{field} must be a list of at most "
                                         f"{MAX_LAYERS} whole numbers")
            for i, item in enumerate(value):
                _check_number(item, "int", low, high, f"{name}.{field}[{i}]", file)
        else:
            _check_number(value, kind, low, high, f"{name}.{field}", file)


def check_bundle_config(config: dict, file: Path) -> None:
    """Refuse a bundle config with sizes of the wrong type or out of bounds (one line).

    Runs before any module is built, so that a config edited to enormous sizes fails at
    once instead of allocating them; :func:`check_bundle_weights` then holds the sizes to
    the weights file.
    """
    from speech2face.audio import N_FRAMES, N_FREQ
    from speech2face.face_decoder import FaceDecoderConfig
    from speech2face.voice_encoder import KERNEL, POOL, VoiceEncoderConfig

    if config.get("face_encoder") not in FACE_ENCODERS:
        raise WeightsError(file, f"face_encoder must be one of {list(FACE_ENCODERS)}, "
                                 f"got {config.get('face_encoder')!r:.40}")
    _check_number(config.get("feature_dim"), "int", 1, MAX_WIDTH, "feature_dim", file)
    if config.get("num_identities") is not None:
        _check_number(config["num_identities"], "int", 1, MAX_IDENTITIES, "num_identities", file)
    decoder = config.get("face_decoder")
    _check_fields(decoder, _DECODER_FIELDS, "face_decoder", file)
    decoder = config_from_dict(FaceDecoderConfig, decoder, file)
    if decoder.texture_kernel % 2 == 0:
        # Only odd kernels double the side exactly (padding k // 2, output padding 1).
        raise WeightsError(file, f"face_decoder.texture_kernel must be odd, "
                                 f"got {decoder.texture_kernel}")
    if decoder.image_size > MAX_IMAGE_SIZE:
        raise WeightsError(file, f"face_decoder makes {decoder.image_size}-pixel images "
                                 f"(texture_base_size x 2^{len(decoder.texture_channels)}); "
                                 f"at most {MAX_IMAGE_SIZE} are allowed")
    side = decoder.texture_base_size
    for channels in decoder.texture_channels:
        side *= 2
        _check_activation(channels * side * side, "face_decoder.texture_channels", file)
    voice = config.get("voice_encoder")
    if voice is None:
        return
    if isinstance(voice, dict) and voice.get("kind") == "resemblyzer":  # the baseline
        _check_fields(voice, _RESEMBLYZER_FIELDS, "voice_encoder", file)
        if voice.get("n_freq", N_FREQ) != N_FREQ:
            raise WeightsError(file, f"voice_encoder.n_freq must be {N_FREQ}")
        return
    _check_fields(voice, _VOICE_FIELDS, "voice_encoder", file)
    layers = voice.get("layers", [])
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        raise WeightsError(file, f"voice_encoder.layers must be a list of 1 to {MAX_LAYERS} "
                                 f"layers")
    for i, layer in enumerate(layers):
        where = f"voice_encoder.layers[{i}]"
        if layer == POOL:
            continue
        if not isinstance(layer, list) or len(layer) != 2:
            raise WeightsError(file, f"{where} must be {POOL!r} or [channels, stride], "
                                     f"got {layer!r:.40}")
        _check_number(layer[0], "int", 1, MAX_WIDTH, f"{where} channels", file)
        _check_number(layer[1], "int", 1, MAX_STRIDE, f"{where} stride", file)
    if layers[-1] == POOL:
        raise WeightsError(file, "voice_encoder.layers must end with a convolution")
    voice = config_from_dict(VoiceEncoderConfig, voice, file)
    if voice.n_freq != N_FREQ:
        raise WeightsError(file, f"voice_encoder.n_freq must be {N_FREQ} (the spectrogram's "
                                 f"frequency bins), got {voice.n_freq}")
    if voice.output_shape(voice.min_frames())[1] < 1:
        raise WeightsError(file, "voice_encoder.layers leave no frequency bins")
    t, f = N_FRAMES, voice.n_freq
    for i, layer in enumerate(voice.layers):
        if layer == POOL:
            t //= 2
            continue
        t, f = (t - KERNEL) // layer[1] + 1, (f - KERNEL) // layer[1] + 1
        _check_activation(layer[0] * max(t, 1) * max(f, 1), f"voice_encoder.layers[{i}]", file)
    if voice.min_frames() > MAX_VOICE_FRAMES:
        raise WeightsError(file, f"voice_encoder.layers need {voice.min_frames()} input "
                                 f"frames; at most {MAX_VOICE_FRAMES} are allowed")


def _check_activation(elements: int, where: str, file: Path) -> None:
    if elements > MAX_ACTIVATION:
        raise WeightsError(file, f"{where} make a feature map of {elements:,} values per "
                                 f"clip; at most {MAX_ACTIVATION:,} are allowed")


def weights_digest(module: nn.Module) -> str:
    """A digest of a module's weights and buffers (names and values): what a saved
    partial result must have been computed with to be resumed."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy())  # no copy of its bytes
    return digest.hexdigest()


def read_safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a safetensors file, read from its header only.

    The safetensors library checks that the header's tensors exactly cover the file, so
    the sizes here are backed by bytes on disk, and nothing is loaded.
    """
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise WeightsError(file, "missing weights file")
    if file.stat().st_size > MAX_WEIGHTS_BYTES:
        raise WeightsError(file, f"{file.stat().st_size / 2**30:.1f} GB is larger than any "
                                 f"Speech2Face model (at most {MAX_WEIGHTS_BYTES >> 30} GB)")
    try:
        with safe_open(file, framework="pt") as f:
            return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()))
                    for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise WeightsError(file, f"not a readable safetensors file ({error})") from None


def read_safetensors(file: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing or damaged file is a :class:`WeightsError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise WeightsError(file, "missing weights file")
    try:
        return load_file(file, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise WeightsError(file, f"not a readable safetensors file ({error})") from None


def _mismatch(own: dict[str, tuple], given: dict[str, tuple]) -> str | None:
    """What differs between two ``{name: shape}`` maps, in one line, or None."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong = sorted(k for k in set(own) & set(given) if tuple(own[k]) != tuple(given[k]))
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            parts.append(f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}")
    return "; ".join(parts) or None


def check_finite(state: dict[str, torch.Tensor], file: Path) -> None:
    """Refuse weights holding NaN or infinity, or values a float32 model cannot hold
    (a float64 1e300 becomes infinity when loaded): they would only fail later,
    obscurely, or give black faces."""
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        if problem := float_type_problem(tensor):
            raise WeightsError(file, f"tensor {name} {problem}")
        if not bool(torch.isfinite(tensor).all()):
            raise WeightsError(file, f"tensor {name} holds NaN or infinite values")
        if tensor.numel() and float(tensor.abs().max()) > FLOAT32_MAX:
            raise WeightsError(file, f"tensor {name} holds values beyond float32's range")


def load_state_checked(module: nn.Module, state: dict[str, torch.Tensor], file: Path,
                       same_dtype: bool = False) -> None:
    """``module.load_state_dict(state)``, strict; a one-line :class:`WeightsError` on mismatch
    or on NaN/infinite weights. ``same_dtype``: each tensor must have the module's dtype
    (a checkpoint, which a resumed run must continue exactly: float16 weights loaded into
    a float32 model would round every weight); a bundle may hold another float type."""
    own = module.state_dict()
    problem = _mismatch({k: v.shape for k, v in own.items()},
                        {k: v.shape for k, v in state.items()})
    if problem:
        raise WeightsError(file, "weights do not match the config: " + problem)
    for name, tensor in state.items():
        if tensor.is_floating_point() != own[name].is_floating_point() \
                or tensor.dtype == torch.bool or (same_dtype and tensor.dtype != own[name].dtype):
            raise WeightsError(file, f"tensor {name} is {tensor.dtype}, this model's is "
                                     f"{own[name].dtype}")
    check_finite(state, file)
    for name, tensor in state.items():  # statistics whose sign the model's arithmetic needs
        last = name.rpartition(".")[2]
        if last == "running_var" and bool((tensor < 0).any()):
            raise WeightsError(file, f"tensor {name} holds negative variances")
        if last == "scale" and name.endswith(("f_dec.scale", "output_standardization.scale")) \
                and bool((tensor <= 0).any()):
            raise WeightsError(file, f"tensor {name} must be positive, got {tensor.min():.3g}")
        # The mean face's landmarks lie in the aligned crop (x 1e6 drew them 4e7 px away).
        if last == "mean_landmarks" and bool((tensor.abs() > 2 * CROP_SIZE).any()):
            raise WeightsError(file, f"tensor {name} holds points outside the {CROP_SIZE}-px "
                                     f"face crop (up to {tensor.abs().max():.3g})")
    module.load_state_dict(state)


def _paper_voice_encoder(config: TrainConfig, feature_dim: int) -> nn.Module:
    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    sizes = VoiceEncoderConfig.tiny if config.preset == "tiny" else VoiceEncoderConfig.paper
    return VoiceEncoder(sizes(feature_dim))


def _resemblyzer_voice_encoder(config: TrainConfig, feature_dim: int) -> nn.Module:
    from speech2face.resemblyzer_encoder import ResemblyzerEncoder, ResemblyzerEncoderConfig

    return ResemblyzerEncoder(ResemblyzerEncoderConfig(output_dim=feature_dim,
                                                       standardize_output=True))


# config.encoder -> builder(config, feature_dim) of the stage-2 voice encoder: spectrogram
# (B, 2, T, 257) in, (B, feature_dim) face feature out. Register a new encoder here (and
# its bundle config's "kind" in _voice_encoder_from_config, so that its bundles load).
VOICE_ENCODERS: dict[str, Callable[[TrainConfig, int], nn.Module]] = {
    "paper": _paper_voice_encoder,
    "resemblyzer": _resemblyzer_voice_encoder,
}


def build_voice_encoder(config: TrainConfig, feature_dim: int) -> nn.Module:
    """A fresh voice encoder of the kind ``config.encoder`` names (``config.preset`` size),
    predicting ``feature_dim``-D features: what stage 2 trains."""
    builder = VOICE_ENCODERS.get(config.encoder)
    if builder is None:
        raise ConfigError(None, f"encoder: unknown voice encoder {config.encoder!r}; known: "
                                f"{', '.join(sorted(VOICE_ENCODERS))}")
    return builder(config, feature_dim)


def _voice_encoder_from_config(data, file: Path | None) -> nn.Module:
    """The voice encoder a bundle's config describes: the paper's, or the baseline by kind."""
    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    if isinstance(data, dict) and data.get("kind") == "resemblyzer":
        from speech2face.resemblyzer_encoder import ResemblyzerEncoder, ResemblyzerEncoderConfig

        # Its pretrained weights are in the bundle's state: nothing else is read.
        return ResemblyzerEncoder(config_from_dict(ResemblyzerEncoderConfig, data, file),
                                  pretrained=False)
    return VoiceEncoder(config_from_dict(VoiceEncoderConfig, data, file))


def build_model(config: dict, state: dict[str, torch.Tensor] | None = None,
                file: Path | None = None) -> Speech2Face:
    """A :class:`Speech2Face` with the architecture of a bundle ``config`` (weights not loaded).

    Build it under ``torch.device("meta")`` to learn its tensor shapes without allocating.
    """
    from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig

    decoder_config = config_from_dict(FaceDecoderConfig, config.get("face_decoder"), file)
    # The decoder is built from the saved mean landmarks (not zeros) in case it derives
    # anything from them at construction; the buffer is then loaded again with the rest.
    mean = [v for k, v in (state or {}).items()
            if k.startswith("face_decoder.") and k.endswith("mean_landmarks")]
    mean_landmarks = mean[0].float() if len(mean) == 1 else torch.zeros(68, 2)
    try:
        face_decoder = FaceDecoder(decoder_config, mean_landmarks)
        voice_encoder = None
        if config.get("voice_encoder") is not None:
            voice_encoder = _voice_encoder_from_config(config["voice_encoder"], file)
        classifier = None
        if config.get("num_identities"):
            classifier = nn.Linear(int(config["feature_dim"]), int(config["num_identities"]))
        return Speech2Face(face_decoder, voice_encoder, classifier, str(config.get("face_encoder")))
    except ValueError as error:
        raise WeightsError(file, str(error)) from None


def check_bundle_weights(config: dict, file: Path, config_file: Path | None = None) -> None:
    """Hold a (bounds-checked) bundle ``config`` to the tensor names and shapes in the header
    of its weights ``file``, building the model on the meta device (no memory)."""
    header = read_safetensors_header(file)
    with torch.device("meta"):
        skeleton = build_model(config, None, config_file)
    own = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    problem = _mismatch(own, {k: shape for k, (_, shape) in header.items()})
    if problem:
        raise WeightsError(file, "weights do not match the config: " + problem)


def check_device(device) -> None:
    """A ConfigError naming ``device`` unless it is a torch device this machine has."""
    problem = device_problem(device)
    if problem:
        raise ConfigError(None, f"device: {problem}")


@contextlib.contextmanager
def borrowed(model: nn.Module, device) -> Iterator[nn.Module]:
    """A caller's model on ``device`` for a while, in eval mode; its mode and device are
    restored afterwards, whatever happens (the library does not move or switch a model
    it was handed)."""
    check_device(device)
    training = model.training
    devices = {p.device for p in model.parameters()}
    try:
        yield model.to(device).eval()
    finally:
        model.train(training)
        if len(devices) == 1:
            model.to(devices.pop())


def load_model(path_or_name: str | os.PathLike, device: str | torch.device = "cpu") -> Speech2Face:
    """Load a model bundle, in eval mode, on ``device``.

    Args:
        path_or_name: a bundle directory, a training run directory (its ``model``
            bundle is used), or the name of a bundle under ``~/.cache/speech2face/models``.
        device: where to put the weights.

    Nothing is unpickled: the config is JSON and the weights are safetensors.
    """
    check_device(device)
    folder = find_bundle(path_or_name)
    config = read_bundle_config(folder)
    file = folder / WEIGHTS_NAME
    check_bundle_weights(config, file, folder / CONFIG_NAME)
    state = read_safetensors(file)
    model = build_model(config, state, folder / CONFIG_NAME)
    load_state_checked(model, state, file)
    model.source = str(folder)  # where it came from, for messages and reports
    return model.to(device).eval()
