"""The face decoder (Cole et al.): shapes, frames, rendering, and that a tiny one can learn."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates

import speech2face
from speech2face.face_decoder import (
    CROP_SIZE,
    DecodedFace,
    FaceDecoder,
    FaceDecoderConfig,
    crop_to_grid,
    register_texture,
    render,
)
from speech2face.losses import LossConfig, decoder_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def face():
    """The bundled public-domain face, resized to the 224 crop: (1, 3, 224, 224), (1, 68, 2)."""
    assets = Path(speech2face.__file__).parent / "assets"
    from PIL import Image

    with (assets / "face.jpg").open("rb") as f:
        image = Image.open(f).convert("RGB")
        scale = CROP_SIZE / image.size[0]
        image = np.asarray(image.resize((CROP_SIZE, CROP_SIZE), Image.BILINEAR))
    landmarks = np.array(json.loads((assets / "face_landmarks.json").read_text())["landmarks"],
                         dtype=np.float32)
    landmarks = (landmarks + 0.5) * scale - 0.5
    return (torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255,
            torch.from_numpy(landmarks)[None])


def smooth_deformation(landmarks: torch.Tensor, seed: int, amount: float = 6.0) -> torch.Tensor:
    """Landmarks moved by a random smooth (affine + low-order) field: another face shape."""
    g = torch.Generator().manual_seed(seed)
    centred = (landmarks - 112) / 112
    a = torch.eye(2) + 0.05 * torch.randn(2, 2, generator=g)
    bend = 0.03 * torch.randn(2, generator=g)
    out = centred @ a.T + bend * centred.flip(-1).pow(2)
    return out * 112 + 112 + amount * torch.randn(2, generator=g)


def test_presets_and_config_round_trip():
    paper = FaceDecoderConfig.paper()
    assert paper.image_size == 224 and paper.code_dim == 1000 and paper.feature_dim == 4096
    assert paper.texture_channels == (128, 64, 32, 32) and paper.texture_kernel == 5
    assert (paper.warp_order, paper.warp_regularization, paper.warp_boundary_points) == (1, 0.1, 2)
    assert FaceDecoderConfig.paper(128).feature_dim == 128
    tiny = FaceDecoderConfig.tiny()
    assert tiny.feature_dim == 128 and tiny.image_size == 64
    for config in (paper, tiny):
        d = json.loads(json.dumps(config.to_dict()))
        assert FaceDecoderConfig.from_dict(d) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        paper.feature_dim = 3


def test_paper_decoder_shapes(face):
    torch.manual_seed(0)
    decoder = FaceDecoder(FaceDecoderConfig.paper(), face[1][0])
    out = decoder(torch.randn(2, 4096))
    assert isinstance(out, DecodedFace)
    assert out.image.shape == out.texture.shape == (2, 3, 224, 224)
    assert out.landmarks.shape == (2, 68, 2)
    # Layers of Cole et al.: FC 4096 -> 1000 (f_dec), FC -> 14 x 14 x 256, 4 up-convolutions.
    assert decoder.f_dec[0].in_features == 4096 and decoder.f_dec[0].out_features == 1000
    assert isinstance(decoder.f_dec[1], torch.nn.ReLU)
    assert decoder.texture_fc[0].out_features == 14 * 14 * 256
    ups = [m for m in decoder.texture_up if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [m.out_channels for m in ups] == [128, 64, 32, 32]
    assert all(m.kernel_size == (5, 5) and m.stride == (2, 2) for m in ups)


def test_tiny_decoder_shapes_range_and_frames(face):
    torch.manual_seed(0)
    mean = face[1][0]
    decoder = FaceDecoder(FaceDecoderConfig.tiny(), mean)
    out = decoder(torch.randn(5, 128))
    assert out.image.shape == out.texture.shape == (5, 3, 64, 64)
    for t in (out.image, out.texture):
        assert t.min() >= 0 and t.max() <= 1
    # Untrained: zero offsets, the landmarks are the mean ones, in the 224 frame.
    torch.testing.assert_close(out.landmarks, mean.expand(5, 68, 2))
    code = decoder.f_dec(torch.ones(1, 128))
    assert code.shape == (1, 256) and code.min() >= 0
    # Without the warp: no image, the same texture and landmarks.
    features = torch.randn(3, 128)
    full, bare = decoder(features), decoder(features, render_image=False)
    assert bare.image is None and full.image.shape == (3, 3, 64, 64)
    assert torch.equal(bare.texture, full.texture) and torch.equal(bare.landmarks, full.landmarks)
    with pytest.raises(ValueError):
        decoder(torch.randn(5, 64))
    with pytest.raises(ValueError):
        FaceDecoder(FaceDecoderConfig.tiny(), torch.zeros(5, 2))


def test_f_dec_standardises_its_input_like_a_float64_rederivation(face):
    rng = np.random.default_rng(3)
    # Features like dlib's: a long common part, small differences between faces.
    train = rng.normal(size=128) + 0.05 * rng.normal(size=(40, 128))
    decoder = FaceDecoder(FaceDecoderConfig.tiny(), face[1][0])
    decoder.f_dec.set_standardization(torch.from_numpy(train))
    mean = train.mean(axis=0)
    spread = np.sqrt(((train - mean) ** 2).sum(axis=1).mean())
    np.testing.assert_allclose(decoder.f_dec.shift.numpy(), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(decoder.f_dec.scale), spread, rtol=1e-6)
    x = rng.normal(size=(3, 128))
    w, b = (t.detach().double().numpy() for t in (decoder.f_dec[0].weight, decoder.f_dec[0].bias))
    expected = np.maximum(((x - mean) / spread) @ w.T + b, 0)
    got = decoder.f_dec(torch.from_numpy(x).float()).detach().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # the statistics are buffers: saved and loaded with the weights
    assert {"f_dec.shift", "f_dec.scale"} <= set(decoder.state_dict())


def test_bundles_from_before_standardisation_load_unchanged(face):
    """A config without ``standardize_input`` (older bundles) builds the plain FC + ReLU."""
    old = FaceDecoderConfig.tiny().to_dict()
    del old["standardize_input"]
    decoder = FaceDecoder(FaceDecoderConfig.from_dict(old), face[1][0])
    assert not decoder.f_dec.standardize
    assert not {"f_dec.shift", "f_dec.scale"} & set(decoder.state_dict())
    x = torch.randn(2, 128)
    torch.testing.assert_close(decoder.f_dec(x), torch.relu(decoder.f_dec[0](x)))


def test_mean_landmarks_saved_with_the_weights(face):
    mean = face[1][0]
    decoder = FaceDecoder(FaceDecoderConfig.tiny(), mean)
    state = decoder.state_dict()
    assert "mean_landmarks" in state
    other = FaceDecoder(FaceDecoderConfig.tiny(), torch.zeros(68, 2))
    other.load_state_dict(state)
    torch.testing.assert_close(other.mean_landmarks, mean)


def test_crop_to_grid_maps_pixel_centres():
    points = torch.tensor([[[0.0, 223.0], [111.5, 111.5], [-0.5, 223.5]]])  # (x, y)
    grid = crop_to_grid(points, 64)
    # (row, col); pixel edges -0.5 and 223.5 map to -0.5 and 63.5.
    torch.testing.assert_close(grid, torch.tensor([[[63.3571, -0.3571], [31.5, 31.5],
                                                    [63.5, -0.5]]]), atol=1e-4, rtol=0)


def test_register_texture_puts_landmarks_on_the_mean(face):
    """Sample the registered texture at the mean landmarks: it must show what the photo
    shows at its own landmarks (checked with scipy's bilinear sampling)."""
    image, landmarks = face
    mean = smooth_deformation(landmarks[0], seed=3)
    texture = register_texture(image, landmarks, mean)
    assert texture.shape == (1, 3, 224, 224)

    def sample(img, pts):  # img (3, H, W), pts (68, 2) x, y
        coords = pts.flip(-1).T.numpy()
        return np.stack([map_coordinates(img[c].numpy(), coords, order=1) for c in range(3)])

    at_mean = sample(texture[0], mean)
    at_own = sample(image[0], landmarks[0])
    moved = sample(image[0], mean)  # what the unwarped photo has there
    err = np.abs(at_mean - at_own).mean()
    assert err < 0.03 and err < 0.5 * np.abs(moved - at_own).mean()


def test_render_inverts_register_at_small_size(face):
    """register (own -> mean) then render (mean -> own) at S = 64 gives the photo back,
    which checks that both scale the 224-frame landmarks to the 64 grid the same way."""
    image, landmarks = face
    mean = smooth_deformation(landmarks[0], seed=5)
    small = F.interpolate(image, size=(64, 64), mode="bilinear", align_corners=False,
                          antialias=True)
    texture = register_texture(image, landmarks, mean, size=64)
    back = render(texture, landmarks, mean)
    inner = (slice(None), slice(None), slice(8, 56), slice(8, 56))
    err = (back - small)[inner].abs().mean()
    unwarped = (texture - small)[inner].abs().mean()
    assert err < 0.03 and err < 0.5 * unwarped


def test_tiny_decoder_overfits_a_handful_of_faces(face):
    torch.manual_seed(0)
    image, landmarks = face
    mean = landmarks[0]
    n = 4
    shapes = torch.stack([smooth_deformation(mean, seed=i) for i in range(n)])
    tints = torch.tensor([[1.0, 1.0, 1.0], [1.2, 0.9, 0.8], [0.7, 0.8, 1.1], [0.9, 1.1, 0.9]])
    photos = render(image.expand(n, -1, -1, -1) * tints[:, :, None, None], shapes,
                    mean.expand(n, 68, 2)).clamp(0, 1)
    config = FaceDecoderConfig.tiny()
    textures = register_texture(photos, shapes, mean, size=config.image_size)
    features = torch.randn(n, config.feature_dim, generator=torch.Generator().manual_seed(1))

    decoder = FaceDecoder(config, mean)
    optimiser = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        total, terms = decoder_loss(decoder(features), textures, shapes,
                                    LossConfig(landmark_weight=100.0))
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        losses.append(total.item())
    assert losses[-1] < losses[0] / 4, (losses[0], losses[-1])
    assert terms["landmarks"] < 1e-5  # (2.2 px)^2 / 224^2 = 1e-4: well under a pixel


# ---------------------------------------------------------------------------- mixed precision


def test_register_and_render_in_float32_under_bf16_autocast(face):
    """register_texture (stage 1's targets) and render (the decoder's output) under CPU bf16
    autocast equal their float32 results within float32 rounding, for float32 inputs and for
    a bf16 texture (what the decoder's convolutions produce under autocast)."""
    image, landmarks = face
    mean = smooth_deformation(landmarks[0], seed=3)
    moved = smooth_deformation(landmarks[0], seed=4)[None]
    texture = register_texture(image, landmarks, mean, size=224)
    rendered = render(texture, moved, mean)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        texture_amp = register_texture(image, landmarks, mean, size=224)
        rendered_amp = render(texture, moved, mean)
        rendered_half = render(texture.bfloat16(), moved, mean)
    assert texture_amp.dtype == rendered_amp.dtype == rendered_half.dtype == torch.float32
    torch.testing.assert_close(texture_amp, texture, atol=1e-5, rtol=0)
    torch.testing.assert_close(rendered_amp, rendered, atol=1e-5, rtol=0)
    # A bf16 texture carries bf16 pixel values (3 significant digits) but must be sampled
    # at the right places: the error is the texture's own rounding, not misplaced pixels.
    reference = render(texture.bfloat16().float(), moved, mean)
    torch.testing.assert_close(rendered_half, reference, atol=1e-5, rtol=0)
    assert (rendered_half - rendered).abs().max() < 4e-3  # one bf16 step of a [0, 1] value


def test_decoder_outputs_are_float32_under_autocast(face):
    torch.manual_seed(0)
    decoder = FaceDecoder(FaceDecoderConfig.tiny(), face[1][0])
    features = torch.randn(3, 128)
    with torch.no_grad():
        exact = decoder(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = decoder(features)
    for name in DecodedFace._fields:
        assert getattr(mixed, name).dtype == torch.float32, name
    # The layers run in bf16 (about 3 significant digits): close to, not equal to, float32.
    torch.testing.assert_close(mixed.texture, exact.texture, atol=2e-2, rtol=0)
    torch.testing.assert_close(mixed.landmarks, exact.landmarks, atol=0.5, rtol=0)
