"""The voice encoder of paper Table 1: compressed complex spectrogram -> face feature.

The architecture is written as data (``VoiceEncoderConfig.layers``) plus a small
builder, like torchvision's VGG. Input ``(B, 2, T, 257)`` (T = time, 598 for 6 s),
treated as a 2-channel image with time as height and frequency as width. All
convolutions are 4x4 and unpadded; each block is Conv -> ReLU -> BatchNorm; max-pools
are 2x1 and pool time only. The last convolution has no ReLU/BN: its output is
averaged over all remaining time steps, then ReLU and BatchNorm, then two
fully-connected layers map the ``channels x frequency`` vector to the face feature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from speech2face.audio import N_FREQ, frames_seconds

KERNEL = 4  # all convolutions are 4x4 (Table 1)
POOL = "M"  # a 2x1 max-pool over time (Table 1)

# Table 1: (out_channels, stride) per convolution; "M" pools time by 2.
PAPER_LAYERS = (
    (64, 1), (64, 1), (128, 1), POOL, (128, 1), POOL, (128, 1), POOL,
    (256, 1), POOL, (512, 1), (512, 2), (512, 2),
)  # fmt: skip
TINY_LAYERS = (
    (8, 1), (8, 1), (16, 1), POOL, (16, 1), POOL, (16, 1), POOL,
    (32, 1), POOL, (32, 1), (32, 2), (32, 2),
)  # fmt: skip


@dataclass(frozen=True)
class VoiceEncoderConfig:
    """Sizes of the voice encoder. ``paper()`` is Table 1; ``tiny()`` is for tests and CPU demos."""

    # Convolutions as (out_channels, stride) and "M" for a 2x1 time max-pool (Table 1).
    layers: tuple = PAPER_LAYERS
    # Frequency bins of the input spectrogram (512-point FFT -> 257).
    n_freq: int = N_FREQ
    # Width of the hidden fully-connected layer (Table 1: 4096).
    fc_dim: int = 4096
    # Output = face feature size; follows the face encoder (VGG-Face fc7 4096, dlib 128).
    output_dim: int = 4096
    # BatchNorm momentum (PyTorch convention); 0.1 is the usual default.
    bn_momentum: float = 0.1
    # Predict in the training features' standardised coordinates (OutputStandardization).
    # False in bundles made before it existed, which then load unchanged.
    standardize_output: bool = False

    @classmethod
    def paper(cls, output_dim: int = 4096) -> VoiceEncoderConfig:
        return cls(layers=PAPER_LAYERS, fc_dim=4096, output_dim=output_dim,
                   standardize_output=True)

    @classmethod
    def tiny(cls, output_dim: int = 128) -> VoiceEncoderConfig:
        return cls(layers=TINY_LAYERS, fc_dim=256, output_dim=output_dim,
                   standardize_output=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [list(x) if isinstance(x, tuple) else x for x in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VoiceEncoderConfig:
        d = dict(d)
        d["layers"] = tuple(tuple(x) if isinstance(x, list) else x for x in d["layers"])
        return cls(**d)

    # ---- derived sizes
    def _convs(self) -> list:
        return [x for x in self.layers if x != POOL]

    def output_shape(self, n_frames: int) -> tuple[int, int]:
        """(time, frequency) after the last convolution for ``n_frames`` input frames."""
        t, f = n_frames, self.n_freq
        for item in self.layers:
            if item == POOL:
                t //= 2
            else:
                _, stride = item
                t = (t - KERNEL) // stride + 1
                f = (f - KERNEL) // stride + 1
        return t, f

    def min_frames(self) -> int:
        """Fewest input frames that leave at least one time step after the last conv."""
        t = 1
        for item in reversed(self.layers):
            t = 2 * t if item == POOL else (t - 1) * item[1] + KERNEL
        return t

    @property
    def flat_dim(self) -> int:
        """Input size of the first FC layer: channels x frequency (Table 1: 512 x 57)."""
        return self._convs()[-1][0] * self.output_shape(self.min_frames())[1]


class OutputStandardization(nn.Module):
    """The voice encoder's last step: ``shift + scale / sqrt(D) * y``.

    ``shift`` and ``scale`` are the training face features' mean and root-mean-square
    distance to it, copied from the face decoder's :class:`~speech2face.face_decoder.FeatureCode`
    when stage 2 starts (:meth:`copy_from`). The network then predicts a face's offset
    from the mean in units of the features' spread, which is what the data vary in: face
    features of different people differ by a small part of their length (dlib's on the
    demo corpus: about 20 degrees apart around a mean 1.4 long). Unscaled, one Adam step
    of the last layer (``lr`` per weight, over hundreds of inputs) moves the prediction
    farther than the whole spread of the faces, and the encoder starts far from every
    face. Until set (and in a model whose decoder has no statistics) it is the identity.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.tensor(float(dim) ** 0.5))

    @torch.no_grad()
    def copy_from(self, f_dec: nn.Module) -> bool:
        """Take ``f_dec``'s statistics if it has them (a standardising FeatureCode)."""
        if not getattr(f_dec, "standardize", False):
            return False
        self.shift.copy_(f_dec.shift)
        self.scale.copy_(f_dec.scale)
        return True

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.shift + (self.scale / self.shift.shape[0] ** 0.5) * y


class ConvBlock(nn.Sequential):
    """4x4 valid convolution, then ReLU and BatchNorm (Table 1's order), unless ``bare``."""

    def __init__(self, c_in: int, c_out: int, stride: int, bare: bool, momentum: float):
        layers = [nn.Conv2d(c_in, c_out, KERNEL, stride=stride)]
        if not bare:
            layers += [nn.ReLU(inplace=True), nn.BatchNorm2d(c_out, momentum=momentum)]
        super().__init__(*layers)


class VoiceEncoder(nn.Module):
    """Table 1: ``(B, 2, T, n_freq)`` spectrogram -> ``(B, output_dim)`` face feature."""

    def __init__(self, config: VoiceEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or VoiceEncoderConfig.paper()
        convs = config._convs()
        blocks, c_in = [], 2
        for i, item in enumerate(config.layers):
            if item == POOL:
                blocks.append(nn.MaxPool2d(kernel_size=(2, 1)))
                continue
            c_out, stride = item
            last = i == len(config.layers) - 1
            blocks.append(ConvBlock(c_in, c_out, stride, bare=last, momentum=config.bn_momentum))
            c_in = c_out
        if config.layers[-1] == POOL:
            raise ValueError("the layer list must end with a convolution")
        self.features = nn.Sequential(*blocks)
        self.pool_norm = nn.BatchNorm1d(convs[-1][0], momentum=config.bn_momentum)
        self.fc = nn.Sequential(
            nn.Linear(config.flat_dim, config.fc_dim),
            nn.ReLU(inplace=True),
            nn.Linear(config.fc_dim, config.output_dim),
        )
        self.output_standardization = (OutputStandardization(config.output_dim)
                                       if config.standardize_output else None)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """``(B, 2, T, F)`` -> ``(B, output_dim)``; T >= ``config.min_frames()``."""
        if spec.dim() != 4 or spec.shape[1] != 2 or spec.shape[3] != self.config.n_freq:
            raise ValueError(
                f"voice encoder expects (B, 2, T, {self.config.n_freq}) spectrograms, "
                f"got {tuple(spec.shape)}"
            )
        if spec.shape[2] < self.config.min_frames():
            need = self.config.min_frames()
            raise ValueError(
                f"input has {spec.shape[2]} frames; the voice encoder needs at least {need} "
                f"(about {frames_seconds(need):.2f} s of audio)"
            )
        # Channels-last lets oneDNN (CPU) and cuDNN pick their fastest convolutions: about
        # 1.35x the NCHW speed on CPU (bench/bench_voice_encoder.py).
        x = spec.contiguous(memory_format=torch.channels_last)
        if x.shape[0] == 1 and x.stride(0) != x[0].numel():
            # One clip's spectrogram given a batch dimension (``spec[None]``) keeps a batch
            # stride of 2, which torch counts as channels-last but oneDNN does not: its
            # convolutions took 1.4x as long (1.15 against 0.82 s, the paper encoder).
            x = x.clone(memory_format=torch.channels_last)
        x = self.features(x)  # (B, C, T', F')
        x = x.mean(dim=2)  # average over all time: (B, C, F')
        x = self.pool_norm(torch.relu(x))  # BatchNorm over channels
        x = self.fc(x.flatten(1))  # (B, C * F') -> (B, output_dim)
        return x if self.output_standardization is None else self.output_standardization(x)
