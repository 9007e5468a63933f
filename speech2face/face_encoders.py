"""Face encoders: aligned face crop in, face feature v_f out (docs/faces.md).

One interface, :class:`FaceEncoder`, with two implementations:

- ``"dlib"``: dlib's 128-D face recognition ResNet (weights from ``face-recognition-models``;
  the offline default). Not differentiable, no identity classifier: train one with
  :func:`train_identity_classifier` to stand in for VGG-Face fc8 (docs/faces.md).
- ``"vggface"``: VGG-Face (Parkhi et al. 2015; VGG-16 layout), the paper's encoder: the
  feature is fc7 after ReLU (4096-D), the classifier is fc8 (2622 identities). Loads
  weights the user supplies in either public format: the PyTorch conversion
  ``vgg_face_dag.pth`` or keras-vggface's ``rcmalli_vggface_tf_vgg16.h5``.

Crops are uint8 ``(B, 224, 224, 3)`` RGB (array or list of arrays), as
:func:`speech2face.faces.align_face` cuts them, or float tensors ``(B, 3, H, W)`` in [0, 1].
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from speech2face.errors import WeightsError
from speech2face.face_resnet import DESCRIPTOR_DIM as DLIB_FEATURE_DIM
from speech2face.faces import FACE_ENCODERS as ENCODERS
from speech2face.utils import float_type_problem

# VGG-Face = VGG-16 "D" (Parkhi et al. 2015, Table 3): conv widths, "M" = 2x2 max pool.
VGG_FACE_LAYERS = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)
VGG_FACE_FC_DIM = 4096  # fc6, fc7; the paper's face feature is fc7 after ReLU (section 3)
VGG_FACE_IDENTITIES = 2622  # fc8: the VGG-Face training identities
VGG_FACE_INPUT_SIZE = 224
# Input normalisation of each weight format (RGB order, pixel values 0..255, std 1).
# vgg_face_dag.pth: its ``meta["mean"]``.
DAG_MEAN_RGB = (129.186279296875, 104.76238250732422, 93.59396362304688)
# keras-vggface "version 1" preprocessing: BGR input minus (93.5940, 104.7624, 129.1863);
# the same values rounded, written here in RGB order.
KERAS_MEAN_RGB = (129.1863, 104.7624, 93.5940)
# Names that load_face_encoder("vggface") looks for in utils.cache_dir() when no
# weights are given (nothing is downloaded).
VGG_FACE_FILES = ("vgg_face_dag.pth", "rcmalli_vggface_tf_vgg16.h5")


# ---------------------------------------------------------------------------- inputs


def crops_to_uint8(crops) -> np.ndarray:
    """Crops as one C-contiguous uint8 array ``(B, H, W, 3)``.

    crops: uint8 ``(B, H, W, 3)`` / ``(H, W, 3)`` array, a list of ``(H, W, 3)`` arrays,
    or a float tensor ``(B, 3, H, W)`` in [0, 1].
    """
    if isinstance(crops, torch.Tensor):
        if crops.dtype == torch.uint8:
            array = crops.cpu().numpy()
        else:
            _check_float_batch(crops)
            array = (crops.detach().clamp(0, 1) * 255).round().to(torch.uint8)
            array = array.permute(0, 2, 3, 1).cpu().numpy()
    elif isinstance(crops, (list, tuple)):
        array = (
            np.stack([np.asarray(c) for c in crops])
            if len(crops)
            else np.zeros((0, 1, 1, 3), np.uint8)
        )
    else:
        array = np.asarray(crops)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[3] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected uint8 crops (B, H, W, 3), got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def crops_to_float(crops, device=None) -> torch.Tensor:
    """Crops as a float32 tensor ``(B, 3, H, W)`` in [0, 1] (float tensors pass through)."""
    if isinstance(crops, torch.Tensor) and crops.is_floating_point():
        _check_float_batch(crops)
        return crops if device is None else crops.to(device)
    array = crops_to_uint8(crops)
    tensor = torch.from_numpy(array).to(device).permute(0, 3, 1, 2)
    return tensor.float() / 255.0


def _check_float_batch(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a float tensor (B, 3, H, W) in [0, 1], got {tuple(x.shape)}")


# ---------------------------------------------------------------------------- interface


class FaceEncoder(nn.Module):
    """A face encoder: ``embed(crops) -> (B, feature_dim)`` float32.

    Attributes: ``name``; ``feature_dim``; ``classifier`` (an ``nn.Module`` mapping
    features to identity logits, or None); ``differentiable`` (gradients flow from the
    feature to float tensor input).
    """

    name: str = ""
    feature_dim: int = 0
    differentiable: bool = False

    @property
    def classifier(self) -> nn.Module | None:
        return None

    def embed(self, crops) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, crops) -> torch.Tensor:
        return self.embed(crops)


class DlibFaceEncoder(FaceEncoder):
    """dlib's 128-D face recognition ResNet on aligned crops (not differentiable).

    On a crop from :func:`speech2face.faces.align_face` the face is where the crop
    geometry put it (:func:`speech2face.faces.aligned_face_box`), so the 68-point shape
    predictor runs in that box and no detector is needed; dlib then cuts its own 150 x 150
    chip from those points and runs the network, batched. (68 rather than 5 points: the
    result is then within about 0.06 of dlib's own pipeline on the original photograph,
    against 0.1-0.17 with the 5-point predictor; dlib's same-person threshold is 0.6.)
    """

    name = "dlib"
    feature_dim = DLIB_FEATURE_DIM
    differentiable = False

    def embed(self, crops) -> torch.Tensor:
        """crops: uint8 (B, H, W, 3) aligned crops or float (B, 3, H, W) in [0, 1] -> (B, 128)."""
        from speech2face.faces import face_descriptors

        device = crops.device if isinstance(crops, torch.Tensor) else None
        return torch.from_numpy(face_descriptors(crops_to_uint8(crops))).to(device)


# ---------------------------------------------------------------------------- VGG-Face


@dataclass(frozen=True)
class VGGFaceConfig:
    """Sizes of a VGG-Face network; ``paper()`` is VGG-Face itself."""

    layers: tuple = VGG_FACE_LAYERS  # conv widths and "M" pools, in order
    fc_dim: int = VGG_FACE_FC_DIM  # fc6 and fc7 width = the face feature size
    num_identities: int = VGG_FACE_IDENTITIES  # fc8 width
    input_size: int = VGG_FACE_INPUT_SIZE  # crops are resized to this before the network

    @classmethod
    def paper(cls) -> VGGFaceConfig:
        return cls()

    @classmethod
    def tiny(cls) -> VGGFaceConfig:
        """Same layout and layer names at a fraction of the width, for tests."""
        layers = tuple(v if v == "M" else max(4, v // 16) for v in VGG_FACE_LAYERS)
        return cls(layers=layers, fc_dim=32, num_identities=10)

    @property
    def pool5_channels(self) -> int:
        return [v for v in self.layers if v != "M"][-1]

    @property
    def pool5_size(self) -> int:
        return self.input_size // 2 ** self.layers.count("M")  # 224 / 32 = 7


def vgg_layer_names(layers) -> list[str]:
    """VGG-Face names of the conv layers: conv1_1, conv1_2, conv2_1, ... (blocks end at "M")."""
    names, block, index = [], 1, 1
    for v in layers:
        if v == "M":
            block, index = block + 1, 1
        else:
            names.append(f"conv{block}_{index}")
            index += 1
    return names


def make_vgg_layers(layers) -> nn.Sequential:
    """torchvision-style builder: 3x3 conv (padding 1) + ReLU per width, 2x2 max pool per "M"."""
    modules, in_channels, block, index = OrderedDict(), 3, 1, 1
    for v in layers:
        if v == "M":
            modules[f"pool{block}"] = nn.MaxPool2d(kernel_size=2, stride=2)
            block, index = block + 1, 1
        else:
            modules[f"conv{block}_{index}"] = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            modules[f"relu{block}_{index}"] = nn.ReLU(inplace=True)
            in_channels, index = v, index + 1
    return nn.Sequential(modules)


class VGGFace(nn.Module):
    """VGG-Face: (B, 3, H, W) float in [0, 1], RGB -> fc7 features / fc8 logits.

    The input is resized to ``config.input_size`` (224), scaled to 0..255 and the
    format's mean pixel subtracted (buffer ``mean``, RGB). Dropout is left out: the
    network is only used frozen, for inference and as a perceptual loss.
    """

    def __init__(self, config: VGGFaceConfig = VGGFaceConfig(), mean_rgb=DAG_MEAN_RGB):
        super().__init__()
        self.config = config
        self.features = make_vgg_layers(config.layers)
        flat = config.pool5_channels * config.pool5_size**2  # 512 * 7 * 7 = 25088
        self.fc6 = nn.Linear(flat, config.fc_dim)
        self.fc7 = nn.Linear(config.fc_dim, config.fc_dim)
        self.fc8 = nn.Linear(config.fc_dim, config.num_identities)
        self.register_buffer("mean", torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, 224, 224) in the network's input range."""
        size = self.config.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        return x * 255.0 - self.mean

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """fc7 after ReLU: (B, fc_dim)."""
        x = self.features(self.preprocess(x))  # (B, 512, 7, 7)
        x = torch.flatten(x, 1)  # channel-major (C, H, W), as vgg_face_dag.pth expects
        x = F.relu(self.fc6(x))
        return F.relu(self.fc7(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc8 identity logits: (B, num_identities)."""
        return self.fc8(self.forward_features(x))


class VGGFaceEncoder(FaceEncoder):
    """VGG-Face as a face encoder: feature fc7 after ReLU, classifier fc8; differentiable.

    Float tensor input keeps the graph (for perceptual losses); array input runs without
    gradients. The network is in eval mode with ``requires_grad`` off for its weights.
    """

    name = "vggface"
    differentiable = True

    def __init__(self, network: VGGFace):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.feature_dim = network.config.fc_dim

    @property
    def classifier(self) -> nn.Module:
        return self.network.fc8

    def embed(self, crops) -> torch.Tensor:
        """crops: float (B, 3, H, W) in [0, 1] or uint8 (B, H, W, 3) -> (B, fc_dim)."""
        device = self.network.mean.device
        if isinstance(crops, torch.Tensor) and crops.is_floating_point():
            return self.network.forward_features(crops_to_float(crops, device))
        with torch.no_grad():
            return self.network.forward_features(crops_to_float(crops, device))

    def train(self, mode: bool = True):
        # Frozen encoder: stays in eval mode even inside a module being trained.
        return super().train(False)


def random_vggface(config: VGGFaceConfig = VGGFaceConfig(), seed: int = 0) -> VGGFace:
    """A VGG-Face with random (He-initialised, seeded) weights, for tests and smoke runs."""
    network = VGGFace(config)
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            nn.init.zeros_(module.bias)
    return network


def vggface_weight_shapes(config: VGGFaceConfig) -> dict[str, tuple[int, ...]]:
    """Expected tensors in ``vgg_face_dag.pth`` naming: ``conv1_1.weight`` ... ``fc8.bias``."""
    shapes, in_channels = {}, 3
    widths = [v for v in config.layers if v != "M"]
    for name, width in zip(vgg_layer_names(config.layers), widths, strict=True):
        shapes[f"{name}.weight"] = (width, in_channels, 3, 3)
        shapes[f"{name}.bias"] = (width,)
        in_channels = width
    flat = config.pool5_channels * config.pool5_size**2
    for name, (n_in, n_out) in {
        "fc6": (flat, config.fc_dim),
        "fc7": (config.fc_dim, config.fc_dim),
        "fc8": (config.fc_dim, config.num_identities),
    }.items():
        shapes[f"{name}.weight"] = (n_out, n_in)
        shapes[f"{name}.bias"] = (n_out,)
    return shapes


def _state_dict_from_dag(tensors: dict, config: VGGFaceConfig, path) -> dict[str, torch.Tensor]:
    """Check ``vgg_face_dag`` tensors against ``config``; rename them to VGGFace's keys."""
    expected = vggface_weight_shapes(config)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise WeightsError(
            path,
            f"not VGG-Face weights: missing {len(missing)} of {len(expected)} tensors "
            f"(first: {', '.join(missing[:3])})",
        )
    state = {}
    for key, shape in expected.items():
        value = tensors[key]
        if not isinstance(value, torch.Tensor):  # (a pickle-free torch.load gives any data)
            try:
                array = np.asarray(value)
            except ValueError:  # ragged lists
                array = None
            if array is None or array.dtype.kind not in "fiu":
                raise WeightsError(path, f"{key} is not a tensor ({type(value).__name__})")
            value = torch.as_tensor(array)
        if (value.is_floating_point() or value.is_complex()) and \
                (problem := float_type_problem(value)):
            raise WeightsError(path, f"{key} {problem}")
        if key == "fc6.weight" and value.ndim == 4:  # fc6 stored as a 7x7 convolution
            value = value.reshape(value.shape[0], -1)
        if tuple(value.shape) != shape:
            raise WeightsError(path, f"{key} has shape {tuple(value.shape)}, expected {shape}")
        if not torch.isfinite(value).all():
            raise WeightsError(path, f"{key} has NaN or infinite values")
        layer, kind = key.rsplit(".", 1)
        prefix = "features." if layer.startswith("conv") else ""
        state[f"{prefix}{layer}.{kind}"] = value.float()
    return state


def _load_problem(error: Exception) -> str:
    """The gist of a ``torch.load`` failure in a few words: torch's messages run to
    several lines of advice (set ``weights_only=False``, file an issue) that do not apply
    to a weights file we refuse to unpickle."""
    text = str(error).strip()
    if "Weights only load failed" in text:
        return "it holds Python objects besides tensors (they are never unpickled)"
    first = text.splitlines()[0] if text else type(error).__name__
    return first.split(". ")[0][:160]


def load_vggface_dag(path, config: VGGFaceConfig = VGGFaceConfig()) -> VGGFace:
    """VGG-Face from ``vgg_face_dag.pth`` (keys ``conv1_1.weight`` ... ``fc8.bias``) or the
    same tensors in a ``.safetensors`` file. Input normalisation: its RGB mean, std 1."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            with open(path, "rb") as f:
                head = f.read(2)
            if head != b"PK" and head[:1] != b"\x80":  # torch.save's zip, or a bare pickle
                raise WeightsError(path, "not a PyTorch weights file (neither the zip archive "
                                         "torch.save writes nor a pickle)")
            with warnings.catch_warnings():
                # torch warns about pickle protocols of files it may then refuse; the
                # outcome is reported below, in one line.
                warnings.simplefilter("ignore")
                tensors = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as error:  # noqa: BLE001 - torch/safetensors raise many types for bad files
        raise WeightsError(
            path, f"cannot read PyTorch weights (truncated or not a weights file): "
                  f"{_load_problem(error)}"
        ) from None
    if (
        isinstance(tensors, dict)
        and "state_dict" in tensors
        and isinstance(tensors["state_dict"], dict)
    ):
        tensors = tensors["state_dict"]
    if not isinstance(tensors, dict):
        raise WeightsError(path, f"expected a dict of tensors, got {type(tensors).__name__}")
    network = VGGFace(config, mean_rgb=DAG_MEAN_RGB)
    network.load_state_dict(_state_dict_from_dag(tensors, config, path), strict=False)
    return network


def load_vggface_keras(path, config: VGGFaceConfig = VGGFaceConfig()) -> VGGFace:
    """VGG-Face from keras-vggface's ``rcmalli_vggface_tf_vgg16.h5`` (TensorFlow layout).

    Keras stores conv kernels as (kh, kw, in, out), dense kernels as (in, out), and fc6's
    input is pool5 flattened in NHWC order (h, w, c); the first convolution reads BGR.
    All are permuted here so the network takes RGB in [0, 1] like the .pth version.
    """
    path = Path(path)
    try:
        import h5py
    except ImportError:
        raise WeightsError(
            path, "reading keras-vggface .h5 weights needs h5py: pip install h5py"
        ) from None
    layer_names = vgg_layer_names(config.layers) + ["fc6", "fc7", "fc8"]
    shapes = vggface_weight_shapes(config)
    tensors = {}
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f  # full model or weights only
            for layer in layer_names:
                if layer not in root:
                    raise WeightsError(path, f"not keras-vggface VGG16 weights: no layer {layer!r}")
                sizes = (math.prod(shapes[f"{layer}.weight"]), math.prod(shapes[f"{layer}.bias"]))
                kernel, bias = _keras_layer_arrays(root[layer], path, layer, sizes)
                tensors[f"{layer}.weight"], tensors[f"{layer}.bias"] = kernel, bias
    except WeightsError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as error:  # (TypeError: odd attributes)
        raise WeightsError(
            path, f"cannot read HDF5 weights (truncated or not HDF5): {error}"
        ) from None
    for layer in layer_names:
        kernel = tensors[f"{layer}.weight"]
        if layer.startswith("conv"):
            if kernel.ndim != 4:
                raise WeightsError(
                    path, f"{layer} kernel has shape {kernel.shape}, expected (3, 3, in, out)"
                )
            kernel = kernel.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
            if layer == "conv1_1":
                kernel = kernel[:, ::-1]  # BGR input -> RGB input
        elif layer == "fc6":
            side, channels = config.pool5_size, config.pool5_channels
            expected = (side * side * channels, config.fc_dim)
            if kernel.shape != expected:
                problem = f"fc6 kernel has shape {kernel.shape}, expected {expected}"
                raise WeightsError(path, problem)
            # rows index (h, w, c) in NHWC order; PyTorch flattens (c, h, w)
            kernel = (
                kernel.reshape(side, side, channels, -1)
                .transpose(3, 2, 0, 1)
                .reshape(config.fc_dim, -1)
            )
        else:
            if kernel.ndim != 2:
                raise WeightsError(
                    path, f"{layer} kernel has shape {kernel.shape}, expected (in, out)"
                )
            kernel = kernel.T
        tensors[f"{layer}.weight"] = torch.from_numpy(
            np.ascontiguousarray(kernel, dtype=np.float32)
        )
        tensors[f"{layer}.bias"] = torch.from_numpy(
            np.ascontiguousarray(tensors[f"{layer}.bias"], np.float32)
        )
    network = VGGFace(config, mean_rgb=KERAS_MEAN_RGB)
    network.load_state_dict(_state_dict_from_dag(tensors, config, path), strict=False)
    return network


def _keras_layer_arrays(group, path, layer, sizes: tuple[int, int]) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """(kernel, bias) arrays of one Keras layer group (``weight_names`` attribute or
    datasets), each checked to be numbers of its expected element count (``sizes``) before
    it is read: a 27-kB file can declare a 3.6-TiB dataset."""
    import h5py

    if not isinstance(group, h5py.Group):
        raise WeightsError(path, f"layer {layer!r} is not an HDF5 group of weights")
    if "weight_names" in group.attrs:
        names = [
            n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["weight_names"]
        ]
        arrays = [group[n] for n in names]
    else:
        arrays = []
        group.visititems(
            lambda _, item: arrays.append(item) if isinstance(item, h5py.Dataset) else None
        )
    kernels = [a for a in arrays if isinstance(a, h5py.Dataset) and a.ndim >= 2]
    biases = [a for a in arrays if isinstance(a, h5py.Dataset) and a.ndim == 1]
    if len(kernels) != 1 or len(biases) != 1:
        raise WeightsError(
            path, f"layer {layer!r} should hold one kernel and one bias, has {len(arrays)} arrays"
        )
    for name, array, size in (("kernel", kernels[0], sizes[0]), ("bias", biases[0], sizes[1])):
        if array.dtype.kind not in "fiu" or array.size != size:
            raise WeightsError(path, f"layer {layer!r} {name} holds {array.size} values of "
                                     f"{array.dtype}, expected {size} numbers")
    return np.asarray(kernels[0][()]), np.asarray(biases[0][()])


def _weights_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5", ".keras"):
        return "keras"
    if suffix in (".pth", ".pt", ".bin", ".safetensors"):
        return "dag"
    with open(path, "rb") as f:
        magic = f.read(8)
    return "keras" if magic == b"\x89HDF\r\n\x1a\n" else "dag"


def load_face_encoder(
    name: str,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    config: VGGFaceConfig | None = None,
    device: str | torch.device | None = None,
    option: str = "weights=PATH",
) -> FaceEncoder:
    """A face encoder by name: "dlib" or "vggface".

    weights: for "vggface", ``vgg_face_dag.pth`` (or its tensors as ``.safetensors``) or
        ``rcmalli_vggface_tf_vgg16.h5``; format from the suffix (or the HDF5 signature).
        Without it, the same names are looked for in ``utils.cache_dir()``; if none is
        there, "vggface" refuses unless ``random_init=True`` (seeded random weights, for
        tests). "dlib" uses the weights of ``face-recognition-models``.
    config: VGG-Face sizes (default ``VGGFaceConfig.paper()``; ``tiny()`` for tests).
    option: how the caller passes ``weights``, for the message when none is found (a
        command names its own option, e.g. ``--encoder-weights FILE``).
    Raises WeightsError for a missing, unreadable or mismatched weights file.
    """
    if name == "dlib":
        if weights is not None or random_init:
            raise ValueError("the dlib encoder uses the weights of face-recognition-models only")
        return DlibFaceEncoder()
    if name != "vggface":
        raise ValueError(f"unknown face encoder {name!r}; expected one of {ENCODERS}")
    config = config or VGGFaceConfig.paper()
    if weights is None and not random_init:
        from speech2face.utils import cache_dir

        found = [cache_dir() / f for f in VGG_FACE_FILES if (cache_dir() / f).is_file()]
        if not found:
            raise WeightsError(
                None,
                f"VGG-Face needs its weights, {' or '.join(VGG_FACE_FILES)}: give one with "
                f"{option}, or put one in {cache_dir()}",
            )
        weights = found[0]
    if weights is None:
        network = random_vggface(config)
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(path, "a folder, not a weights file" if path.is_dir() else
                               "not a regular file (a FIFO or a device)" if path.exists()
                               else "no such weights file")
        loader = load_vggface_keras if _weights_format(path) == "keras" else load_vggface_dag
        network = loader(path, config)
    return VGGFaceEncoder(network).to(device)


# ---------------------------------------------------------------------------- classifier

# The stand-in for VGG-Face fc8 (docs/faces.md): multinomial logistic regression on the training
# identities' face features, trained by minibatches (memory of one minibatch's logits, not
# N x K: VoxCeleb2 has 1.1 M clips of 6,000 identities) and then calibrated on held-out
# clips of the same identities, so that its probabilities behave like those of a
# softmax-trained fc8 (docs/training.md, "The identity classifier").
#
# L2 penalty on the weights (of the standardised features) against the *summed*
# cross-entropy of the fitting clips, i.e. scikit-learn's 1 / C: keeps the optimum finite
# when the identities are separable (they usually are), and the held-out temperature then
# decides how sharp the teacher is. Summed, not averaged: each identity's weights only see
# that identity's clips, so a penalty on the mean cross-entropy grows against each
# identity's evidence as identities multiply. With 1e-4 per mean (raw dlib features), the
# demo's 26 identities were fine, but 6,000 identities of 33 clips came out nearly uniform
# (held-out NLL 6.94 against ln 6000 = 8.70, after calibration); with the penalty on the
# sum, the balance per identity depends only on its own number of clips (about 7 in the
# demo, where 16 gives the same fit as the former 1e-4; 180 in VoxCeleb2).
CLASSIFIER_L2 = 16.0
# Passes over the features, and samples per minibatch (Adam, learning rate decaying
# linearly to 0; the penalised problem is convex). Small corpora get at least
# CLASSIFIER_MIN_STEPS steps (cheap there), which lands within ~1e-6 of the full-batch
# optimum on a 200-identity problem (tests/test_face_encoders.py compares).
CLASSIFIER_EPOCHS = 30
CLASSIFIER_BATCH = 1024
CLASSIFIER_LR = 3e-2
CLASSIFIER_MIN_STEPS = 2000
# Share of each identity's clips held out to choose the temperature (an identity with a
# single clip keeps it for fitting).
CLASSIFIER_HOLDOUT = 0.1
# Logits evaluated at once when calibrating: bounds the (rows, K) block in memory.
_CALIBRATION_ROWS = 4096


@dataclass
class IdentityClassifierFit:
    """What :func:`fit_identity_classifier` returns: the classifier and its calibration.

    ``linear`` already includes ``1 / temperature``: its softmax is the calibrated one.
    The NLLs are mean held-out negative log-likelihoods (nats) before and after the
    temperature; ``None`` without held-out clips.
    """

    linear: nn.Linear
    classes: np.ndarray
    temperature: float
    heldout_nll: float | None
    heldout_nll_uncalibrated: float | None
    heldout_accuracy: float | None
    train_accuracy: float
    heldout_samples: int


def _classifier_inputs(features, identity_ids) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """Features as a float32 tensor, the sorted class names and each sample's class index."""
    x = torch.as_tensor(
        np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features),
        dtype=torch.float32,
    )
    ids = np.asarray(identity_ids)
    if x.ndim != 2 or ids.ndim != 1 or len(ids) != len(x):
        raise ValueError(
            f"expected features (N, D) and identity_ids (N,), got {tuple(x.shape)} and {ids.shape}"
        )
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    classes, y = np.unique(ids, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 identities to train a classifier, got {len(classes)}")
    return x.contiguous(), classes, torch.as_tensor(y.reshape(-1), dtype=torch.long)


def heldout_split(labels: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """A boolean ``(N,)`` mask of held-out samples: about ``share`` of each class, drawn
    with ``seed``; every class keeps at least one sample for fitting."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(len(labels), generator=generator, dtype=torch.float64)
    held = u < share
    # The sample with the largest draw of each class is always kept for fitting.
    keys = labels.double() * 2 + u  # class-major order, then by draw (u < 1 < 2)
    order = torch.argsort(keys)
    sorted_labels = labels[order]
    last = torch.ones(len(labels), dtype=torch.bool)
    last[:-1] = sorted_labels[1:] != sorted_labels[:-1]
    held[order[last]] = False
    return held


def _mean_nll(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              inverse_temperatures: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``softmax(beta * (x W^T + b))`` for each ``beta``: ``(len(betas),)``,
    with its first and second derivatives in beta (for Newton's method), float64."""
    nll = torch.zeros(3, len(inverse_temperatures), dtype=torch.float64)
    for start in range(0, len(x), _CALIBRATION_ROWS):
        z = (x[start:start + _CALIBRATION_ROWS] @ weight.T + bias).double()  # (rows, K)
        true = z.gather(1, y[start:start + _CALIBRATION_ROWS, None])  # (rows, 1)
        for i, beta in enumerate(inverse_temperatures.tolist()):
            log_p = torch.log_softmax(beta * z, dim=1)
            p = log_p.exp()
            mean_z = (p * z).sum(1, keepdim=True)
            nll[0, i] -= (beta * true - torch.logsumexp(beta * z, 1, keepdim=True)).sum()
            nll[1, i] += (mean_z - true).sum()  # d/d beta
            nll[2, i] += (p * (z - mean_z).square()).sum()  # d2/d beta2 (a variance: >= 0)
    return nll / len(x)


def _fit_temperature(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor) -> tuple[float, float, float]:
    """The temperature minimising the held-out NLL (Guo et al. 2017, temperature scaling).

    The NLL is convex in beta = 1 / T, so Newton's method on beta converges in a few
    steps; a step that does not lower the NLL is halved. The confidence is then capped
    (below) for held-out sets classified (almost) without error. Returns
    ``(T, nll(T), nll(1))``.
    """
    beta = torch.ones(1, dtype=torch.float64)
    value, grad, hess = _mean_nll(x, y, weight, bias, beta)[:, 0]
    uncalibrated = float(value)
    for _ in range(30):
        step = grad / hess.clamp_min(1e-12)
        candidate = (beta - step).clamp(1e-3, 1e3)
        new = _mean_nll(x, y, weight, bias, candidate)[:, 0]
        while new[0] > value and (candidate - beta).abs() > 1e-9:
            candidate = (beta + candidate) / 2
            new = _mean_nll(x, y, weight, bias, candidate)[:, 0]
        if new[0] > value:
            break
        converged = value - new[0] < 1e-10
        beta, (value, grad, hess) = candidate, new
        if converged:
            break
    # Where (nearly) every held-out clip is classified right, the likelihood keeps
    # rising as T -> 0 and the teacher would become one-hot with huge logits. Cap its
    # confidence at what the held-out evidence supports: a mean true-class probability
    # of at most (hits + 1) / (n + 2) (Laplace's rule of succession).
    hits = _accuracy(x, y, weight, bias) * len(x)
    cap = (hits + 1) / (len(x) + 2)
    if _mean_true_probability(x, y, weight, bias, float(beta)) > cap:
        # Bisection on log beta: ``high`` is too confident, e^-20 times it is near uniform.
        high = math.log(float(beta))
        low = high - 20.0
        for _ in range(50):
            middle = (low + high) / 2
            if _mean_true_probability(x, y, weight, bias, math.exp(middle)) > cap:
                high = middle
            else:
                low = middle
        beta = torch.tensor([math.exp(low)], dtype=torch.float64)
        value = _mean_nll(x, y, weight, bias, beta)[0, 0]
    return 1.0 / float(beta), float(value), uncalibrated


def _mean_true_probability(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor, beta: float) -> float:
    """Mean probability of the true class under ``softmax(beta * (x W^T + b))``."""
    total = 0.0
    for start in range(0, len(x), _CALIBRATION_ROWS):
        z = (x[start:start + _CALIBRATION_ROWS] @ weight.T + bias).double()
        log_p = torch.log_softmax(beta * z, dim=1)
        total += float(log_p.gather(1, y[start:start + _CALIBRATION_ROWS, None]).exp().sum())
    return total / len(x)


def _accuracy(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    if not len(x):
        return float("nan")
    hits = 0
    for start in range(0, len(x), _CALIBRATION_ROWS):
        z = x[start:start + _CALIBRATION_ROWS] @ weight.T + bias
        hits += int((z.argmax(1) == y[start:start + _CALIBRATION_ROWS]).sum())
    return hits / len(x)


def _minibatch_logistic_regression(x: torch.Tensor, y: torch.Tensor, n_classes: int,
                                   weight_decay: float, epochs: int, batch_size: int, lr: float,
                                   seed: int, progress: bool,
                                   min_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``mean CE(x W^T + b, y) + weight_decay / 2 * ||W||^2`` by minibatch Adam:
    ``max(epochs * batches, min_steps)`` steps.

    Memory: ``W``, Adam's two moments, and one ``(batch_size, K)`` logit block with its
    gradient. The learning rate decays linearly to 0, so the last epochs average the
    minibatch noise away (the end point is close to the full-batch optimum; the tests
    compare it with a float64 full-batch reference).
    """
    from speech2face.utils import progress as tqdm

    generator = torch.Generator().manual_seed(seed)
    weight = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    # Start at the class log-priors: the optimum's bias is close to them.
    counts = torch.bincount(y, minlength=n_classes).float()
    bias = (counts / counts.sum()).log().requires_grad_()
    optimiser = torch.optim.Adam([weight, bias], lr=lr)
    batches = max(1, math.ceil(len(x) / batch_size))
    total = max(epochs * batches, min_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: max(0.0, 1 - step / total))
    bar = tqdm(total=total, desc="identity classifier", unit="batch",
               disable=not progress, dynamic_ncols=True)
    step = 0
    while step < total:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            if step == total:
                break
            step += 1
            index = order[start:start + batch_size]
            loss = F.cross_entropy(F.linear(x[index], weight, bias), y[index])
            loss = loss + 0.5 * weight_decay * weight.square().sum()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.update(1)
    bar.close()
    return weight.detach(), bias.detach()


def fit_identity_classifier(
    features,
    identity_ids,
    seed: int = 0,
    l2: float = CLASSIFIER_L2,
    epochs: int = CLASSIFIER_EPOCHS,
    batch_size: int = CLASSIFIER_BATCH,
    lr: float = CLASSIFIER_LR,
    holdout: float = CLASSIFIER_HOLDOUT,
    min_steps: int = CLASSIFIER_MIN_STEPS,
    progress: bool = False,
) -> IdentityClassifierFit:
    """Fit and calibrate the identity classifier; see :func:`train_identity_classifier`.

    ``holdout``: share of each identity's clips held out for the temperature (0: none,
    temperature 1). Returns the classifier with its calibration figures.
    """
    x, classes, y = _classifier_inputs(features, identity_ids)
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not l2 >= 0:
        raise ValueError(f"l2 must not be negative, got {l2}")
    held = heldout_split(y, holdout, seed) if holdout > 0 else torch.zeros(len(y), dtype=torch.bool)
    fit_x, fit_y = x[~held], y[~held]
    # Centred features scaled to unit RMS by one number s: Adam's steps then suit any
    # feature scale (dlib's entries are ~0.05), and the penalty means the same for any
    # encoder. The bias is not penalised, so centring changes nothing else.
    mean = fit_x.mean(0, dtype=torch.float64).float()
    scale = float((fit_x - mean).square().mean().sqrt().clamp_min(1e-12))
    # sum CE + l2 / 2 |W|^2  ==  N (mean CE + (l2 / N) / 2 |W|^2)
    weight, bias = _minibatch_logistic_regression((fit_x - mean) / scale, fit_y, len(classes),
                                                  l2 / len(fit_x), epochs, batch_size,
                                                  lr, seed, progress, min_steps)
    weight = weight / scale  # back to raw features: W' = W / s, b' = b - W' mean
    bias = bias - weight @ mean
    temperature, nll, nll_before, held_accuracy = 1.0, None, None, None
    if held.any():
        temperature, nll, nll_before = _fit_temperature(x[held], y[held], weight, bias)
        held_accuracy = _accuracy(x[held], y[held], weight, bias)
    linear = nn.Linear(x.shape[1], len(classes))
    with torch.no_grad():
        # softmax((x W^T + b) / T): the temperature folded into the layer.
        linear.weight.copy_(weight / temperature)
        linear.bias.copy_(bias / temperature)
    return IdentityClassifierFit(
        linear=linear.requires_grad_(False), classes=classes, temperature=temperature,
        heldout_nll=nll, heldout_nll_uncalibrated=nll_before, heldout_accuracy=held_accuracy,
        train_accuracy=_accuracy(fit_x, fit_y, weight, bias), heldout_samples=int(held.sum()))


def train_identity_classifier(features, identity_ids, seed: int = 0, **options) -> nn.Linear:
    """A linear identity classifier on face features, standing in for VGG-Face fc8.

    Where a face encoder has no identity classifier (dlib), the distillation
    term uses a linear classifier trained on the training identities' face features,
    frozen like fc8. This is multinomial logistic regression on the features centred and
    scaled to unit root-mean-square, ``sum of cross-entropies + l2 / 2 * ||W||^2`` (bias
    not penalised; scikit-learn's ``C = 1 / l2``), minimised by minibatch Adam
    (memory bounded by one minibatch of logits), then **calibrated**: a temperature
    chosen by the log-likelihood of held-out clips of the same identities (``holdout``,
    10 % of each identity's clips, not used for fitting) is folded into the weights. A
    classifier fitted to separable training identities is otherwise either nearly
    uniform (strong penalty) or one-hot (weak penalty) on its own training features;
    calibrated, it is as confident as it is right on unseen clips, as a softmax-trained
    fc8 is. Reproducible for a given ``seed`` (thread count aside).

    features: (N, D) array or tensor. identity_ids: (N,) ints or strings; class k is the
    k-th of ``sorted(set(identity_ids))``. ``options``: those of
    :func:`fit_identity_classifier` (``l2``, ``epochs``, ``batch_size``,
    ``lr``, ``holdout``, ``min_steps``, ``progress``). Returns
    ``nn.Linear(D, n_identities)`` (float32, on CPU, requires_grad off). Cost: about
    ``epochs`` x 6 x N x D x n_identities flops (docs/benchmarks.md: 200,000 x 128
    features of 6,000 identities).
    """
    return fit_identity_classifier(features, identity_ids, seed=seed, **options).linear
