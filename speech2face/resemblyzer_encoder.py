"""A baseline voice encoder: Resemblyzer's pretrained speaker embedding and a small MLP.

Does the paper's voice encoder (Table 1, 148 M parameters at full size) earn its size?
The baseline answers with a speaker-verification network that was trained on other
data for another task, Resemblyzer's GE2E encoder (Wan et al. 2018; 3-layer LSTM over
40 mel bands, 256-D unit-length embedding, weights shipped inside the ``resemblyzer``
wheel), kept frozen, followed by a small MLP trained with the same loss, data and face
features as the paper's encoder. It is selected in training as ``encoder=resemblyzer``
and evaluated by the same report.

Input and output are those of :class:`speech2face.voice_encoder.VoiceEncoder`:
``(B, 2, T, 257)`` power-law compressed spectrograms in, ``(B, output_dim)`` face
features out, so training, evaluation and inference treat both alike. Resemblyzer wants
a mel spectrogram of the waveform; it is derived here from the spectrogram, batched on
the model's device, rather than by decoding every clip a second time with librosa:

1. undo the power law, inverse-FFT each 512-point frame back to its 400 windowed
   samples, and take their 400-point power spectrum, which is exactly the frame
   librosa computes for Resemblyzer (same periodic Hann window, 10 ms hop; our frames
   start 2.5 ms later, as ``center=False`` frames do);
2. scale each clip to -30 dBFS unless it is louder (Resemblyzer's ``normalize_volume``
   with ``increase_only``), the loudness measured from the frames (Parseval);
3. 40 Slaney mel bands (librosa's default filterbank); split into 1.6-s partials every
   0.77 s, embed each, average, renormalise (``VoiceEncoder.embed_utterance``).

Resemblyzer's silence trimming (webrtcvad) is left out: the clips are speech already.
tests/test_resemblyzer_encoder.py checks the result against Resemblyzer's own pipeline.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from speech2face.audio import HOP_LENGTH, N_FFT, N_FREQ, POWER_LAW, SAMPLE_RATE, WIN_LENGTH
from speech2face.errors import WeightsError
from speech2face.voice_encoder import OutputStandardization

KIND = "resemblyzer"  # the voice-encoder choice in training configs and bundles

# Resemblyzer 0.1.4's hyper-parameters (resemblyzer/hparams.py) and its weights file.
RESEMBLYZER_VERSION = "0.1.4"
WEIGHTS_FILE = "pretrained.pt"
WEIGHTS_SHA256 = "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"
MEL_CHANNELS = 40
LSTM_HIDDEN = 256
LSTM_LAYERS = 3
EMBEDDING_DIM = 256
PARTIAL_FRAMES = 160  # 1.6 s per partial utterance
PARTIAL_RATE = 1.3  # partials per second (embed_utterance's default)
PARTIAL_STEP = round(SAMPLE_RATE / PARTIAL_RATE / HOP_LENGTH)  # 77 frames
MIN_COVERAGE = 0.75  # a last partial less covered by audio than this is dropped
TARGET_DBFS = -30.0  # loudness every clip is raised to
FMAX = SAMPLE_RATE / 2


@dataclass(frozen=True)
class ResemblyzerEncoderConfig:
    """Sizes of the baseline. Only the MLP is trained; the speaker network is fixed."""

    # Which voice encoder this is, so a bundle can be rebuilt from its config.
    kind: str = KIND
    # Output = face feature size; follows the face encoder (dlib 128, VGG-Face 4096).
    output_dim: int = 128
    # Hidden widths of the MLP on the 256-D speaker embedding (one layer: a small head).
    hidden_dims: tuple = (512,)
    # Frequency bins of the input spectrogram (512-point FFT -> 257).
    n_freq: int = N_FREQ
    # Predict in the training features' standardised coordinates, as the paper's encoder
    # (voice_encoder.OutputStandardization; training turns it on); False in older bundles.
    standardize_output: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ResemblyzerEncoderConfig:
        d = dict(d)
        if d.get("kind", KIND) != KIND:
            raise ValueError(f"not a {KIND} voice encoder config: kind {d.get('kind')!r}")
        d["hidden_dims"] = tuple(d.get("hidden_dims", (512,)))
        return cls(**d)

    def min_frames(self) -> int:
        """Spectrogram frames needed (one frame: the LSTM takes any length)."""
        return 1


def mel_filterbank(n_fft: int = WIN_LENGTH, n_mels: int = MEL_CHANNELS,
                   sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Slaney-style mel filterbank, area-normalised: ``(n_mels, n_fft // 2 + 1)``.

    The filters of ``librosa.filters.mel(sr, n_fft, n_mels)`` with its defaults (Slaney
    mel scale, ``norm="slaney"``), which Resemblyzer's mel spectrogram uses; written out
    because librosa is not a runtime dependency (tests compare the two).
    """
    def hz_to_mel(f):
        f = torch.as_tensor(f, dtype=torch.float64)
        linear = f / (200.0 / 3)
        log_part = 15.0 + torch.log(torch.clamp(f, min=1000.0) / 1000.0) / (math.log(6.4) / 27)
        return torch.where(f >= 1000.0, log_part, linear)

    def mel_to_hz(m):
        linear = m * (200.0 / 3)
        log_part = 1000.0 * torch.exp((math.log(6.4) / 27) * (m - 15.0))
        return torch.where(m >= 15.0, log_part, linear)

    fft_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mel_points = mel_to_hz(torch.linspace(float(hz_to_mel(0.0)), float(hz_to_mel(FMAX)),
                                          n_mels + 2, dtype=torch.float64))
    widths = mel_points[1:] - mel_points[:-1]
    ramps = mel_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)
    weights *= (2.0 / (mel_points[2:] - mel_points[:-2]))[:, None]
    return weights.float()


def partial_starts(n_frames: int) -> list[int]:
    """First frames of the 1.6-s partials of an utterance of ``n_frames`` frames.

    Resemblyzer's ``compute_partial_slices`` (rate 1.3/s, coverage 0.75), counting
    frames as it does from the number of samples those frames span.
    """
    n_samples = (n_frames - 1) * HOP_LENGTH + WIN_LENGTH
    frames = math.ceil((n_samples + 1) / HOP_LENGTH)
    starts = list(range(0, max(1, frames - PARTIAL_FRAMES + PARTIAL_STEP + 1), PARTIAL_STEP))
    coverage = (n_samples - starts[-1] * HOP_LENGTH) / (PARTIAL_FRAMES * HOP_LENGTH)
    if coverage < MIN_COVERAGE and len(starts) > 1:
        starts = starts[:-1]
    return starts


class SpeakerEmbedding(nn.Module):
    """Resemblyzer's network: mel frames ``(B, T, 40)`` -> unit embedding ``(B, 256)``."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(MEL_CHANNELS, LSTM_HIDDEN, LSTM_LAYERS, batch_first=True)
        self.linear = nn.Linear(LSTM_HIDDEN, EMBEDDING_DIM)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        raw = torch.relu(self.linear(hidden[-1]))
        return raw / torch.norm(raw, dim=1, keepdim=True).clamp_min(1e-12)


def resemblyzer_weights_path() -> Path:
    """``pretrained.pt`` inside the installed ``resemblyzer`` package (not imported: its
    ``__init__`` loads librosa and webrtcvad, which the weights do not need)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(None, f"the resemblyzer baseline needs Resemblyzer's weights: pip "
                                 f"install --no-deps resemblyzer=={RESEMBLYZER_VERSION}")
    return Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE


def load_speaker_weights(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Resemblyzer's LSTM and linear weights, checked against their SHA-256.

    ``torch.load(weights_only=True)`` reads tensors and plain containers only (no code
    runs); a bundle of a trained baseline holds these weights as safetensors, so this
    file is read only when a new baseline is built.
    """
    path = Path(path) if path is not None else resemblyzer_weights_path()
    return dict(_read_speaker_weights(path.resolve()))


@functools.lru_cache(maxsize=2)
def _read_speaker_weights(path: Path) -> dict[str, torch.Tensor]:
    # Read, hashed and parsed once per process (17 MB); load_state_dict copies the tensors.
    try:
        data = path.read_bytes()
    except OSError as error:
        raise WeightsError(path, f"cannot read Resemblyzer's weights ({error.strerror})") from None
    if hashlib.sha256(data).hexdigest() != WEIGHTS_SHA256:
        raise WeightsError(path, f"not Resemblyzer {RESEMBLYZER_VERSION}'s {WEIGHTS_FILE} "
                                 "(SHA-256 differs)")
    import io

    checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    wanted = SpeakerEmbedding().state_dict().keys()
    return {k: checkpoint["model_state"][k] for k in wanted}


class ResemblyzerEncoder(nn.Module):
    """``(B, 2, T, 257)`` spectrogram -> ``(B, output_dim)`` face feature, via Resemblyzer.

    Args:
        config: sizes (``output_dim`` = face feature size).
        pretrained: load Resemblyzer's weights (False builds the layout only, for
            loading a saved bundle, whose state holds them).
    """

    def __init__(self, config: ResemblyzerEncoderConfig | None = None, pretrained: bool = True):
        super().__init__()
        self.config = config = config or ResemblyzerEncoderConfig()
        self.speaker = SpeakerEmbedding()
        if pretrained:
            self.speaker.load_state_dict(load_speaker_weights())
        self.speaker.requires_grad_(False)  # a fixed, pretrained front end
        # A constant, computed on the CPU even when the model is sized on the meta device
        # (model.check_bundle_weights), where its .item() calls cannot run.
        with torch.device("cpu"):
            mel_basis = mel_filterbank()
        self.register_buffer("mel_basis", mel_basis, persistent=False)
        self.register_buffer("window_energy", torch.hann_window(WIN_LENGTH).pow(2).sum(),
                             persistent=False)
        widths = (EMBEDDING_DIM, *config.hidden_dims)
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.mlp = nn.Sequential(*layers, nn.Linear(widths[-1], config.output_dim))
        self.output_standardization = (OutputStandardization(config.output_dim)
                                       if config.standardize_output else None)

    def mels(self, spec: torch.Tensor) -> torch.Tensor:
        """``(B, 2, T, 257)`` compressed spectrogram -> ``(B, T, 40)`` mel power frames."""
        x = spec.float()
        x = torch.sign(x) * x.abs().pow(1.0 / POWER_LAW)  # undo sign(x)|x|^0.3
        stft = torch.complex(x[:, 0], x[:, 1])  # (B, T, 257)
        frames = torch.fft.irfft(stft, n=N_FFT, dim=-1)[..., :WIN_LENGTH]  # windowed samples
        power = torch.fft.rfft(frames, n=WIN_LENGTH, dim=-1).abs().pow(2)  # (B, T, 201)
        # Mean square of the clip from its frames (Parseval), then Resemblyzer's gain.
        mean_square = frames.pow(2).sum(-1).mean(-1) / self.window_energy
        dbfs = 10 * torch.log10(mean_square.clamp_min(1e-20))
        gain = torch.pow(10.0, (TARGET_DBFS - dbfs).clamp_min(0.0) / 10)  # on power
        return (power @ self.mel_basis.T) * gain[:, None, None]

    def embed(self, spec: torch.Tensor) -> torch.Tensor:
        """``(B, 2, T, 257)`` -> Resemblyzer's unit speaker embedding ``(B, 256)``."""
        if spec.dim() != 4 or spec.shape[1] != 2 or spec.shape[3] != self.config.n_freq:
            raise ValueError(f"voice encoder expects (B, 2, T, {self.config.n_freq}) "
                             f"spectrograms, got {tuple(spec.shape)}")
        with torch.no_grad():
            mels = self.mels(spec)
            batch, n_frames = mels.shape[:2]
            starts = partial_starts(n_frames)
            padded = torch.nn.functional.pad(
                mels, (0, 0, 0, max(0, starts[-1] + PARTIAL_FRAMES - n_frames)))
            partials = torch.stack([padded[:, s:s + PARTIAL_FRAMES] for s in starts], 1)
            embeds = self.speaker(partials.flatten(0, 1)).view(batch, len(starts), -1)
            mean = embeds.mean(1)
            return mean / torch.norm(mean, dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """``(B, 2, T, 257)`` -> ``(B, output_dim)``; only the MLP has gradients."""
        out = self.mlp(self.embed(spec))
        return out if self.output_standardization is None else self.output_standardization(out)

    def train(self, mode: bool = True):
        super().train(mode)
        self.speaker.eval()  # fixed weights: never in training mode
        return self
