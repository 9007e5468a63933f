"""The sparse image warp against an independent float64 numpy/scipy reference.

The reference follows the semantics (docs/warp.md) of TensorFlow Addons'
``sparse_image_warp`` step by step: zero-flow border points, a polyharmonic spline fitted
to ``dest - source`` at the destination points (numpy solve, or scipy's
RBFInterpolator), evaluated at every pixel, then
``scipy.ndimage.map_coordinates(order=1, mode="nearest")`` at ``pixel - flow``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import RBFInterpolator
from scipy.ndimage import map_coordinates
from scipy.spatial.distance import cdist

from speech2face.warp import (
    boundary_points,
    dense_image_warp,
    interpolate_spline,
    solve_interpolation,
    sparse_image_warp,
)

EPS = 1e-10  # TensorFlow's clamp of the squared distance


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ref_phi(r: np.ndarray, order: int) -> np.ndarray:
    """Kernel of the distance r, with TensorFlow's clamp of r^2 at 1e-10."""
    r2 = r**2
    if order == 1:
        return np.sqrt(np.maximum(r2, EPS))
    if order == 2:
        return 0.5 * r2 * np.log(np.maximum(r2, EPS))
    if order % 2:
        return np.maximum(r2, EPS) ** (order / 2)
    m = np.maximum(r2, EPS)
    return 0.5 * m ** (order / 2) * np.log(m)


def ref_border(h: int, w: int, k: int) -> np.ndarray:
    """Border points of the (k+1) x (k+1) grid spanning the image, row-major."""
    pts = []
    for i, y in enumerate(np.linspace(0, h - 1, k + 1)):
        for j, x in enumerate(np.linspace(0, w - 1, k + 1)):
            if i in (0, k) or j in (0, k):
                pts.append((y, x))
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def ref_spline(centers, values, queries, order, reg):
    n = len(centers)
    a = ref_phi(cdist(centers, centers), order) + reg * np.eye(n)
    p = np.hstack([centers, np.ones((n, 1))])
    lhs = np.block([[a, p], [p.T, np.zeros((3, 3))]])
    rhs = np.vstack([values, np.zeros((3, values.shape[1]))])
    wv = np.linalg.solve(lhs, rhs)
    q = np.hstack([queries, np.ones((len(queries), 1))])
    return ref_phi(cdist(queries, centers), order) @ wv[:n] + q @ wv[n:]


def ref_warp(image, source, dest, order, reg, k):
    """image (B, C, H, W), points (B, N, 2) numpy float64 -> (warped, flow)."""
    b, c, h, w = image.shape
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    warped, flows = np.empty_like(image), np.empty((b, h, w, 2))
    for i in range(b):
        centers, values = dest[i], dest[i] - source[i]
        if k > 0:
            border = ref_border(h, w, k)
            centers = np.vstack([centers, border])
            values = np.vstack([values, np.zeros_like(border)])
        flow = ref_spline(centers, values, grid.astype(np.float64), order, reg)
        flows[i] = flow.reshape(h, w, 2)
        coords = (grid - flow).T
        for ch in range(c):
            warped[i, ch] = map_coordinates(image[i, ch], coords, order=1,
                                            mode="nearest").reshape(h, w)
    return warped, flows


def random_case(seed, b=3, c=2, h=13, w=17, n=6, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    image = rng.random((b, c, h, w))
    source = rng.random((b, n, 2)) * [h - 1, w - 1]
    dest = source + rng.normal(scale=1.5, size=(b, n, 2))
    return (torch.tensor(image, dtype=dtype), torch.tensor(source, dtype=dtype),
            torch.tensor(dest, dtype=dtype))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("reg", [0.0, 0.1])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_matches_reference(order, reg, k):
    image, source, dest = random_case(seed=order * 100 + k * 10 + int(reg * 10))
    warped, flow = sparse_image_warp(image, source, dest, order, reg, k)
    ref_image, ref_flow = ref_warp(image.numpy(), source.numpy(), dest.numpy(), order, reg, k)
    np.testing.assert_allclose(flow.numpy(), ref_flow, atol=1e-8)
    np.testing.assert_allclose(warped.numpy(), ref_image, atol=1e-8)
    # The warp must actually move things: the reference is not the identity.
    assert np.abs(ref_flow).max() > 0.5


@pytest.mark.parametrize("kernel,order", [("thin_plate_spline", 2), ("cubic", 3)])
@pytest.mark.parametrize("reg", [0.0, 0.05])
def test_flow_matches_scipy_rbf(kernel, order, reg):
    """A second, independent spline: scipy's RBFInterpolator (degree-1 polynomial)."""
    image, source, dest = random_case(seed=7, b=2)
    _, flow = sparse_image_warp(image, source, dest, order, reg, num_boundary_points=2)
    h, w = image.shape[-2:]
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    for i in range(2):
        centers = np.vstack([dest[i].numpy(), ref_border(h, w, 2)])
        values = np.vstack([(dest[i] - source[i]).numpy(), np.zeros((8, 2))])
        rbf = RBFInterpolator(centers, values, kernel=kernel, degree=1, smoothing=reg)
        np.testing.assert_allclose(flow[i].numpy().reshape(-1, 2), rbf(grid), atol=1e-7)


def test_float32_within_float32_precision_at_paper_size():
    """The decoder's setting (224 x 224, 68 points, order 1, reg 0.1, 2 boundary points)."""
    image, source, dest = random_case(seed=3, b=2, c=3, h=224, w=224, n=68, dtype=torch.float64)
    source = source.clamp(10, 213)
    dest = source + torch.randn(source.shape, generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64) * 4
    warped, flow = sparse_image_warp(image.float(), source.float(), dest.float(), 1, 0.1, 2)
    assert warped.dtype == flow.dtype == torch.float32
    ref_image, ref_flow = ref_warp(image.numpy(), source.numpy(), dest.numpy(), 1, 0.1, 2)
    # float32 precision: the flow is a sum of ~76 kernel terms of up to ~1e3 pixels each
    # (|w| ~ 3, r ~ 300) that cancel to a few pixels, so ~1e-4 px is float32 rounding.
    np.testing.assert_allclose(flow.numpy(), ref_flow, atol=1e-3)
    assert np.abs(flow.numpy() - ref_flow).mean() < 1e-4
    np.testing.assert_allclose(warped.numpy(), ref_image, atol=1e-3)


def test_boundary_points():
    corners = {(0.0, 0.0), (0.0, 9.0), (6.0, 0.0), (6.0, 9.0)}
    assert set(map(tuple, boundary_points(7, 10, 1).tolist())) == corners
    eight = set(map(tuple, boundary_points(7, 10, 2).tolist()))
    assert eight == corners | {(0.0, 4.5), (3.0, 0.0), (3.0, 9.0), (6.0, 4.5)}
    assert boundary_points(7, 10, 5).shape == (20, 2)
    assert boundary_points(7, 10, 0).shape == (0, 2)
    np.testing.assert_array_equal(boundary_points(8, 12, 4).numpy(), ref_border(8, 12, 4))


def test_interpolate_spline_reproduces_training_values_without_regularisation():
    rng = np.random.default_rng(0)
    points = torch.tensor(rng.random((2, 9, 2)) * 50)
    values = torch.tensor(rng.normal(size=(2, 9, 3)))
    for order in (1, 2, 3, 4):
        out = interpolate_spline(points, values, points, order)
        np.testing.assert_allclose(out.numpy(), values.numpy(), atol=1e-6)
    w, v = solve_interpolation(points, values, 2)
    assert w.shape == (2, 9, 3) and v.shape == (2, 3, 3) and w.dtype == torch.float64
    # The side conditions: weights sum to zero and are orthogonal to the centres.
    np.testing.assert_allclose(w.sum(1).numpy(), 0, atol=1e-9)
    np.testing.assert_allclose((points.transpose(1, 2) @ w).numpy(), 0, atol=1e-7)


def test_identity_when_source_equals_dest():
    image, source, _ = random_case(seed=1, dtype=torch.float32)
    for order, reg, k in [(1, 0.1, 2), (2, 0.0, 0), (3, 0.0, 1)]:
        warped, flow = sparse_image_warp(image, source, source.clone(), order, reg, k)
        assert flow.abs().max() < 1e-5
        torch.testing.assert_close(warped, image, atol=1e-5, rtol=0)


def test_translated_dot_moves_where_expected():
    h, w = 48, 64
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    dot = torch.exp(-((ys - 20) ** 2 + (xs - 30) ** 2) / 8.0)[None, None]  # centre (20, 30)
    angles = torch.linspace(0, 2 * torch.pi, 9, dtype=torch.float64)[:-1]
    source = torch.stack([20 + 6 * angles.sin(), 30 + 6 * angles.cos()], -1)[None]
    shift = torch.tensor([5.0, -7.0], dtype=torch.float64)
    warped, flow = sparse_image_warp(dot, source, source + shift, interpolation_order=2)
    # A pure translation is in the spline's affine part: the whole flow is the shift.
    torch.testing.assert_close(flow, shift.expand(1, h, w, 2), atol=1e-8, rtol=0)
    peak = divmod(int(warped[0, 0].argmax()), w)
    assert peak == (25, 23)
    torch.testing.assert_close(warped[0, 0, 5:, :57], dot[0, 0, :-5, 7:], atol=1e-8, rtol=0)


def test_dense_image_warp_matches_map_coordinates_and_clamps_at_edges():
    rng = np.random.default_rng(5)
    image = rng.random((2, 3, 9, 11))
    # Large flows send many samples far outside the image; some land exactly on pixels.
    flow = rng.normal(scale=6, size=(2, 9, 11, 2))
    flow[0, :3] = np.round(flow[0, :3])
    flow[1, 0, 0] = [-(8 - 0), -(10 - 0)]  # sample exactly at the last pixel
    out = dense_image_warp(torch.tensor(image), torch.tensor(flow)).numpy()
    grid = np.stack(np.meshgrid(np.arange(9), np.arange(11), indexing="ij"), -1)
    for b in range(2):
        coords = (grid - flow[b]).reshape(-1, 2).T
        for c in range(3):
            ref = map_coordinates(image[b, c], coords, order=1, mode="nearest").reshape(9, 11)
            np.testing.assert_allclose(out[b, c], ref, atol=1e-12)
    assert out[1, :, 0, 0] == pytest.approx(image[1, :, 8, 10])


def test_gradcheck_through_image_and_points():
    image, source, dest = random_case(seed=11, b=2, c=1, h=5, w=6, n=4)
    image.requires_grad_()
    source.requires_grad_()
    dest.requires_grad_()
    for order in (1, 2, 3):
        def fn(img, src, dst, order=order):
            warped, flow = sparse_image_warp(img, src, dst, order, 0.1, 2)
            return warped, flow

        assert torch.autograd.gradcheck(fn, (image, source, dest), atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda img, src, dst: sparse_image_warp(img, src, dst, 2, 0.0, 0),
        (image, source, dest), atol=1e-6)


def test_gradients_reach_points_in_float32():
    image, source, dest = random_case(seed=2, b=2, c=3, h=32, w=40, n=10, dtype=torch.float32)
    source.requires_grad_()
    dest.requires_grad_()
    image.requires_grad_()
    warped, _ = sparse_image_warp(image, source, dest, 1, 0.1, 2)
    warped.square().sum().backward()
    for t in (image, source, dest):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_bad_shapes_raise():
    image, source, dest = random_case(seed=0)
    with pytest.raises(ValueError):
        sparse_image_warp(image, source, dest[:, :-1])
    with pytest.raises(ValueError):
        sparse_image_warp(image[0], source, dest)
    with pytest.raises(ValueError):
        sparse_image_warp(image, source, dest, interpolation_order=0)
    with pytest.raises(ValueError):
        dense_image_warp(image[:, :, :1], torch.zeros(3, 1, 17, 2, dtype=torch.float64))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_point_gradients_with_centres_on_pixels(order):
    """Integer control points put pixels exactly on the centres, where the kernel's clamp is
    active (gradcheck's finite differences are meaningless at that kink). Compare with
    plain autograd of TensorFlow's formula, written here independently."""
    h, w = 6, 8
    rng = np.random.default_rng(order)
    # Exactly on pixels, within the clamp's reach of one (1e-6 px: r^2 < 1e-10), and off-grid.
    dest = torch.tensor([[[1.0, 2.0], [4.0, 6.0 + 1e-6], [2.0, 5.0], [3.3, 1.7]]],
                        dtype=torch.float64)
    source = dest + torch.tensor(rng.normal(size=(1, 4, 2)))
    weights = torch.tensor(rng.normal(size=(1, h, w, 2)))

    def tf_phi(r2):
        if order == 1:
            return torch.sqrt(torch.maximum(r2, torch.tensor(EPS, dtype=r2.dtype)))
        if order == 2:
            return 0.5 * r2 * torch.log(torch.maximum(r2, torch.tensor(EPS, dtype=r2.dtype)))
        return torch.maximum(r2, torch.tensor(EPS, dtype=r2.dtype)) ** 1.5

    def reference_flow(src, dst):
        n = dst.shape[1]
        r2 = ((dst[0, :, None] - dst[0, None, :]) ** 2).sum(-1)
        a = tf_phi(r2) + 0.1 * torch.eye(n, dtype=r2.dtype)
        p = torch.cat([dst[0], torch.ones(n, 1, dtype=r2.dtype)], 1)
        lhs = torch.cat([torch.cat([a, p], 1), torch.cat([p.T, torch.zeros(3, 3)], 1)], 0)
        rhs = torch.cat([dst[0] - src[0], torch.zeros(3, 2)], 0)
        wv = torch.linalg.solve(lhs, rhs)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=r2.dtype), torch.arange(w, dtype=r2.dtype),
                                indexing="ij")
        q = torch.stack([ys, xs], -1).reshape(-1, 2)
        q2 = ((q[:, None] - dst[0][None]) ** 2).sum(-1)
        flow = tf_phi(q2) @ wv[:n] + torch.cat([q, torch.ones(h * w, 1)], 1) @ wv[n:]
        return flow.reshape(1, h, w, 2)

    grads = []
    for fn in (lambda s, d: sparse_image_warp(torch.zeros(1, 1, h, w, dtype=torch.float64), s, d,
                                              order, 0.1)[1], reference_flow):
        s, d = source.clone().requires_grad_(), dest.clone().requires_grad_()
        (fn(s, d) * weights).sum().backward()
        grads.append((s.grad, d.grad))
    for ours, ref in zip(grads[0], grads[1], strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-9)


# ---------------------------------------------------------------------------- mixed precision


def test_bf16_autocast_leaves_the_warp_in_float32():
    """Under CPU bf16 autocast (what ``amp=auto`` does on a GPU) the warp of a float32 batch
    equals the float64 reference within the same float32 tolerance as without autocast;
    before the fix it differed by 0.16 on average."""
    image, source, dest = random_case(seed=3, b=2, c=3, h=64, w=64, n=20, dtype=torch.float64)
    source = source.clamp(5, 58)
    dest = source + torch.randn(source.shape, generator=torch.Generator().manual_seed(1),
                                dtype=torch.float64) * 3
    ref_image, ref_flow = ref_warp(image.numpy(), source.numpy(), dest.numpy(), 1, 0.1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        warped, flow = sparse_image_warp(image.float(), source.float(), dest.float(), 1, 0.1, 2)
    assert warped.dtype == flow.dtype == torch.float32
    np.testing.assert_allclose(flow.numpy(), ref_flow, atol=1e-3)
    np.testing.assert_allclose(warped.numpy(), ref_image, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_image_is_sampled_at_integer_indices(dtype):
    """A half-precision texture (the decoder's convolutions under autocast): an identity
    warp of a 300-pixel-wide image returns each pixel itself. bf16 cannot count past 256,
    so a gather index computed in the image's dtype samples the wrong pixel (an error of
    a neighbour's difference, ~0.3 here); sampling computes in float32 with coordinates
    normalised to [-1, 1], which leaves ~1e-5."""
    h, w = 4, 300
    image = torch.rand(1, 2, h, w, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dense_image_warp(image, torch.zeros(1, h, w, 2, dtype=dtype))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, image.float(), atol=1e-4, rtol=0)
    # And a one-pixel shift to the right by the sparse warp.
    source = torch.tensor([[[1.0, 100.0], [2.0, 280.0], [1.5, 20.0]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shifted, flow = sparse_image_warp(image, source, source + torch.tensor([0.0, 1.0]),
                                          interpolation_order=2)
    torch.testing.assert_close(flow, torch.tensor([0.0, 1.0]).expand(1, h, w, 2), atol=1e-3, rtol=0)
    torch.testing.assert_close(shifted[..., 1:], image.float()[..., :-1], atol=2e-3, rtol=0)


def _warp_and_gradients(threads: int):
    """Forward and every gradient of a paper-size warp on ``threads`` torch threads."""
    from speech2face.runtime import torch_threads

    g = torch.Generator().manual_seed(4)
    image = torch.rand(2, 3, 96, 96, generator=g, requires_grad=True)
    source = 20 + 56 * torch.rand(2, 68, 2, generator=g)
    dest = (source + 3 * torch.randn(2, 68, 2, generator=g)).requires_grad_()
    source.requires_grad_()
    with torch_threads(threads):
        warped, flow = sparse_image_warp(image, source, dest, 1, 0.1, 2)
        (warped * torch.linspace(-1, 1, warped.numel()).view_as(warped)).sum().backward()
        assert torch.get_num_threads() == threads  # restored after the chunk tasks
    return warped.detach(), flow.detach(), image.grad, source.grad, dest.grad


def test_chunk_tasks_give_the_same_bits_for_any_thread_count(monkeypatch):
    """On several threads the spline's row chunks run as tasks, one torch thread each,
    and the backward pass adds the chunks' sums in chunk order: the same bits as one
    thread. Small chunks, so that there are many."""
    import speech2face.warp as warp_module

    monkeypatch.setattr(warp_module, "_CHUNK_ELEMENTS", 1 << 14)
    one, three = _warp_and_gradients(1), _warp_and_gradients(3)
    for a, b in zip(one, three, strict=True):
        assert torch.equal(a, b)


def test_chunk_tasks_run_in_the_callers_inference_mode(monkeypatch):
    """Inference mode belongs to a thread: the tasks must take the caller's (writing
    into a tensor made in inference mode is refused outside it)."""
    import speech2face.warp as warp_module
    from speech2face.runtime import torch_threads

    monkeypatch.setattr(warp_module, "_CHUNK_ELEMENTS", 1 << 14)  # several chunks

    image = torch.rand(1, 3, 64, 64)
    points = 10 + 40 * torch.rand(1, 68, 2, generator=torch.Generator().manual_seed(2))
    with torch_threads(1), torch.inference_mode():
        one, _ = sparse_image_warp(image, points, points + 1.0, 1, 0.1, 2)
    with torch_threads(2), torch.inference_mode():
        two, _ = sparse_image_warp(image, points, points + 1.0, 1, 0.1, 2)
    assert torch.equal(one, two)
