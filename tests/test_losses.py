"""Voice encoder loss (paper eq. 1) against an independent float64 re-derivation."""

import numpy as np
import pytest
import torch
from torch import nn

from speech2face.losses import LAMBDA1, LAMBDA2, TEMPERATURE, speech2face_loss


def reference_loss(pred, target, w_dec, b_dec, w_cls, b_cls, l1=0.025, l2=200.0, T=2.0):
    """Eq. 1 in float64 numpy, one sample at a time, written from the paper's formula."""
    total = np.zeros(3)
    for vs, vf in zip(pred.astype(np.float64), target.astype(np.float64), strict=True):
        dec = lambda v: np.maximum(w_dec @ v + b_dec, 0)  # noqa: E731
        decoder = np.sum(np.abs(dec(vf) - dec(vs)))
        unit = lambda v: v / max(np.sqrt(np.sum(v * v)), 1e-12)  # noqa: E731
        feature = np.sum((unit(vf) - unit(vs)) ** 2)
        za, zb = (w_cls @ vf + b_cls) / T, (w_cls @ vs + b_cls) / T
        p = np.exp(za - za.max()) / np.exp(za - za.max()).sum()
        log_q = zb - zb.max() - np.log(np.exp(zb - zb.max()).sum())
        distill = -np.sum(p * log_q)
        total += [decoder, feature, distill]
    decoder, feature, distill = total / len(pred)
    return decoder + l1 * feature + l2 * distill, (decoder, feature, distill)


def make_heads(dim=16, hidden=10, classes=7, seed=0):
    torch.manual_seed(seed)
    f_dec = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
    f_cls = nn.Linear(dim, classes)
    return f_dec, f_cls


def numpy_weights(f_dec, f_cls):
    return [
        t.detach().double().numpy()
        for t in (f_dec[0].weight, f_dec[0].bias, f_cls.weight, f_cls.bias)
    ]


def test_constants_are_the_papers():
    assert (LAMBDA1, LAMBDA2, TEMPERATURE) == (0.025, 200.0, 2.0)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_matches_float64_reference(scale):
    f_dec, f_cls = make_heads()
    rng = np.random.default_rng(1)
    pred = (scale * rng.standard_normal((5, 16))).astype(np.float32)
    target = (scale * rng.standard_normal((5, 16))).astype(np.float32)
    total, terms = speech2face_loss(torch.from_numpy(pred), torch.from_numpy(target), f_dec, f_cls)
    ref_total, (d, f, k) = reference_loss(pred, target, *numpy_weights(f_dec, f_cls))
    assert total.item() == pytest.approx(ref_total, rel=1e-5)
    assert terms["decoder"].item() == pytest.approx(d, rel=1e-5)
    assert terms["feature"].item() == pytest.approx(f, rel=1e-5)
    assert terms["distill"].item() == pytest.approx(k, rel=1e-5)


def test_custom_weights_and_no_classifier():
    f_dec, f_cls = make_heads()
    pred, target = torch.randn(4, 16), torch.randn(4, 16)
    _, terms = speech2face_loss(pred, target, f_dec, f_cls)
    total, _ = speech2face_loss(
        pred, target, f_dec, f_cls, lambda1=1.0, lambda2=0.5, temperature=2.0
    )
    expected = terms["decoder"] + terms["feature"] + 0.5 * terms["distill"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total, terms = speech2face_loss(pred, target, f_dec, None)
    assert terms["distill"].item() == 0
    assert total.item() == pytest.approx((terms["decoder"] + 0.025 * terms["feature"]).item())


def test_per_sample_normalisation_not_batch_or_sign():
    # A sample scaled by 100 has the same direction: its feature term is unchanged.
    f_dec, f_cls = make_heads()
    target = torch.randn(2, 16)
    pred = torch.randn(2, 16)
    _, a = speech2face_loss(pred, target, f_dec, f_cls)
    _, b = speech2face_loss(pred * torch.tensor([[100.0], [1.0]]), target, f_dec, f_cls)
    assert a["feature"].item() == pytest.approx(b["feature"].item(), rel=1e-5)
    # Identical directions give zero even where signs of elements match only (not a/|a|).
    _, c = speech2face_loss(target * 3.0, target, f_dec, f_cls)
    assert c["feature"].item() == pytest.approx(0.0, abs=1e-10)


def test_zero_features_do_not_give_nan():
    f_dec, f_cls = make_heads()
    pred = torch.zeros(3, 16, requires_grad=True)
    target = torch.zeros(3, 16)
    target[0] = 1.0
    total, terms = speech2face_loss(pred, target, f_dec, f_cls)
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(t) for t in terms.values())
    assert torch.isfinite(pred.grad).all()


def test_gradients_flow_to_pred_only():
    f_dec, f_cls = make_heads()
    pred = torch.randn(4, 16, requires_grad=True)
    target = torch.randn(4, 16, requires_grad=True)
    total, _ = speech2face_loss(pred, target, f_dec, f_cls)
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None
    assert all(p.grad is None for p in [*f_dec.parameters(), *f_cls.parameters()])


def test_gradient_matches_finite_differences_of_reference():
    f_dec, f_cls = make_heads()
    rng = np.random.default_rng(3)
    pred = rng.standard_normal((2, 16))
    target = rng.standard_normal((2, 16))
    w = numpy_weights(f_dec, f_cls)
    p = torch.tensor(pred, dtype=torch.float64, requires_grad=True)
    speech2face_loss(p, torch.tensor(target), f_dec.double(), f_cls.double())[0].backward()
    eps = 1e-6
    numeric = np.zeros_like(pred)
    for idx in np.ndindex(pred.shape):
        hi, lo = pred.copy(), pred.copy()
        hi[idx] += eps
        lo[idx] -= eps
        numeric[idx] = (reference_loss(hi, target, *w)[0] - reference_loss(lo, target, *w)[0]) / (
            2 * eps
        )
    np.testing.assert_allclose(p.grad.numpy(), numeric, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("closeness", [0.0, 0.99, 0.999])
def test_feature_term_of_a_bf16_prediction_is_taken_in_float32(closeness):
    """v_s from an encoder under bf16 autocast: the feature term is that of its values
    (float64 reference on the same rounded numbers), not of a bf16 normalisation (off by
    130 % near cos 0.999)."""
    f_dec, f_cls = make_heads()
    rng = np.random.default_rng(4)
    target = rng.standard_normal((6, 16)).astype(np.float32)
    pred = closeness * target + (1 - closeness) * rng.standard_normal((6, 16)).astype(np.float32)
    pred_bf16 = torch.from_numpy(pred).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training runs it
        _, terms = speech2face_loss(pred_bf16, torch.from_numpy(target), f_dec, f_cls)
    _, (_, feature, _) = reference_loss(pred_bf16.float().numpy(), target,
                                        *numpy_weights(f_dec, f_cls))
    assert terms["feature"].item() == pytest.approx(feature, rel=1e-4)
