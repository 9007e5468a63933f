"""dlib's face recognition ResNet, run by numpy: the 128-D face descriptor, faster.

``dlib_face_recognition_resnet_model_v1`` (the network of dlib's
``dnn_face_recognition_ex.cpp``: a 29-convolution ResNet on a 150 x 150 face chip) is the
project's default face encoder. The prebuilt ``dlib-bin`` wheel runs it with dlib's own
convolution code, built without a BLAS: about 120 ms of CPU per face, most of what
``prepare`` and the evaluation's face recognition cost (issue 17). This module reads the
same weights from dlib's own model file and runs the same arithmetic as im2col
convolutions on numpy's BLAS, about 6x less CPU per face. The descriptors equal dlib's to
float32 rounding (tests/test_face_resnet.py compares them with ``compute_face_descriptor``
on the same chips); dlib still cuts the chips (``dlib.get_face_chip``), so the whole
path equals dlib's.

dlib has no public exporter for its networks, so the file is read here. Its format is
dlib's serialisation (``dlib/serialize.h``, ``dlib/dnn/layers.h``): each layer is written
as a version string (``con_4``, ``affine_``, ...) and its fields, inputs first. Only the
tagged layer records are read, in order, and checked against the architecture below
(kinds, shapes, strides, paddings; finite values) before anything runs: a different or
damaged file is refused with one line, never half-read.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from speech2face.errors import WeightsError

# The network's file in the face-recognition-models package.
MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150  # input_rgb_image_sized<150>
DESCRIPTOR_DIM = 128
# dlib's input_rgb_image: (pixel - mean) / 256 per channel, in RGB order.
INPUT_MEAN_RGB = np.array([122.782, 117.001, 104.298], np.float32)
INPUT_SCALE = 256.0
# The network (dnn_face_recognition_ex.cpp): a 7x7/2 convolution with 32 filters and a
# 3x3/2 max-pool, then residual blocks as (filters, downsampling) from the input side,
# a global average pool and a 128-wide fully-connected layer without bias.
STEM_FILTERS = 32
BLOCKS = ((32, False),) * 3 + ((64, True),) + ((64, False),) * 3 + ((128, True),) \
    + ((128, False),) * 2 + ((256, True),) + ((256, False),) * 2 + ((256, True),)
# The record names of the layers this network uses, and the kind each is read as.
_KINDS = {b"con_4": "con", b"affine_": "affine", b"relu_": "relu", b"max_pool_2": "max_pool",
          b"avg_pool_2": "avg_pool", b"add_prev_": "add_prev", b"fc_2": "fc"}
# dlib's layer_mode of an affine layer that scales each channel (CONV_MODE), not each value.
_PER_CHANNEL = 0
# A record starts with its name as a dlib string: a one-byte length (0x01 LEN), the name.
_RECORD = re.compile(rb"\x01([\x04-\x0a])(" + b"|".join(_KINDS) + rb")")


@dataclass(frozen=True)
class Conv:
    """A convolution with its affine (the trained BatchNorm) folded in: NHWC in and out."""

    weight: np.ndarray  # (kh * kw * C_in, C_out), rows in (kh, kw, C_in) order
    bias: np.ndarray  # (C_out,)
    size: int
    stride: int
    padding: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.padding:
            p = self.padding
            x = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        windows = sliding_window_view(x, (self.size, self.size), axis=(1, 2))
        windows = windows[:, ::self.stride, ::self.stride]  # (B, Ho, Wo, C, kh, kw)
        b, ho, wo = windows.shape[:3]
        columns = windows.transpose(0, 1, 2, 4, 5, 3).reshape(b * ho * wo, -1)
        return (columns @ self.weight + self.bias).reshape(b, ho, wo, -1)


def _pool(x: np.ndarray, size: int, stride: int, op) -> np.ndarray:
    windows = sliding_window_view(x, (size, size), axis=(1, 2))[:, ::stride, ::stride]
    return op(windows, axis=(-2, -1))


def _add_prev(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """dlib's add_prev: tensors of different sizes add as if zero-padded to the larger."""
    if a.shape == b.shape:
        return a + b
    out = np.zeros(np.maximum(a.shape, b.shape), np.float32)
    out[:, :a.shape[1], :a.shape[2], :a.shape[3]] += a
    out[:, :b.shape[1], :b.shape[2], :b.shape[3]] += b
    return out


class FaceResNet:
    """The network, ready to run: ``net(chips)`` -> float32 ``(B, 128)`` descriptors.

    chips: uint8 ``(B, 150, 150, 3)`` RGB face chips as ``dlib.get_face_chip`` cuts them.
    """

    def __init__(self, stem: Conv, blocks: list[tuple[Conv, Conv, bool]], fc: np.ndarray):
        self.stem, self.blocks, self.fc = stem, blocks, fc

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        chips = np.asarray(chips)
        shape = (CHIP_SIZE, CHIP_SIZE, 3)
        if chips.ndim != 4 or chips.shape[1:] != shape or chips.dtype != np.uint8:
            raise ValueError(f"expected uint8 chips (B, {CHIP_SIZE}, {CHIP_SIZE}, 3), "
                             f"got {chips.dtype} {chips.shape}")
        # One chip at a time: a BLAS product's rounding can depend on the number of rows, and a
        # face's descriptor must not depend on the faces computed with it (shards stay
        # byte-identical whatever the batch). It is also no slower: the columns of one
        # chip stay in cache (15.5 ms per chip against 18.4 in batches of 24).
        out = [self._forward(chip[None]) for chip in chips]
        return np.concatenate(out) if out else np.zeros((0, DESCRIPTOR_DIM), np.float32)

    def _forward(self, chips: np.ndarray) -> np.ndarray:
        x = (chips.astype(np.float32) - INPUT_MEAN_RGB) / INPUT_SCALE  # (B, 150, 150, 3)
        x = _pool(np.maximum(self.stem(x), 0), 3, 2, np.max)  # (B, 35, 35, 32)
        for first, second, down in self.blocks:
            y = second(np.maximum(first(x), 0))
            # The shortcut of a downsampling block is the input average-pooled 2x2/2.
            x = np.maximum(_add_prev(y, _pool(x, 2, 2, np.mean) if down else x), 0)
        return x.mean(axis=(1, 2)) @ self.fc  # global average pool, then fc: (B, 128)


class _Reader:
    """dlib's serialisation of the scalars and tensors in a layer record."""

    def __init__(self, data: bytes, position: int):
        self.data, self.position = data, position

    def integer(self) -> int:
        # One byte: bit 7 the sign, the low 4 bits the number of little-endian bytes after it.
        head = self.data[self.position]
        size = head & 0x0F
        if not 1 <= size <= 8:
            raise ValueError(f"bad integer at byte {self.position}")
        value = int.from_bytes(self.data[self.position + 1:self.position + 1 + size], "little")
        self.position += 1 + size
        return -value if head & 0x80 else value

    def real(self) -> float:
        mantissa, exponent = self.integer(), self.integer()  # dlib's float_details
        return mantissa * 2.0**exponent

    def tensor(self) -> np.ndarray:
        # version 2, then (num_samples, k, nr, nc), then little-endian IEEE float32 values
        if self.integer() != 2:
            raise ValueError(f"unknown tensor version at byte {self.position}")
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        if self.position + 4 * count > len(self.data):
            raise ValueError("a tensor runs past the end of the file")
        values = np.frombuffer(self.data, "<f4", count, self.position).astype(np.float32)
        self.position += 4 * count
        return values

    def alias(self) -> tuple[int, ...]:
        if self.integer() != 1:
            raise ValueError(f"unknown alias_tensor version at byte {self.position}")
        return tuple(self.integer() for _ in range(4))


def _records(data: bytes) -> list[tuple[str, dict]]:
    """The layer records of a dlib network file, input side first."""
    records, end = [], 0
    for match in _RECORD.finditer(data):
        name = match.group(2)
        if match.start() < end or match.group(1)[0] != len(name):
            continue  # inside the previous record's data, or not a length-prefixed name
        r = _Reader(data, match.end())
        kind = _KINDS[name]
        if kind == "con":
            params = r.tensor()
            fields = [r.integer() for _ in range(7)]  # filters, nr, nc, stride y/x, padding y/x
            shape, _ = r.alias(), r.alias()
            for _ in range(4):
                r.real()  # learning-rate and weight-decay multipliers
            n = int(np.prod(shape))
            details = {"weight": params[:n].reshape(shape), "bias": params[n:n + shape[0]],
                       "fields": fields}
        elif kind == "affine":
            params = r.tensor()
            gamma, _ = r.alias(), r.alias()
            details = {"gamma": params[:int(np.prod(gamma))],
                       "beta": params[int(np.prod(gamma)):], "mode": r.integer()}
        elif kind in ("max_pool", "avg_pool"):
            details = {"fields": [r.integer() for _ in range(6)]}  # nr, nc, stride, padding
        elif kind == "fc":
            outputs, inputs = r.integer(), r.integer()
            params = r.tensor()
            r.alias(), r.alias()
            details = {"weight": params[:inputs * outputs].reshape(inputs, outputs),
                       "bias_mode": r.integer()}
        else:  # relu, add_prev: no fields
            details = {}
        records.append((kind, details))
        end = r.position
    return records


def _conv(records: list, i: int, filters: int, inputs: int, size: int, stride: int) -> Conv:
    """The convolution at ``records[i]`` and the affine after it, checked and folded."""
    (kind, con), (next_kind, affine) = records[i], records[i + 1]
    # dlib's default padding: half the kernel for stride 1, none otherwise.
    padding = size // 2 if stride == 1 else 0
    expected = [filters, size, size, stride, stride, padding, padding]
    if kind != "con" or next_kind != "affine" or con["fields"] != expected \
            or con["weight"].shape != (filters, inputs, size, size) \
            or con["bias"].shape != (filters,) or affine["gamma"].shape != (filters,) \
            or affine["beta"].shape != (filters,) or affine["mode"] != _PER_CHANNEL:
        raise ValueError(f"layer {i} is not the expected {size}x{size}/{stride} convolution "
                         f"with {filters} filters")
    gamma, beta = affine["gamma"], affine["beta"]
    weight = con["weight"] * gamma[:, None, None, None]  # affine(conv(x)) = conv'(x)
    weight = weight.transpose(2, 3, 1, 0).reshape(size * size * inputs, filters)
    bias = (con["bias"] * gamma + beta).astype(np.float32)
    return Conv(np.ascontiguousarray(weight, np.float32), bias, size, stride, padding)


def _build(records: list) -> FaceResNet:
    kinds = [kind for kind, _ in records]

    def expect(i: int, kind: str, fields=None) -> None:
        if i >= len(records) or kinds[i] != kind or (
                fields is not None and records[i][1]["fields"] != fields):
            raise ValueError(f"layer {i} is not the expected {kind}")

    stem = _conv(records, 0, STEM_FILTERS, 3, 7, 2)
    expect(2, "relu")
    expect(3, "max_pool", [3, 3, 2, 2, 0, 0])
    i, channels, blocks = 4, STEM_FILTERS, []
    for filters, down in BLOCKS:
        first = _conv(records, i, filters, channels, 3, 2 if down else 1)
        expect(i + 2, "relu")
        second = _conv(records, i + 3, filters, filters, 3, 1)
        i += 5
        if down:
            expect(i, "avg_pool", [2, 2, 2, 2, 0, 0])
            i += 1
        expect(i, "add_prev")
        expect(i + 1, "relu")
        i += 2
        blocks.append((first, second, down))
        channels = filters
    expect(i, "avg_pool", [0, 0, 1, 1, 0, 0])  # avg_pool_everything
    expect(i + 1, "fc")
    fc = records[i + 1][1]
    if fc["weight"].shape != (channels, DESCRIPTOR_DIM) or fc["bias_mode"] != 1:
        raise ValueError(f"the last layer is not a {channels} -> {DESCRIPTOR_DIM} fc without bias")
    if len(records) != i + 2:
        raise ValueError(f"{len(records) - i - 2} unexpected layers after the last one")
    convs = [stem] + [conv for first, second, _ in blocks for conv in (first, second)]
    arrays = [fc["weight"]] + [a for conv in convs for a in (conv.weight, conv.bias)]
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("weights contain NaN or infinite values")
    return FaceResNet(stem, blocks, np.ascontiguousarray(fc["weight"]))


def load_face_resnet(path: str | os.PathLike) -> FaceResNet:
    """Read and check ``dlib_face_recognition_resnet_model_v1.dat``.

    Raises:
        WeightsError: the file is missing, unreadable or not this network (one line).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise WeightsError(path, f"cannot be read ({error.strerror or error})") from None
    if not data.startswith(b"\x01\x01\x01\x0dloss_metric_2"):
        raise WeightsError(path, "is not dlib's face recognition network (loss_metric_2)")
    try:
        return _build(_records(data))
    except (ValueError, IndexError) as error:
        raise WeightsError(path, f"is not dlib_face_recognition_resnet_model_v1: {error}") from None


@functools.cache
def face_resnet() -> FaceResNet:
    """The network from the ``face-recognition-models`` package, loaded once per process."""
    from speech2face.faces import model_dir

    return load_face_resnet(model_dir() / MODEL_FILE)
