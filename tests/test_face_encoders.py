"""Face encoders: dlib's ResNet on aligned crops, VGG-Face in two weight formats, and the
identity classifier. VGG-Face numerics are checked against float64 numpy forward passes
written here from each format's own conventions (NCHW for the .pth, NHWC + BGR for Keras).
"""

from __future__ import annotations

import re
import sys

import dlib
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy import optimize, special
from skimage import data

from speech2face import face_encoders as E
from speech2face import faces as F
from speech2face.errors import WeightsError

TINY = E.VGGFaceConfig.tiny()
DAG_MEAN = np.array([129.186279296875, 104.76238250732422, 93.59396362304688])  # RGB
KERAS_MEAN_BGR = np.array([93.5940, 104.7624, 129.1863])


# ---------------------------------------------------------------------------- dlib


@pytest.fixture(scope="module")
def photos():
    import matplotlib.cbook

    hopper = F.load_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return {"astronaut": data.astronaut(), "hopper": hopper}


@pytest.fixture(scope="module")
def dlib_encoder():
    return E.load_face_encoder("dlib")


def test_dlib_interface(dlib_encoder):
    assert dlib_encoder.name == "dlib" and dlib_encoder.feature_dim == 128
    assert dlib_encoder.classifier is None and dlib_encoder.differentiable is False
    assert dlib_encoder.embed(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 128)


def test_dlib_matches_dlibs_own_pipeline(dlib_encoder, photos):
    # Reference: dlib's documented use on the original photograph (detector box,
    # 68-point shape, compute_face_descriptor), with no crop of ours in between.
    for image in photos.values():
        face = F.detect_faces(image)[0]
        shape = F.dlib_model("landmarks68")(image, dlib.rectangle(*face.box))
        reference = np.array(F.dlib_model("recognition").compute_face_descriptor(image, shape))
        crop, _ = F.align_face(image, face)
        feature = dlib_encoder.embed(crop[None])
        assert feature.shape == (1, 128) and feature.dtype == torch.float32
        assert np.linalg.norm(feature[0].numpy() - reference) < 0.1


def test_dlib_embedding_is_stable_and_discriminative(dlib_encoder, photos):
    astronaut = photos["astronaut"]
    crop_a, _, _ = F.extract_face(astronaut)
    shifted, _, _ = F.extract_face(np.roll(astronaut, (9, -6), axis=(0, 1)))
    smaller, _, _ = F.extract_face(astronaut[::2, ::2].copy())
    crop_h, _, _ = F.extract_face(photos["hopper"])
    batch = [crop_a, crop_a[:, ::-1], shifted, smaller, crop_h]
    features = dlib_encoder.embed(batch).numpy()
    distance = np.linalg.norm(features[:, None] - features[None], axis=-1)
    same, different = distance[0, 1:4], distance[0, 4]
    assert same.max() < 0.35 < 0.55 < different  # dlib's same-person threshold is 0.6
    # Batched = one at a time; float tensors in [0, 1] = uint8 arrays.
    np.testing.assert_allclose(dlib_encoder.embed(crop_h[None]).numpy()[0], features[4], atol=1e-5)
    tensor = torch.from_numpy(np.stack([crop_a, crop_h])).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_allclose(dlib_encoder.embed(tensor).numpy(), features[[0, 4]], atol=1e-5)


# ---------------------------------------------------------------------------- VGG-Face


def _dag_shapes(config):
    shapes, c_in, block, index = {}, 3, 1, 1
    for v in config.layers:
        if v == "M":
            block, index = block + 1, 1
            continue
        shapes[f"conv{block}_{index}"] = ((v, c_in, 3, 3), (v,))
        c_in, index = v, index + 1
    flat = c_in * 7 * 7
    shapes["fc6"] = ((config.fc_dim, flat), (config.fc_dim,))
    shapes["fc7"] = ((config.fc_dim, config.fc_dim), (config.fc_dim,))
    shapes["fc8"] = ((config.num_identities, config.fc_dim), (config.num_identities,))
    return shapes


def _random_dag_weights(config, seed=0):
    """vgg_face_dag-style arrays (PyTorch layout), He-initialised."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, (w_shape, b_shape) in _dag_shapes(config).items():
        fan_in = int(np.prod(w_shape[1:]))
        weights[f"{name}.weight"] = rng.normal(0, np.sqrt(2 / fan_in), w_shape).astype(np.float32)
        weights[f"{name}.bias"] = rng.normal(0, 0.1, b_shape).astype(np.float32)
    return weights


def _write_dag(path, weights):
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)


def _keras_arrays(weights):
    """The same network in Keras/TensorFlow layout, as keras-vggface stores it."""
    arrays = {}
    for key, value in weights.items():
        layer, kind = key.split(".")
        if kind == "bias":
            arrays[layer, "bias"] = value
        elif layer.startswith("conv"):
            kernel = value.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
            if layer == "conv1_1":
                kernel = kernel[:, :, ::-1]  # keras-vggface feeds BGR
            arrays[layer, "kernel"] = np.ascontiguousarray(kernel)
        elif layer == "fc6":
            out, flat = value.shape
            c = flat // 49
            # PyTorch columns run (c, h, w); Keras Flatten of NHWC runs (h, w, c).
            arrays[layer, "kernel"] = np.ascontiguousarray(
                value.reshape(out, c, 7, 7).transpose(2, 3, 1, 0).reshape(flat, out)
            )
        else:
            arrays[layer, "kernel"] = np.ascontiguousarray(value.T)
    return arrays


def _write_keras(path, arrays, full_model=False):
    """Keras 2 HDF5 weights layout: one group per layer, ``weight_names`` attributes."""
    import h5py

    layers = sorted({layer for layer, _ in arrays}, key=lambda n: (n[:2], n))
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if full_model else f
        names = ["input_1"] + layers + ["flatten"]
        root.attrs["layer_names"] = [n.encode() for n in names]
        root.attrs["backend"] = b"tensorflow"
        for name in names:
            group = root.create_group(name)
            weight_names = []
            for kind in ("kernel", "bias"):
                if (name, kind) in arrays:
                    group.create_dataset(f"{name}/{kind}:0", data=arrays[name, kind])
                    weight_names.append(f"{name}/{kind}:0".encode())
            group.attrs["weight_names"] = weight_names


def _pool(x, axes):
    h, w = axes
    x = np.moveaxis(x, (h, w), (-2, -1))
    H, W = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :H, :W].reshape(*x.shape[:-2], H // 2, 2, W // 2, 2).max(axis=(-3, -1))
    return np.moveaxis(x, (-2, -1), (h, w))


def _reference_dag(weights, config, rgb_uint8):
    """float64 NCHW forward of vgg_face_dag: RGB 0..255 minus its mean; fc7 relu, fc8."""
    x = rgb_uint8.astype(np.float64).transpose(2, 0, 1) - DAG_MEAN[:, None, None]
    block, index = 1, 1
    for v in config.layers:
        if v == "M":
            x, block, index = _pool(x, (1, 2)), block + 1, 1
            continue
        w, b = weights[f"conv{block}_{index}.weight"], weights[f"conv{block}_{index}.bias"]
        windows = sliding_window_view(np.pad(x, ((0, 0), (1, 1), (1, 1))), (3, 3), axis=(1, 2))
        x = np.maximum(
            np.einsum("chwij,ocij->ohw", windows, w.astype(np.float64)) + b[:, None, None], 0
        )
        index += 1
    x = x.reshape(-1)  # (c, h, w)
    x = np.maximum(weights["fc6.weight"] @ x + weights["fc6.bias"], 0)
    fc7 = np.maximum(weights["fc7.weight"] @ x + weights["fc7.bias"], 0)
    return fc7, weights["fc8.weight"] @ fc7 + weights["fc8.bias"]


def _reference_keras(arrays, config, rgb_uint8):
    """float64 NHWC forward with keras-vggface's conventions: BGR minus its mean."""
    x = rgb_uint8[..., ::-1].astype(np.float64) - KERAS_MEAN_BGR
    block, index = 1, 1
    for v in config.layers:
        if v == "M":
            x, block, index = _pool(x, (0, 1)), block + 1, 1
            continue
        name = f"conv{block}_{index}"
        windows = sliding_window_view(np.pad(x, ((1, 1), (1, 1), (0, 0))), (3, 3), axis=(0, 1))
        x = np.maximum(
            np.einsum("hwcij,ijco->hwo", windows, arrays[name, "kernel"]) + arrays[name, "bias"], 0
        )
        index += 1
    x = x.reshape(-1)  # (h, w, c)
    x = np.maximum(x @ arrays["fc6", "kernel"] + arrays["fc6", "bias"], 0)
    fc7 = np.maximum(x @ arrays["fc7", "kernel"] + arrays["fc7", "bias"], 0)
    return fc7, fc7 @ arrays["fc8", "kernel"] + arrays["fc8", "bias"]


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vggface")
    weights = _random_dag_weights(TINY)
    arrays = _keras_arrays(weights)
    _write_dag(folder / "vgg_face_dag.pth", weights)
    _write_keras(folder / "rcmalli_vggface_tf_vgg16.h5", arrays)
    _write_keras(folder / "full_model.h5", arrays, full_model=True)
    return folder, weights, arrays


@pytest.fixture(scope="module")
def crops():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    face, _, _ = F.extract_face(data.astronaut())
    return np.stack([face, noise[0]])


def _close(actual, expected, rtol=1e-4):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.abs(actual - expected).max() <= rtol * np.abs(expected).max() + 1e-6


def test_vggface_dag_pth_matches_reference(weight_files, crops):
    folder, weights, _ = weight_files
    encoder = E.load_face_encoder("vggface", weights=folder / "vgg_face_dag.pth", config=TINY)
    assert (
        encoder.name == "vggface" and encoder.differentiable and encoder.feature_dim == TINY.fc_dim
    )
    features = encoder.embed(crops)
    logits = encoder.classifier(features)
    assert features.shape == (2, TINY.fc_dim) and logits.shape == (2, TINY.num_identities)
    for i, crop in enumerate(crops):
        fc7, fc8 = _reference_dag(weights, TINY, crop)
        _close(features[i].numpy(), fc7)
        _close(logits[i].detach().numpy(), fc8)


def test_vggface_keras_h5_matches_reference(weight_files, crops):
    folder, _, arrays = weight_files
    encoder = E.load_face_encoder(
        "vggface", weights=folder / "rcmalli_vggface_tf_vgg16.h5", config=TINY
    )
    features = encoder.embed(crops)
    for i, crop in enumerate(crops):
        fc7, fc8 = _reference_keras(arrays, TINY, crop)
        _close(features[i].numpy(), fc7)
        _close(encoder.classifier(features[i : i + 1])[0].detach().numpy(), fc8)


def test_vggface_both_formats_give_the_same_network(weight_files, crops):
    folder, _, _ = weight_files
    outputs = []
    for name in ["vgg_face_dag.pth", "rcmalli_vggface_tf_vgg16.h5", "full_model.h5"]:
        encoder = E.load_face_encoder("vggface", weights=folder / name, config=TINY)
        tensor = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
        outputs.append(encoder.classifier(encoder.embed(tensor)).detach().numpy())
    _close(outputs[1], outputs[0])
    _close(outputs[2], outputs[1], rtol=1e-6)


def test_vggface_safetensors_and_cache_dir(weight_files, crops, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    folder, weights, _ = weight_files
    save_file({k: torch.from_numpy(v) for k, v in weights.items()}, tmp_path / "w.safetensors")
    a = E.load_face_encoder("vggface", weights=tmp_path / "w.safetensors", config=TINY).embed(crops)
    cache = tmp_path / "cache" / "speech2face"
    cache.mkdir(parents=True)
    (cache / "vgg_face_dag.pth").write_bytes((folder / "vgg_face_dag.pth").read_bytes())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    b = E.load_face_encoder("vggface", config=TINY).embed(crops)
    torch.testing.assert_close(a, b)


def test_vggface_bad_files(weight_files, tmp_path, monkeypatch):
    folder, weights, arrays = weight_files
    with pytest.raises(WeightsError, match="missing.pth: no such weights file"):
        E.load_face_encoder("vggface", weights=tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="/dev/null: not a regular file"):  # (was "no such")
        E.load_face_encoder("vggface", weights="/dev/null")
    for name in ["vgg_face_dag.pth", "rcmalli_vggface_tf_vgg16.h5"]:
        raw = (folder / name).read_bytes()
        (tmp_path / name).write_bytes(raw[: len(raw) // 2])
        with pytest.raises(WeightsError, match=rf"{name}: cannot read"):
            E.load_face_encoder("vggface", weights=tmp_path / name, config=TINY)
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(WeightsError, match="notes.pth: not a PyTorch weights file"):
        E.load_face_encoder("vggface", weights=tmp_path / "notes.pth")
    (tmp_path / "face.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(WeightsError, match="face.png: not a PyTorch weights file"):
        E.load_face_encoder("vggface", weights=tmp_path / "face.png")
    # Tiny weights for the paper-sized network: a shape mismatch, named.
    with pytest.raises(
        WeightsError, match=r"vgg_face_dag.pth: conv1_1.weight has shape \(4, 3, 3, 3\)"
    ):
        E.load_face_encoder("vggface", weights=folder / "vgg_face_dag.pth")
    with pytest.raises(
        WeightsError,
        match=r"rcmalli_vggface_tf_vgg16.h5: layer 'conv1_1' kernel holds 108 values of "
              r"float32, expected 1728 numbers",
    ):
        E.load_face_encoder("vggface", weights=folder / "rcmalli_vggface_tf_vgg16.h5")
    # A missing tensor / layer.
    partial = {k: v for k, v in weights.items() if not k.startswith("fc8")}
    _write_dag(tmp_path / "partial.pth", partial)
    with pytest.raises(WeightsError, match="partial.pth: not VGG-Face weights: missing 2 of"):
        E.load_face_encoder("vggface", weights=tmp_path / "partial.pth", config=TINY)
    _write_keras(tmp_path / "partial.h5", {k: v for k, v in arrays.items() if k[0] != "conv3_2"})
    with pytest.raises(
        WeightsError, match="partial.h5: not keras-vggface VGG16 weights: no layer 'conv3_2'"
    ):
        E.load_face_encoder("vggface", weights=tmp_path / "partial.h5", config=TINY)
    # No weights anywhere: refuses, and says what to do.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="VGG-Face needs its weights.*weights=PATH"):
        E.load_face_encoder("vggface")
    # Without h5py: a clear message.
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(WeightsError, match="pip install h5py"):
        E.load_face_encoder("vggface", weights=folder / "rcmalli_vggface_tf_vgg16.h5", config=TINY)


def test_vggface_random_init_is_differentiable_and_seeded():
    encoder = E.load_face_encoder("vggface", random_init=True, config=TINY)
    again = E.load_face_encoder("vggface", random_init=True, config=TINY)
    image = torch.rand(2, 3, 112, 112, requires_grad=True)  # resized to 224 inside
    features = encoder.embed(image)
    assert features.shape == (2, TINY.fc_dim)
    torch.testing.assert_close(features, again.embed(image))
    features.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.network.training  # stays frozen inside a model being trained
    with torch.no_grad():  # uint8 arrays take the same path
        as_uint8 = (image.detach() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        from_tensor = encoder.embed(torch.from_numpy(as_uint8).permute(0, 3, 1, 2) / 255.0)
        torch.testing.assert_close(encoder.embed(as_uint8), from_tensor, rtol=1e-4, atol=1e-3)


def test_vggface_paper_layout():
    # Count parameters from VGG-16 "D" by hand: 13 3x3 convs, fc6 25088->4096, fc7, fc8 2622.
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    expected = sum(9 * i * o + o for i, o in zip([3] + widths[:-1], widths, strict=True))
    expected += 25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 2622 + 2622
    with torch.device("meta"):
        network = E.VGGFace(E.VGGFaceConfig.paper())
        out = network(torch.empty(1, 3, 224, 224))
    assert sum(p.numel() for p in network.parameters()) == expected == 145_002_878
    assert out.shape == (1, 2622)
    assert E.vgg_layer_names(E.VGG_FACE_LAYERS) == [
        f"conv{b}_{i}"
        for b, n in zip(range(1, 6), [2, 2, 3, 3, 3], strict=True)
        for i in range(1, n + 1)
    ]


def test_unknown_encoder():
    with pytest.raises(ValueError, match="unknown face encoder"):
        E.load_face_encoder("arcface")


# ---------------------------------------------------------------------------- classifier


def _reference_classifier(x, y, n_classes, weight_decay):
    """Multinomial logistic regression by scipy L-BFGS-B in float64, analytic gradient."""
    n, d = x.shape
    onehot = np.eye(n_classes)[y]

    def loss(theta):
        w, b = theta[: n_classes * d].reshape(n_classes, d), theta[n_classes * d :]
        z = x @ w.T + b
        p = special.softmax(z, axis=1)
        value = -np.mean(
            np.sum(onehot * special.log_softmax(z, axis=1), 1)
        ) + 0.5 * weight_decay * np.sum(w**2)
        g = (p - onehot) / n
        return value, np.concatenate([(g.T @ x + weight_decay * w).ravel(), g.sum(0)])

    result = optimize.minimize(
        loss,
        np.zeros(n_classes * (d + 1)),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 5000, "gtol": 1e-12, "ftol": 1e-15},
    )
    return result.x[: n_classes * d].reshape(n_classes, d), result.x[n_classes * d :]


def test_identity_classifier_matches_scipy_and_is_reproducible():
    """Without held-out clips the fit is the penalised optimum: against a float64
    full-batch reference (scipy L-BFGS-B on the same objective)."""
    rng = np.random.default_rng(0)
    names = np.array(["carol", "alice", "bob", "dave"])
    centres = rng.normal(0, 1, (4, 8))
    labels = rng.integers(0, 4, 80)
    features = (centres[labels] + rng.normal(0, 0.8, (80, 8))).astype(np.float32)
    ids = names[labels]
    l2 = 2.0
    linear = E.train_identity_classifier(features, ids, seed=0, l2=l2, holdout=0)
    assert isinstance(linear, torch.nn.Linear) and linear.weight.shape == (4, 8)
    # Classes are the sorted identity names: alice, bob, carol, dave.
    y = np.searchsorted(np.sort(names), ids)
    x64 = features.astype(np.float64)
    # The penalty is l2 / 2 |W~|^2 on the summed cross-entropy, W~ the weights of the
    # features divided by their RMS spread s: on raw features and the mean, (l2 s^2 / N).
    spread = np.sqrt(np.mean((x64 - x64.mean(0)) ** 2))
    w, b = _reference_classifier(x64, y, 4, l2 * spread**2 / len(x64))
    reference = special.softmax(x64 @ w.T + b, axis=1)
    ours = torch.softmax(linear(torch.from_numpy(features)), 1).double().numpy()
    np.testing.assert_allclose(ours, reference, atol=2e-3)
    accuracy = (ours.argmax(1) == y).mean()
    assert accuracy > 0.8
    again = E.train_identity_classifier(
        torch.from_numpy(features), list(ids), seed=0, l2=l2, holdout=0
    )
    torch.testing.assert_close(again.weight, linear.weight, rtol=0, atol=0)
    assert not linear.weight.requires_grad
    # Integer ids work too.
    assert E.train_identity_classifier(features, labels + 10, holdout=0).out_features == 4


def _identities(n_classes, per_class, dim, seed, noise=0.35, noise_seed=None):
    """Clips of ``n_classes`` identities: a centre on the sphere (drawn from ``seed``) plus
    Gaussian noise (from ``noise_seed``, default ``seed``)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_classes), per_class)
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
    x = centres[labels] + rng.normal(scale=noise, size=(len(labels), dim))
    return x.astype(np.float32), labels


def test_identity_classifier_with_thousands_of_classes_matches_scikit_learn():
    """1,000 identities fitted by the minibatch code path: the same
    training and test accuracy as scikit-learn's full-batch multinomial fit of the same
    penalised objective, and probabilities close to its."""
    from sklearn.linear_model import LogisticRegression

    x, y = _identities(1000, 4, 8, seed=1, noise=0.12)
    test_x, test_y = _identities(1000, 1, 8, seed=1, noise=0.12, noise_seed=99)  # unseen clips
    l2 = 30.0
    # Minibatches of 4,000 clips (of 4,000 here): the same code path as at scale, with
    # enough steps to converge on 1,000 classes in seconds.
    fit = E.fit_identity_classifier(x, y, l2=l2, holdout=0, batch_size=4000,
                                    epochs=150, min_steps=0, lr=0.1)
    # scikit-learn minimises C * sum(CE) + |W|^2 / 2; ours penalises the weights of the
    # features scaled by their RMS spread s, so C = 1 / (l2 s^2) on the raw features.
    spread = float(np.sqrt(np.mean((x - x.mean(0)) ** 2)))
    reference = LogisticRegression(C=1 / (l2 * spread**2), max_iter=500, tol=1e-6)
    reference.fit(x, y)

    def accuracy(predict, features, labels):
        return (predict(features) == labels).mean()

    ours = lambda f: fit.linear(torch.from_numpy(f)).argmax(1).numpy()  # noqa: E731
    theirs = lambda f: reference.predict(f)  # noqa: E731
    for features, labels in ((x, y), (test_x, test_y)):
        assert abs(accuracy(ours, features, labels) - accuracy(theirs, features, labels)) < 0.01
    assert accuracy(theirs, test_x, test_y) > 0.3  # a problem with something to learn
    p_ours = torch.softmax(fit.linear(torch.from_numpy(test_x)), 1).double().numpy()
    p_theirs = reference.predict_proba(test_x)
    assert np.abs(p_ours - p_theirs).sum(1).mean() < 0.05  # total variation per clip


def test_identity_classifier_calibration_lowers_heldout_nll():
    """The temperature is the held-out NLL's minimiser (checked with scipy on the held-out
    clips), the result is no worse than the uncalibrated fit, and a weakly penalised
    fit, overconfident on its training clips, gets a temperature above 1.

    Overlapping identities (4 fitting clips each in 8 dimensions): the fit learns its
    clips' noise (train accuracy ~70 %, held-out ~20 %). The problem is kept small enough
    for the minibatch fit to converge; an underfitted one is not overconfident (with 1,000
    identities and 150 passes the temperature came out 0.74).
    """
    x, y = _identities(200, 6, 8, seed=2, noise=0.3)
    fit = E.fit_identity_classifier(x, y, l2=0.05, holdout=0.2, seed=3, min_steps=1000)
    held = E.heldout_split(torch.as_tensor(y), 0.2, 3).numpy()
    assert fit.heldout_samples == held.sum() > 200
    assert set(np.unique(y[~held])) == set(range(200))  # every identity keeps clips to fit

    logits = fit.linear(torch.from_numpy(x[held])).double().numpy()  # includes 1 / T
    uncalibrated = logits * fit.temperature

    def nll(z):
        return -special.log_softmax(z, axis=1)[np.arange(len(z)), y[held]].mean()

    best = optimize.minimize_scalar(lambda log_t: nll(uncalibrated / np.exp(log_t)),
                                    bounds=(-5, 5), method="bounded",
                                    options={"xatol": 1e-8})
    assert fit.temperature == pytest.approx(np.exp(best.x), rel=1e-3)
    assert nll(logits) == pytest.approx(fit.heldout_nll, rel=1e-4)
    assert nll(uncalibrated) == pytest.approx(fit.heldout_nll_uncalibrated, rel=1e-4)
    assert nll(logits) <= nll(uncalibrated)
    assert fit.temperature > 1.5 and nll(logits) < 0.9 * nll(uncalibrated)


def test_identity_classifier_confidence_is_capped_when_heldout_clips_are_all_right():
    """Separable identities (the demo's): the held-out likelihood rises without end as
    T -> 0, so the teacher's mean true-class probability on held-out clips is capped at
    Laplace's (hits + 1) / (n + 2) instead of becoming one-hot."""
    x, y = _identities(20, 12, 16, seed=4, noise=0.05)
    fit = E.fit_identity_classifier(x, y, holdout=0.25, seed=0, min_steps=300)
    held = E.heldout_split(torch.as_tensor(y), 0.25, 0).numpy()
    n = int(held.sum())
    assert fit.heldout_accuracy == 1.0 and n > 20
    p = torch.softmax(fit.linear(torch.from_numpy(x[held])), 1).double().numpy()
    assert p[np.arange(n), y[held]].mean() == pytest.approx((n + 1) / (n + 2), abs=1e-4)


def test_identity_classifier_bad_input():
    with pytest.raises(ValueError, match="at least 2 identities"):
        E.train_identity_classifier(np.zeros((5, 3)), [1] * 5)
    with pytest.raises(ValueError, match="expected features"):
        E.train_identity_classifier(np.zeros((5, 3)), [1, 2])


def test_vggface_weights_that_are_not_float_tensors_are_refused(weight_files, tmp_path):
    """A pickle-free torch.load gives strings, None or ragged lists as values, and float8
    tensors have no isfinite on the CPU: each was a traceback (TypeError, ValueError,
    NotImplementedError)."""
    from safetensors.torch import save_file

    _, weights, _ = weight_files
    tensors = {k: torch.from_numpy(v) for k, v in weights.items()}
    first = next(iter(tensors))
    for bad, words in (("abc", "is not a tensor (str)"), (None, "is not a tensor (NoneType)"),
                       ([[1.0], [1.0, 2.0]], "is not a tensor (list)")):
        torch.save({**tensors, first: bad}, tmp_path / "w.pth")
        with pytest.raises(WeightsError, match=f"w.pth: {first} {re.escape(words)}"):
            E.load_face_encoder("vggface", weights=tmp_path / "w.pth", config=TINY)
    save_file({**tensors, first: tensors[first].to(torch.float8_e4m3fn)},
              tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match=f"{first} is float8_e4m3fn, not float16"):
        E.load_face_encoder("vggface", weights=tmp_path / "w.safetensors", config=TINY)


def test_crafted_keras_files_are_refused_before_their_arrays_are_read(weight_files, tmp_path):
    """A 27-kB .h5 declaring a (10^6, 10^6) dataset asked for 3.6 TiB; a layer stored as a
    dataset, a compound dtype or weight_names that are a number were tracebacks."""
    import h5py

    _, _, arrays = weight_files
    path = tmp_path / "w.h5"
    for case, words in (("huge", "kernel holds 1000000000000 values of float32, expected"),
                        ("compound", "kernel holds .* values of .*, expected"),
                        ("dataset", "layer 'conv1_1' is not an HDF5 group of weights"),
                        ("names", "cannot read HDF5 weights")):
        _write_keras(path, arrays)
        with h5py.File(path, "r+") as f:
            group = f["conv1_1"]
            if case == "huge":
                del group["conv1_1/kernel:0"]
                group.create_dataset("conv1_1/kernel:0", shape=(10**6, 10**6), dtype="f4",
                                     chunks=(64, 64), compression="gzip")
            elif case == "compound":
                kernel = group["conv1_1/kernel:0"]
                data = np.zeros(kernel.shape, dtype=[("a", "<f4"), ("b", "<f4")])
                del group["conv1_1/kernel:0"]
                group.create_dataset("conv1_1/kernel:0", data=data)
            elif case == "dataset":
                del f["conv1_1"]
                f.create_dataset("conv1_1", data=np.zeros(3))
            else:
                group.attrs["weight_names"] = 5
        with pytest.raises(WeightsError, match=f"w.h5: .*{words}"):
            E.load_face_encoder("vggface", weights=path, config=TINY)
