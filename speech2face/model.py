"""The model bundle: everything inference needs, in one directory, without pickles.

A bundle is a directory (docs/architecture.md, "Model bundle")::

    config.json         format, voice encoder and face decoder configs, face-encoder
                        name, feature size, number of identities
    model.safetensors   voice_encoder.*  (absent in a stage-1 bundle)
                        face_decoder.*   (including the mean-landmarks buffer)
                        classifier.*     (the identity classifier, when there is one)

Training writes one at ``RUN/model`` (and every checkpoint directory is one too);
:func:`load_model` reads either a bundle directory or a training run's directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from speech2face.errors import WeightsError
from speech2face.utils import atomic_write, cache_dir, temp_dir_beside

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
        return self.voice_encoder(spectrogram)

    def decode(self, features: torch.Tensor):
        """Face decoder: ``(B, D)`` features -> ``DecodedFace(image, texture, landmarks)``."""
        return self.face_decoder(features)

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


def save_model(model: Speech2Face, path: str | os.PathLike) -> Path:
    """Write ``model`` as a bundle directory at ``path`` (replacing an older bundle there).

    The directory is assembled under a temporary name beside ``path`` and renamed into
    place, so a crash leaves the old bundle or the new one, never a mix.
    """
    path = Path(path)
    tmp = temp_dir_beside(path)
    try:
        write_bundle_files(tmp, model.bundle_config(), state_dict_for_safetensors(model))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def find_bundle(path_or_name: str | os.PathLike) -> Path:
    """The bundle directory for a bundle path, a training run (``RUN/model``) or a cached name."""
    path = Path(path_or_name)
    candidates = [path, path / RUN_MODEL_DIR]
    if not path.exists() and not path.is_absolute() and len(path.parts) == 1:
        candidates += [cache_dir() / "models" / path.name]
    for candidate in candidates:
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    if not path.exists():
        raise WeightsError(path, "no such model bundle or training run")
    raise WeightsError(path, f"not a model bundle (no {CONFIG_NAME}) nor a training run "
                             f"(no {RUN_MODEL_DIR}/{CONFIG_NAME})")


def read_bundle_config(folder: Path) -> dict:
    """``config.json`` of a bundle, checked for format and version."""
    file = folder / CONFIG_NAME
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(file, f"cannot read the bundle config: {error}") from None
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        raise WeightsError(file, f"not a {BUNDLE_FORMAT} config")
    if config.get("version") != BUNDLE_VERSION:
        raise WeightsError(file, f"bundle version {config.get('version')} is not supported "
                                 f"(this code reads version {BUNDLE_VERSION})")
    return config


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


def load_state_checked(module: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """``module.load_state_dict(state)``, strict; a one-line :class:`WeightsError` on mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        labelled = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        for label, keys in labelled:
            if keys:
                parts.append(f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}")
        raise WeightsError(file, "weights do not match the config: " + "; ".join(parts))
    module.load_state_dict(state)


def _voice_encoder_from_config(data, file: Path | None) -> nn.Module:
    """The voice encoder a bundle's config describes: the paper's, or the baseline by kind."""
    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    if isinstance(data, dict) and data.get("kind") == "resemblyzer":
        from speech2face.resemblyzer_encoder import ResemblyzerEncoder, ResemblyzerEncoderConfig

        # Its pretrained weights are in the bundle's state: nothing else is read.
        return ResemblyzerEncoder(config_from_dict(ResemblyzerEncoderConfig, data, file),
                                  pretrained=False)
    return VoiceEncoder(config_from_dict(VoiceEncoderConfig, data, file))


def build_model(config: dict, state: dict[str, torch.Tensor],
                file: Path | None = None) -> Speech2Face:
    """A :class:`Speech2Face` with the architecture of a bundle ``config`` (weights not loaded)."""
    from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig

    decoder_config = config_from_dict(FaceDecoderConfig, config.get("face_decoder"), file)
    # The decoder is built from the saved mean landmarks (not zeros) in case it derives
    # anything from them at construction; the buffer is then loaded again with the rest.
    mean = [v for k, v in state.items()
            if k.startswith("face_decoder.") and k.endswith("mean_landmarks")]
    mean_landmarks = mean[0].float() if len(mean) == 1 else torch.zeros(68, 2)
    face_decoder = FaceDecoder(decoder_config, mean_landmarks)
    voice_encoder = None
    if config.get("voice_encoder") is not None:
        voice_encoder = _voice_encoder_from_config(config["voice_encoder"], file)
    classifier = None
    if config.get("num_identities"):
        classifier = nn.Linear(int(config["feature_dim"]), int(config["num_identities"]))
    try:
        return Speech2Face(face_decoder, voice_encoder, classifier, str(config.get("face_encoder")))
    except ValueError as error:
        raise WeightsError(file, str(error)) from None


def load_model(path_or_name: str | os.PathLike, device: str | torch.device = "cpu") -> Speech2Face:
    """Load a model bundle, in eval mode, on ``device``.

    Args:
        path_or_name: a bundle directory, a training run directory (its ``model``
            bundle is used), or the name of a bundle under ``~/.cache/speech2face/models``.
        device: where to put the weights.

    Nothing is unpickled: the config is JSON and the weights are safetensors.
    """
    folder = find_bundle(path_or_name)
    config = read_bundle_config(folder)
    file = folder / WEIGHTS_NAME
    state = read_safetensors(file)
    model = build_model(config, state, folder / CONFIG_NAME)
    load_state_checked(model, state, file)
    model.source = str(folder)  # where it came from, for messages and reports
    return model.to(device).eval()
