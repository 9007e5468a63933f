"""The face decoder of Cole et al. (CVPR 2017): face feature -> frontal, neutral face.

Speech2Face (Oh et al., section 3.3) reuses it frozen. A feature ``(B, D)`` goes through

- ``f_dec``: FC -> 1000, ReLU (the layer the voice-encoder loss compares, paper eq. 1);
- a landmark MLP from that code to 68 x 2 coordinates, predicted as an offset from the
  mean landmarks ``L_bar`` (so an untrained decoder already outputs a plausible face
  shape);
- a texture branch: FC -> 14 x 14 x 256, ReLU, four 5x5 stride-2 transposed convolutions
  (128, 64, 32, 32 channels, ReLU between) -> 224 x 224 x 32, and a 1x1 convolution to
  RGB, squashed to [0, 1]. The texture is *registered*: the face in ``L_bar``'s geometry;
- rendering: the texture warped from ``L_bar`` to the predicted landmarks with the
  differentiable :func:`speech2face.warp.sparse_image_warp` (order 1, regularisation 0.1,
  2 boundary points, as in the original code).

Landmarks are always (x, y) pixels in the 224-pixel crop frame (``faces.CROP_SIZE``),
whatever the output size ``S`` of the preset; the warp runs at ``S`` in (row, col).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from speech2face.faces import CROP_SIZE
from speech2face.warp import sparse_image_warp

N_LANDMARKS = 68  # iBUG 300-W points

# Cole et al. section 3: the first layer, FC -> 1000 + ReLU (f_dec of Speech2Face eq. 1).
CODE_DIM = 1000
# Cole et al. section 3.1: texture decoder starts at 14 x 14 x 256 and doubles four times
# with 5x5 stride-2 transposed convolutions, channels max(256 / 2^i, 32).
TEXTURE_BASE_SIZE = 14
TEXTURE_BASE_CHANNELS = 256
TEXTURE_CHANNELS = (128, 64, 32, 32)
TEXTURE_KERNEL = 5

# The warp of the original code (TensorFlow's sparse_image_warp arguments).
WARP_ORDER = 1
WARP_REGULARIZATION = 0.1
WARP_BOUNDARY_POINTS = 2

# Predicted landmark offsets are the network output times this many pixels (224 frame):
# a unit output is a 10% move, which keeps the last layer's outputs O(1) under Adam.
LANDMARK_OFFSET_SCALE = 0.1 * CROP_SIZE


@dataclass(frozen=True)
class FaceDecoderConfig:
    """Face decoder sizes: ``paper()`` is Cole et al., ``tiny()`` is for tests and CPU demos."""

    # Input face feature size; follows the face encoder (VGG-Face fc7 4096, dlib 128).
    feature_dim: int = 4096
    # Width of f_dec, the first FC layer (Cole et al.: 1000).
    code_dim: int = CODE_DIM
    # Hidden widths of the landmark MLP ("a shallow MLP with ReLUs"; width is a decision).
    landmark_hidden: tuple = (CODE_DIM,)
    # Texture branch: spatial size and channels of the FC output, then the channels of
    # each 5x5 stride-2 transposed convolution; the output side is base * 2^len(channels).
    texture_base_size: int = TEXTURE_BASE_SIZE
    texture_base_channels: int = TEXTURE_BASE_CHANNELS
    texture_channels: tuple = TEXTURE_CHANNELS
    texture_kernel: int = TEXTURE_KERNEL
    # Rendering warp (TensorFlow sparse_image_warp arguments of the original code).
    warp_order: int = WARP_ORDER
    warp_regularization: float = WARP_REGULARIZATION
    warp_boundary_points: int = WARP_BOUNDARY_POINTS
    # Standardise the input feature before f_dec with the training features' mean and
    # spread (buffers set by stage 1, FeatureCode.set_standardization). False in bundles
    # made before it existed, which then load unchanged.
    standardize_input: bool = False

    @classmethod
    def paper(cls, feature_dim: int = 4096) -> FaceDecoderConfig:
        return cls(feature_dim=feature_dim, standardize_input=True)

    @classmethod
    def tiny(cls, feature_dim: int = 128) -> FaceDecoderConfig:
        # 4 * 2^4 = 64-pixel output: enough to see a face, fast enough for a CPU demo. The
        # texture's last two layers are 32 and 16 wide: at 16 and 8 the demo's decoder
        # drew every held-out face with the same beige lips and chin, and the gender
        # classifier read 59 % of the women as men (docs/results.md).
        return cls(feature_dim=feature_dim, code_dim=256, landmark_hidden=(128,),
                   texture_base_size=4, texture_base_channels=64,
                   texture_channels=(64, 32, 32, 16), standardize_input=True)

    @property
    def image_size(self) -> int:
        """Side of the output texture and image, ``S`` (paper: 14 * 2^4 = 224)."""
        return self.texture_base_size * 2 ** len(self.texture_channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["landmark_hidden"] = list(self.landmark_hidden)
        d["texture_channels"] = list(self.texture_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FaceDecoderConfig:
        d = dict(d)
        d["landmark_hidden"] = tuple(d["landmark_hidden"])
        d["texture_channels"] = tuple(d["texture_channels"])
        return cls(**d)


class DecodedFace(NamedTuple):
    """Output of :class:`FaceDecoder`.

    ``image`` and ``texture``: ``(B, 3, S, S)`` in [0, 1] (``image`` is None when the
    decoder was asked not to render it); ``landmarks``: ``(B, 68, 2)`` (x, y) pixels in the
    224 crop frame. All three are float32 under autocast too (the
    decoder's layers run in the autocast dtype, its outputs and rendering do not): the
    losses and the warp then see the precision they were written for.
    """

    image: torch.Tensor | None
    texture: torch.Tensor
    landmarks: torch.Tensor


class FeatureCode(nn.Sequential):
    """``f_dec``: FC -> ``code_dim``, ReLU (Cole et al.), optionally on the standardised feature.

    With ``standardize=True`` the input is first mapped to ``(v - shift) / scale``, where
    ``shift`` is the training features' mean and ``scale`` their root-mean-square distance
    to it (one number: the geometry of the feature space is kept). Face features of
    different people differ by a small part of their length (dlib's on the demo corpus:
    about 20 degrees apart, around a mean 1.4 long), so raw, the FC layer sees mostly the
    common part and learns what tells faces apart slowly; standardised, each unit starts
    sensitive to the differences. It is an affine change of f_dec's input, so f_dec is
    still an FC + ReLU of the feature (the voice-encoder loss compares its output, eq. 1).
    """

    def __init__(self, feature_dim: int, code_dim: int, standardize: bool = False):
        super().__init__(nn.Linear(feature_dim, code_dim), nn.ReLU())
        self.standardize = standardize
        if standardize:
            self.register_buffer("shift", torch.zeros(feature_dim))
            self.register_buffer("scale", torch.ones(()))

    @torch.no_grad()
    def set_standardization(self, features: torch.Tensor) -> None:
        """Set ``shift`` and ``scale`` from ``(N, D)`` training features."""
        if not self.standardize:
            raise ValueError("this f_dec was built without input standardisation")
        features = torch.as_tensor(features, dtype=torch.float64)
        self.shift.copy_(features.mean(dim=0))
        self.scale.fill_(max(feature_spread(features), 1e-12))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            features = (features - self.shift.to(features.dtype)) / self.scale.to(features.dtype)
        return super().forward(features)


def feature_spread(features) -> float:
    """The root-mean-square distance of ``(N, D)`` features to their mean (float64)."""
    features = torch.as_tensor(features, dtype=torch.float64)
    return float((features - features.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt())


def crop_to_grid(points: torch.Tensor, size: int, crop_size: int = CROP_SIZE) -> torch.Tensor:
    """(x, y) pixels in the ``crop_size`` frame -> (row, col) pixels on a ``size`` grid.

    Pixel centres map to pixel centres (the convention of an ``align_corners=False``
    resize), so registering at 224 and then resizing agrees with registering at ``size``.
    """
    scale = size / crop_size
    return ((points + 0.5) * scale - 0.5).flip(-1)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 input: rendering never runs in half precision."""
    return torch.promote_types(tensor.dtype, torch.float32) if tensor.is_floating_point() \
        else torch.float32


def _warp(images: torch.Tensor, source: torch.Tensor, dest: torch.Tensor,
          config: FaceDecoderConfig) -> torch.Tensor:
    """The decoder's warp of ``(B, 3, S, S)`` images; points ``(B, 68, 2)`` (row, col) on S."""
    warped, _ = sparse_image_warp(
        images, source, dest,
        interpolation_order=config.warp_order,
        regularization_weight=config.warp_regularization,
        num_boundary_points=config.warp_boundary_points)
    return warped


def render(texture: torch.Tensor, landmarks: torch.Tensor, mean_landmarks: torch.Tensor,
           config: FaceDecoderConfig | None = None) -> torch.Tensor:
    """Warp registered textures from the mean landmarks to ``landmarks``: the rendered face.

    Args:
        texture: ``(B, 3, S, S)`` registered textures (face in the mean geometry).
        landmarks: ``(B, 68, 2)`` (x, y) target landmarks in the 224 crop frame.
        mean_landmarks: ``(68, 2)`` (x, y) mean landmarks in the 224 crop frame.
        config: warp settings (default: the paper's).

    Returns:
        ``(B, 3, S, S)``, float32 (float64 for a float64 texture), computed without
        autocast whatever its state.
    """
    size = texture.shape[-1]
    with torch.autocast(texture.device.type, enabled=False):
        # Landmarks in float32 whatever the texture's dtype: bf16 would round a point
        # near 224 to a multiple of 1 pixel.
        texture = texture.to(_compute_dtype(texture))
        landmarks = torch.as_tensor(landmarks, device=texture.device)
        mean_landmarks = torch.as_tensor(mean_landmarks, device=texture.device)
        dest = crop_to_grid(landmarks.to(texture.dtype), size)
        source = crop_to_grid(mean_landmarks.to(dest), size).expand_as(dest)
        return _warp(texture, source, dest, config or FaceDecoderConfig())


def register_texture(images: torch.Tensor, landmarks: torch.Tensor, mean_landmarks: torch.Tensor,
                     size: int | None = None,
                     config: FaceDecoderConfig | None = None) -> torch.Tensor:
    """The decoder's texture target: each face warped from its own landmarks to the mean ones.

    Args:
        images: ``(B, 3, H, H)`` in [0, 1], face crops (normally 224, ``CROP_SIZE``).
        landmarks: ``(B, 68, 2)`` (x, y) pixels of each face in its crop (the H frame).
        mean_landmarks: ``(68, 2)`` (x, y) mean landmarks in the 224 crop frame (tensor or
            array, e.g. ``faces.mean_landmarks(...)``).
        size: output side ``S`` (default: H); the image is resized first (antialiased)
            and the warp runs at ``S``.
        config: warp settings (default: the paper's, order 1, regularisation 0.1, 2
            boundary points, the same as the decoder's rendering).

    Returns:
        ``(B, 3, S, S)`` registered textures in [0, 1], float32 (float64 for float64
        images; uint8 or half images are converted), computed without autocast.
    """
    landmarks = torch.as_tensor(landmarks, device=images.device)
    mean_landmarks = torch.as_tensor(mean_landmarks, device=images.device)
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square RGB (B, 3, H, H), got {tuple(images.shape)}")
    if landmarks.shape != (images.shape[0], N_LANDMARKS, 2):
        raise ValueError(f"landmarks must be (B, 68, 2), got {tuple(landmarks.shape)}")
    if mean_landmarks.shape != (N_LANDMARKS, 2):
        raise ValueError(f"mean_landmarks must be (68, 2), got {tuple(mean_landmarks.shape)}")
    frame = images.shape[-1]
    size = frame if size is None else int(size)
    # The stage-1 targets: computed in float32 even inside a training step's autocast.
    with torch.autocast(images.device.type, enabled=False):
        images = images.to(_compute_dtype(images))
        if size != frame:
            images = F.interpolate(images, size=(size, size), mode="bilinear",
                                   align_corners=False, antialias=True).clamp_(0, 1)
        source = crop_to_grid(landmarks.to(images.dtype), size, crop_size=frame)
        dest = crop_to_grid(mean_landmarks.to(images), size).expand_as(source)
        return _warp(images, source, dest, config or FaceDecoderConfig())


class FaceDecoder(nn.Module):
    """Face feature ``(B, D)`` -> :class:`DecodedFace` (Cole et al.; see the module docstring)."""

    def __init__(self, config: FaceDecoderConfig | None = None,
                 mean_landmarks: torch.Tensor | None = None):
        super().__init__()
        self.config = config = config or FaceDecoderConfig.paper()
        if mean_landmarks is None:
            raise ValueError("FaceDecoder needs the (68, 2) mean landmarks of the training faces")
        mean_landmarks = torch.as_tensor(mean_landmarks, dtype=torch.float32)
        if mean_landmarks.shape != (N_LANDMARKS, 2):
            raise ValueError(f"mean_landmarks must be (68, 2), got {tuple(mean_landmarks.shape)}")
        # A buffer, so that it is saved and loaded with the weights.
        self.register_buffer("mean_landmarks", mean_landmarks.clone())

        self.f_dec = FeatureCode(config.feature_dim, config.code_dim, config.standardize_input)

        layers: list[nn.Module] = []
        width = config.code_dim
        for hidden in config.landmark_hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        last = nn.Linear(width, N_LANDMARKS * 2)
        # Start at the mean face: zero offsets.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.landmarks = nn.Sequential(*layers, last)

        base, c0 = config.texture_base_size, config.texture_base_channels
        self.texture_fc = nn.Sequential(nn.Linear(config.code_dim, base * base * c0), nn.ReLU())
        k = config.texture_kernel
        ups: list[nn.Module] = []
        c_in = c0
        for c_out in config.texture_channels:
            # padding k//2 and output_padding 1 make each layer exactly double the side.
            ups += [nn.ConvTranspose2d(c_in, c_out, k, stride=2, padding=k // 2, output_padding=1),
                    nn.ReLU()]
            c_in = c_out
        self.texture_up = nn.Sequential(*ups)
        self.to_rgb = nn.Conv2d(c_in, 3, 1)

    def forward(self, features: torch.Tensor, render_image: bool = True) -> DecodedFace:
        """``(B, D)`` features -> image and texture ``(B, 3, S, S)``, landmarks ``(B, 68, 2)``.

        ``render_image=False`` leaves out the warp (``image`` is None): Cole et al.'s
        texture and landmark losses do not need it, and in the demo's decoder training it
        was a fifth of each step (bench_cache.py: 8 of 40.5 ms).
        """
        if features.dim() != 2 or features.shape[1] != self.config.feature_dim:
            raise ValueError(f"features must be (B, {self.config.feature_dim}), got "
                             f"{tuple(features.shape)}")
        code = self.f_dec(features)  # (B, code_dim)
        b = code.shape[0]
        offsets = self.landmarks(code).view(b, N_LANDMARKS, 2)
        # (B, 68, 2) x, y; float32 also under autocast (the buffer is float32).
        landmarks = self.mean_landmarks + LANDMARK_OFFSET_SCALE * offsets.float()

        base, c0 = self.config.texture_base_size, self.config.texture_base_channels
        x = self.texture_fc(code).view(b, c0, base, base)
        # Under autocast the layers above run in half precision; the outputs are float32
        # (the sigmoid too: bf16 keeps 3 significant digits, the loss compares pixels).
        texture = torch.sigmoid(self.to_rgb(self.texture_up(x)).float())  # (B, 3, S, S)

        image = (render(texture, landmarks, self.mean_landmarks, self.config)
                 if render_image else None)
        return DecodedFace(image=image, texture=texture, landmarks=landmarks)


__all__ = [
    "CROP_SIZE",
    "DecodedFace",
    "FaceDecoder",
    "FaceDecoderConfig",
    "FeatureCode",
    "crop_to_grid",
    "register_texture",
    "render",
]
