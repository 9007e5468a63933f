"""The face decoder loss against a float64 numpy re-derivation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from speech2face.face_decoder import DecodedFace
from speech2face.losses import LossConfig, decoder_loss


class LinearEncoder(nn.Module):
    """A differentiable stand-in face encoder: channel means of a 224 crop, then linear."""

    differentiable = True

    def __init__(self, dim: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.matrix = nn.Parameter(torch.randn(3, dim, generator=g, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.calls = []

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(crops.shape))
        assert crops.shape[-2:] == (224, 224)
        return crops.mean(dim=(2, 3)) @ self.matrix + self.bias


class FrozenEncoder(LinearEncoder):
    differentiable = False


def random_decoded(b=3, size=224, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, size, size, generator=g, dtype=torch.float64)
    texture = torch.rand(b, 3, size, size, generator=g, dtype=torch.float64)
    landmarks = torch.rand(b, 68, 2, generator=g, dtype=torch.float64) * 224
    decoded = DecodedFace(image.requires_grad_(), texture.requires_grad_(),
                          landmarks.requires_grad_())
    tex_target = torch.rand(b, 3, size, size, generator=g, dtype=torch.float64)
    lm_target = torch.rand(b, 68, 2, generator=g, dtype=torch.float64) * 224
    return decoded, tex_target, lm_target


def test_matches_numpy_with_perceptual_term():
    decoded, tex_t, lm_t = random_decoded()
    encoder = LinearEncoder()
    features = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    config = LossConfig(texture_weight=2.0, landmark_weight=3.0, perceptual_weight=0.5)
    total, terms = decoder_loss(decoded, tex_t, lm_t, config, encoder=encoder, features=features)

    tex = np.abs(decoded.texture.detach().numpy() - tex_t.numpy()).mean()
    lm = (((decoded.landmarks.detach().numpy() - lm_t.numpy()) / 224.0) ** 2).mean()
    emb = decoded.image.detach().numpy().mean(axis=(2, 3)) @ encoder.matrix.detach().numpy() \
        + encoder.bias.detach().numpy()
    f = features.numpy()
    cos = (emb * f).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(f, axis=1))
    perceptual = -cos.mean()
    assert terms["texture"].item() == pytest.approx(tex, rel=1e-12)
    assert terms["landmarks"].item() == pytest.approx(lm, rel=1e-12)
    assert terms["perceptual"].item() == pytest.approx(perceptual, rel=1e-12)
    assert total.item() == pytest.approx(2 * tex + 3 * lm + 0.5 * perceptual, rel=1e-12)

    total.backward()
    for t in decoded:
        assert t.grad is not None and t.grad.abs().sum() > 0
    # The feature target takes no gradient; the texture gradient is the L1 sign / count.
    expected = 2 * np.sign(decoded.texture.detach().numpy() - tex_t.numpy()) / tex_t.numel()
    np.testing.assert_allclose(decoded.texture.grad.numpy(), expected, rtol=1e-12)


def test_landmark_term_is_in_units_of_the_crop():
    decoded, tex_t, _ = random_decoded(b=2)
    shifted = decoded.landmarks.detach() + 2.24  # 2.24 px = 1% of the crop on each axis
    _, terms = decoder_loss(decoded, tex_t, shifted)
    assert terms["landmarks"].item() == pytest.approx(1e-4, rel=1e-9)


def test_perceptual_term_only_with_a_differentiable_encoder():
    decoded, tex_t, lm_t = random_decoded(b=2)
    features = torch.randn(2, 5, dtype=torch.float64)
    frozen = FrozenEncoder()
    total, terms = decoder_loss(decoded, tex_t, lm_t, encoder=frozen, features=features)
    assert terms["perceptual"].item() == 0 and frozen.calls == []
    total_none, _ = decoder_loss(decoded, tex_t, lm_t)
    assert total.item() == total_none.item()
    with pytest.raises(ValueError):
        decoder_loss(decoded, tex_t, lm_t, encoder=LinearEncoder())


def test_small_renders_are_resized_for_the_encoder():
    decoded, tex_t, lm_t = random_decoded(b=2, size=64)
    encoder = LinearEncoder()
    _, terms = decoder_loss(decoded, tex_t, lm_t, encoder=encoder,
                            features=torch.randn(2, 5, dtype=torch.float64))
    assert encoder.calls == [(2, 3, 224, 224)]
    assert torch.isfinite(terms["perceptual"])


def test_shape_mismatch_raises():
    decoded, tex_t, lm_t = random_decoded(b=2)
    with pytest.raises(ValueError):
        decoder_loss(decoded, tex_t[:, :, :64, :64], lm_t)
    with pytest.raises(ValueError):
        decoder_loss(decoded, tex_t, lm_t[:, :10])
