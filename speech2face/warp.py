"""Differentiable sparse image warp: a polyharmonic spline flow field plus bilinear sampling.

The face decoder (Cole et al., CVPR 2017) renders a face by warping its registered
texture from the mean landmarks to the predicted ones; the original code used
TensorFlow's ``sparse_image_warp`` with ``interpolation_order=1``,
``regularization_weight=0.1`` and ``num_boundary_points=2``. This module has the same
semantics (docs/warp.md):

1. ``flow = dest - source`` at each control point; ``num_boundary_points = k > 0`` adds
   zero-flow points on the border of the grid ``linspace(0, H-1, k+1) x
   linspace(0, W-1, k+1)`` (k = 1: the corners; k = 2: corners and edge midpoints).
2. A polyharmonic spline (kernel ``phi``, regularisation on the kernel matrix's
   diagonal, affine term) is fitted to the flows **at the destination points** and
   evaluated at every pixel: the dense flow ``(B, H, W, 2)``.
3. ``output(y, x) = input(y - flow_y, x - flow_x)``, bilinear, with the lower corner
   clamped to ``[0, size - 2]`` and the fraction to ``[0, 1]`` (outside samples take the
   edge value).

Points and flows are (row, col) pixel coordinates; images are ``(B, C, H, W)``.

Where we differ from TensorFlow, we are more exact, not different: the small spline
system is built from direct coordinate differences and solved in float64 (TensorFlow
expands ``|a - b|^2 = |a|^2 - 2ab + |b|^2`` in float32, whose rounding error near 224
pixels is far above the kernel's epsilon), and the dense evaluation uses the separable
pixel grid instead of the same expansion.

Precision: every function here computes in (at least) float32 whatever the autocast
state; autocast is switched off inside, because bf16 flows move samples by whole pixels
and a bf16 pixel coordinate cannot even address pixel 257. The pixel grid is made of
integers, then converted to float32.

Speed: the dense evaluation (``H * W * N`` kernel values) dominates. It runs in row
chunks that stay in cache, with a hand-written backward pass that recomputes the
kernel per chunk instead of storing ``(B, H*W, N)`` intermediates for autograd. On a
CPU with several torch threads the chunks are tasks: each thread takes the next chunk
when it is free and runs it alone (one-thread operations), instead of every operation
of every chunk being split across the threads, which then wait for each other hundreds
of times per call: on a machine whose cores are shared with other processes, a thread
that the system pauses held all the others up (2 threads beside one busy process were
slower than 1). A chunk's result does not depend on which thread runs it, nor on how
many there are: the backward pass's per-chunk sums are added in chunk order.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

# TensorFlow Addons' interpolate_spline: squared distances are clamped to this before
# sqrt / log, so that phi and its gradient stay finite at r = 0.
KERNEL_EPSILON = 1e-10

# Elements of the (B, rows, W, N) kernel block evaluated at once: about 4 MB in float32,
# small enough to stay in a CPU's cache between the kernel and the matmul.
_CHUNK_ELEMENTS = 1 << 20


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the warp computes in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _no_autocast(tensor: torch.Tensor):
    """Autocast switched off for ``tensor``'s device: the warp runs in its own precision."""
    return torch.autocast(tensor.device.type, enabled=False)


def _check_order(order: int) -> int:
    if isinstance(order, bool) or int(order) != order or order < 1:
        raise ValueError(f"interpolation_order must be an integer >= 1, got {order!r}")
    return int(order)


def phi(r2: torch.Tensor, order: int) -> torch.Tensor:
    """The polyharmonic kernel as a function of the SQUARED distance ``r2`` (any shape).

    ``r`` for order 1, ``r^2 log r`` for order 2 (the thin-plate spline), ``r^k`` for odd
    ``k`` and ``r^k log r`` for even ``k``, with TensorFlow's clamping of ``r2`` to
    :data:`KERNEL_EPSILON` (orders 2 and 4 clamp only inside the log, as TensorFlow does).
    """
    order = _check_order(order)
    if order == 1:
        return r2.clamp_min(KERNEL_EPSILON).sqrt()
    if order in (2, 4):
        # r^k log r = 0.5 * (r^2)^(k/2) * log(r^2)
        return 0.5 * r2.pow(order // 2) * r2.clamp_min(KERNEL_EPSILON).log()
    m = r2.clamp_min(KERNEL_EPSILON)
    if order % 2 == 0:
        return 0.5 * m.pow(0.5 * order) * m.log()
    return m.pow(0.5 * order)


def _phi_and_grad_(r2: torch.Tensor, order: int, need_grad: bool):
    """``phi(r2)`` computed in place into ``r2`` and, if asked, ``d phi / d r2`` (order > 1).

    The derivative is that of :func:`phi` including the clamp (zero where r2 < epsilon),
    matching what autograd gives for TensorFlow's formulation.
    """
    grad = None
    if order == 1:
        # The derivative, 0.5 / phi, is formed from the kernel itself by the backward pass.
        if need_grad:
            raise ValueError("order 1 derivative is taken from the kernel value")
        return r2.clamp_min_(KERNEL_EPSILON).sqrt_(), None
    if order in (2, 4):
        p = order // 2
        inside = r2 > KERNEL_EPSILON
        log_m = r2.clamp_min(KERNEL_EPSILON).log_()
        if need_grad:
            # d/dr2 [0.5 r2^p log m] = 0.5 p r2^(p-1) log m + 0.5 r2^p / r2 * [r2 > eps]
            rp1 = r2.pow(p - 1) if p > 1 else torch.ones_like(r2)
            grad = rp1 * (0.5 * p) * log_m + 0.5 * rp1 * inside
        value = log_m.mul_(r2.pow(p) if p > 1 else r2).mul_(0.5)
        return value, grad
    inside = r2 > KERNEL_EPSILON
    m = r2.clamp_min_(KERNEL_EPSILON)
    half = 0.5 * order
    if order % 2 == 0:
        log_m = m.log()
        if need_grad:
            grad = (0.5 * m.pow(half - 1) * (half * log_m + 1)) * inside
        return log_m.mul_(m.pow(half)).mul_(0.5), grad
    if need_grad:
        grad = (half * m.pow(half - 1)) * inside
    return m.pow_(half), grad


def boundary_points(height: int, width: int, num_boundary_points: int,
                    dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Zero-flow control points on the image border, ``(P, 2)`` (row, col).

    The border points of the grid ``linspace(0, H-1, k+1) x linspace(0, W-1, k+1)``:
    none for k = 0, the 4 corners for k = 1, corners and edge midpoints (8) for k = 2,
    ``4k`` points in general (TensorFlow Addons' ``num_boundary_points``).
    """
    if num_boundary_points <= 0:
        return torch.zeros(0, 2, dtype=dtype, device=device)
    k = int(num_boundary_points)
    rows = torch.linspace(0, height - 1, k + 1, dtype=torch.float64)
    cols = torch.linspace(0, width - 1, k + 1, dtype=torch.float64)
    ys, xs = torch.meshgrid(rows, cols, indexing="ij")
    on_border = torch.zeros(k + 1, k + 1, dtype=torch.bool)
    on_border[0, :] = on_border[-1, :] = on_border[:, 0] = on_border[:, -1] = True
    points = torch.stack([ys[on_border], xs[on_border]], dim=-1)  # (4k, 2), row-major order
    return points.to(dtype=dtype, device=device)


def solve_interpolation(train_points: torch.Tensor, train_values: torch.Tensor, order: int,
                        regularization_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of the polyharmonic spline through ``(train_points, train_values)``.

    Solves, per batch item, the ``(N + D + 1)`` square system ``[[A + lambda I, P],
    [P^T, 0]] [w; v] = [f; 0]`` with ``A_ij = phi(|c_i - c_j|^2)`` and ``P = [c, 1]``, in
    float64 (with order >= 3 and distances of hundreds of pixels the float32 system is
    ill-conditioned). Differentiable in both inputs.

    Args:
        train_points: ``(B, N, D)`` centres ``c``.
        train_values: ``(B, N, K)`` values ``f`` at the centres.
        order: polyharmonic order (1: ``r``, 2: thin-plate ``r^2 log r``, 3: ``r^3``, ...).
        regularization_weight: ``lambda``, added to the kernel matrix's diagonal.

    Returns:
        ``(w, v)``: ``(B, N, K)`` kernel weights and ``(B, D + 1, K)`` affine weights (the
        last row is the constant term), both float64 (float32 on MPS, which has no float64).
    """
    order = _check_order(order)
    if train_points.dim() != 3 or train_values.dim() != 3 or \
            train_points.shape[:2] != train_values.shape[:2]:
        raise ValueError(f"train_points (B, N, D) and train_values (B, N, K) must agree, got "
                         f"{tuple(train_points.shape)} and {tuple(train_values.shape)}")
    device = train_points.device
    # Apple's MPS has no float64: solve that small system on the CPU.
    solve_device = torch.device("cpu") if device.type == "mps" else device
    c = train_points.to(solve_device, torch.float64)
    f = train_values.to(solve_device, torch.float64)
    b, n, d = c.shape
    k = f.shape[-1]
    # Direct differences: the diagonal is exactly 0, unlike the |a|^2 - 2ab + |b|^2 form.
    r2 = (c.unsqueeze(2) - c.unsqueeze(1)).pow(2).sum(-1)  # (B, N, N)
    a = phi(r2, order)
    if regularization_weight > 0:
        a = a + regularization_weight * torch.eye(n, dtype=a.dtype, device=a.device)
    p = torch.cat([c, c.new_ones(b, n, 1)], dim=2)  # (B, N, D+1)
    top = torch.cat([a, p], dim=2)  # (B, N, N+D+1)
    bottom = torch.cat([p.transpose(1, 2), c.new_zeros(b, d + 1, d + 1)], dim=2)
    lhs = torch.cat([top, bottom], dim=1)  # (B, N+D+1, N+D+1)
    rhs = torch.cat([f, f.new_zeros(b, d + 1, k)], dim=1)  # (B, N+D+1, K)
    wv = torch.linalg.solve(lhs, rhs)
    if solve_device != device:
        wv = wv.to(device, torch.float32)
    return wv[:, :n], wv[:, n:]


def apply_interpolation(query_points: torch.Tensor, train_points: torch.Tensor, w: torch.Tensor,
                        v: torch.Tensor, order: int) -> torch.Tensor:
    """Evaluate a fitted spline at arbitrary query points (plain autograd).

    Args:
        query_points: ``(B, M, D)``; train_points: ``(B, N, D)``; ``w``: ``(B, N, K)``;
        ``v``: ``(B, D + 1, K)`` from :func:`solve_interpolation`.

    Returns:
        ``(B, M, K)`` in the dtype of ``query_points``. For a full pixel grid use
        :func:`interpolate_grid`, which is much faster.
    """
    dtype = query_points.dtype
    c, w, v = train_points.to(dtype), w.to(dtype), v.to(dtype)
    r2 = (query_points.unsqueeze(2) - c.unsqueeze(1)).pow(2).sum(-1)  # (B, M, N)
    return phi(r2, order) @ w + query_points @ v[:, :-1] + v[:, -1:]


def interpolate_spline(train_points: torch.Tensor, train_values: torch.Tensor,
                       query_points: torch.Tensor, order: int,
                       regularization_weight: float = 0.0) -> torch.Tensor:
    """Fit a polyharmonic spline to ``(train_points, train_values)``, evaluate at ``query_points``.

    Shapes: ``(B, N, D)``, ``(B, N, K)``, ``(B, M, D)`` -> ``(B, M, K)``.
    """
    w, v = solve_interpolation(train_points, train_values, order, regularization_weight)
    return apply_interpolation(query_points, train_points, w, v, order)


def _grid_deltas(centers: torch.Tensor, height: int, width: int):
    """Row and column offsets from every grid line to every centre: (B, H, N), (B, W, N)."""
    rows = torch.arange(height, dtype=centers.dtype, device=centers.device)
    cols = torch.arange(width, dtype=centers.dtype, device=centers.device)
    dy = rows[None, :, None] - centers[:, None, :, 0]
    dx = cols[None, :, None] - centers[:, None, :, 1]
    return dy, dx


def _rows_per_chunk(batch: int, width: int, n: int, device: torch.device) -> int:
    # On an accelerator, memory is plentiful and each chunk costs kernel launches instead.
    elements = _CHUNK_ELEMENTS if device.type == "cpu" else 32 * _CHUNK_ELEMENTS
    return max(1, elements // max(1, batch * width * n))


# Held while the chunks of one call run as tasks: torch's thread count is global to the
# process, and is set to 1 for the duration.
_TASKS = threading.Lock()
# The task threads, kept between calls (starting them costs milliseconds): (count, pool).
_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_pool)


def _task_pool(threads: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL[0] != threads:
        if _POOL is not None:
            _POOL[1].shutdown(wait=False)
        _POOL = (threads, ThreadPoolExecutor(threads, thread_name_prefix="speech2face-warp"))
    return _POOL[1]


def _map_chunks(fn, height: int, step: int, device: torch.device) -> list:
    """``[fn(r0, r1) for each chunk of rows]``, in chunk order.

    On a CPU with more than one torch thread (and no other call doing the same), the
    chunks are tasks on that many Python threads, each taking the next chunk as it
    frees up, with torch's operations on one thread meanwhile (they release the GIL).
    ``fn`` must write only its own rows of shared outputs and return the rest.
    """
    chunks = [(r0, min(r0 + step, height)) for r0 in range(0, height, step)]
    before = torch.get_num_threads()
    threads = min(before, len(chunks)) if device.type == "cpu" else 1
    if threads < 2 or not _TASKS.acquire(blocking=False):
        return [fn(r0, r1) for r0, r1 in chunks]
    # Grad and inference modes belong to a thread: the tasks run in the caller's.
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def task(chunk: tuple[int, int]):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(*chunk)

    try:
        torch.set_num_threads(1)
        return list(_task_pool(threads).map(task, chunks))
    finally:
        torch.set_num_threads(before)
        _TASKS.release()


class _ChunkDistances:
    """``r2(r0, r1)``: squared distances from the pixels of grid rows ``r0:r1`` to every
    centre, ``(B, r, W, N)``, from the separable ``dy2 (B, H, N)`` and ``dx2 (B, W, N)``.

    Written into one kernel block per thread, reused by its chunks: a fresh
    multi-megabyte allocation per chunk costs page faults comparable to the arithmetic.
    """

    def __init__(self, dy2: torch.Tensor, dx2: torch.Tensor, rows: int):
        self.dy2, self.dx2, self.local = dy2, dx2, threading.local()
        self.shape = (dy2.shape[0], rows, dx2.shape[1], dy2.shape[2])

    def r2(self, r0: int, r1: int) -> torch.Tensor:
        if not hasattr(self.local, "block"):
            self.local.block = self.dy2.new_empty(self.shape)
        return torch.add(self.dy2[:, r0:r1, None, :], self.dx2[:, None, :, :],
                         out=self.local.block[:, : r1 - r0])


def _sum_in_order(tensors) -> torch.Tensor:
    """The chunks' partial sums added first to last (the same bits for any thread count)."""
    tensors = iter(tensors)
    total = next(tensors).clone()
    for tensor in tensors:
        total += tensor
    return total


class _GridRBF(torch.autograd.Function):
    """``out[b, :, y, x] = sum_i phi(|(y, x) - c_bi|^2) w_bi``: the kernel part on the grid.

    The squared distance is separable, ``(y - cy)^2 + (x - cx)^2``, so a chunk of rows is
    one broadcast add; the backward pass recomputes each chunk rather than keeping the
    ``(B, H*W, N)`` kernel matrix alive between the passes.
    """

    @staticmethod
    def forward(ctx, centers, w, height, width, order):
        b, n, _ = centers.shape
        k = w.shape[-1]
        dy, dx = _grid_deltas(centers, height, width)
        dy2, dx2 = dy.square(), dx.square()
        # Channels first: w^T @ kern^T, (K, N) x (N, rows*W), is several times faster than
        # kern @ w with its two output columns.
        out = centers.new_empty(b, k, height, width)
        w_t = w.transpose(1, 2).contiguous()  # (B, K, N)
        step = _rows_per_chunk(b, width, n, centers.device)
        distances = _ChunkDistances(dy2, dx2, min(step, height))

        def chunk(r0: int, r1: int) -> None:
            kern, _ = _phi_and_grad_(distances.r2(r0, r1), order, need_grad=False)
            out[:, :, r0:r1] = torch.bmm(w_t, kern.view(b, -1, n).transpose(1, 2)).view(
                b, k, r1 - r0, width)

        _map_chunks(chunk, height, step, centers.device)
        ctx.save_for_backward(centers, w)
        ctx.grid = (height, width, order)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        centers, w = ctx.saved_tensors
        height, width, order = ctx.grid
        b, n, _ = centers.shape
        grad_out = grad_out.contiguous()  # (B, K, H, W)
        need_c, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy, dx = _grid_deltas(centers, height, width)
        dy2, dx2 = dy.square(), dx.square()
        # d(loss)/d(r2) summed over columns, per row (each chunk writes its rows).
        m_rows = centers.new_zeros(b, height, n) if need_c else None
        # Order 1: d sqrt(r2) / d r2 = 0.5 / sqrt(r2), zero where the clamp is active, i.e.
        # at a pixel lying on a centre; only chunks with such a row need the mask.
        near_rows = (dy2 <= KERNEL_EPSILON).any(-1) if order == 1 else None  # (B, H)
        near_cols = bool((dx2 <= KERNEL_EPSILON).any()) if order == 1 else False
        step = _rows_per_chunk(b, width, n, centers.device)
        distances = _ChunkDistances(dy2, dx2, min(step, height))

        def chunk(r0: int, r1: int) -> tuple:
            """This chunk's g^T kern (B, K, N) (the big kernel block is never transposed)
            and its d(loss)/d(r2) summed over rows, per column (B, W, N)."""
            g_t = grad_out[:, :, r0:r1].reshape(b, w.shape[-1], -1)  # (B, K, r*W)
            r2 = distances.r2(r0, r1)  # (B, r, W, N)
            on_centre = None
            if need_c and order == 1 and near_cols and bool(near_rows[:, r0:r1].any()):
                on_centre = r2 <= KERNEL_EPSILON
            kern, dkern = _phi_and_grad_(r2, order, need_grad=need_c and order != 1)
            grad_wt = torch.bmm(g_t, kern.view(b, -1, n)) if need_w else None
            if not need_c:
                return grad_wt, None
            m = torch.bmm(g_t.transpose(1, 2), w.transpose(1, 2)).view_as(kern)  # dL/dphi
            if order == 1:
                m.div_(kern).mul_(0.5)
                if on_centre is not None:
                    m.masked_fill_(on_centre, 0)
            else:
                m.mul_(dkern)
            m_rows[:, r0:r1] = m.sum(2)
            return grad_wt, m.sum(1)

        parts = _map_chunks(chunk, height, step, centers.device)
        grad_w = _sum_in_order(p[0] for p in parts).transpose(1, 2) if need_w else None
        grad_c = None
        if need_c:
            m_cols = _sum_in_order(p[1] for p in parts)
            # d r2 / d c = -2 (p - c), summed over the pixels p.
            grad_c = torch.stack([(m_rows * dy).sum(1), (m_cols * dx).sum(1)], dim=-1).mul_(-2)
        return grad_c, grad_w, None, None, None


def interpolate_grid(train_points: torch.Tensor, train_values: torch.Tensor, height: int,
                     width: int, order: int, regularization_weight: float = 0.0) -> torch.Tensor:
    """Fit a polyharmonic spline and evaluate it at every pixel of an ``H x W`` grid.

    Args:
        train_points: ``(B, N, 2)`` (row, col) centres.
        train_values: ``(B, N, K)`` values at the centres.

    Returns:
        ``(B, H, W, K)``, in the floating dtype of ``train_values`` (at least float32),
        computed without autocast.
    """
    dtype = _float_dtype(train_values.dtype)
    with _no_autocast(train_points):
        w, v = solve_interpolation(train_points, train_values, order, regularization_weight)
        centers = train_points.to(dtype)
        rbf = _GridRBF.apply(centers, w.to(dtype), height, width, _check_order(order))
        rbf = rbf.permute(0, 2, 3, 1)  # (B, K, H, W) -> (B, H, W, K)
        v = v.to(dtype)  # (B, 3, K): row, col and constant weights
        rows = torch.arange(height, device=centers.device).to(dtype)
        cols = torch.arange(width, device=centers.device).to(dtype)
        affine_rows = rows[None, :, None] * v[:, None, 0, :] + v[:, None, 2, :]  # (B, H, K)
        affine_cols = cols[None, :, None] * v[:, None, 1, :]  # (B, W, K)
        return rbf + affine_rows[:, :, None, :] + affine_cols[:, None, :, :]


def dense_image_warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``output[b, :, y, x] = image[b, :, y - flow[b, y, x, 0], x - flow[b, y, x, 1]]``.

    Bilinear sampling with TensorFlow's clamping: the lower corner index is clamped to
    ``[0, size - 2]`` and the fraction to ``[0, 1]``, so a sample outside the image takes
    the value at the edge (and passes no gradient to the flow).

    Args:
        image: ``(B, C, H, W)`` float, H and W at least 2.
        flow: ``(B, H, W, 2)`` (row, col) displacements in pixels.

    Returns:
        ``(B, C, H, W)`` in float32 (float64 for a float64 ``image``), whatever the
        autocast state or the dtype of a half-precision ``image``.
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (B, C, H, W), got {tuple(image.shape)}")
    b, c, h, w = image.shape
    if h < 2 or w < 2:
        raise ValueError(f"image height and width must be at least 2, got {h} x {w}")
    if flow.shape != (b, h, w, 2):
        raise ValueError(f"flow must be (B, H, W, 2) = {(b, h, w, 2)}, got {tuple(flow.shape)}")
    dtype = _float_dtype(image.dtype)
    with _no_autocast(image):
        image, flow = image.to(dtype), flow.to(dtype)
        # Integer pixel grid: a float16/bf16 arange is already wrong past 2048/256 pixels.
        rows = torch.arange(h, device=image.device).to(dtype)
        cols = torch.arange(w, device=image.device).to(dtype)
        # grid_sample's bilinear mode with border padding is TensorFlow's rule: a sample
        # beyond an edge takes the edge's value and passes no gradient to the flow. One
        # fused operation (forward and backward) instead of four gathers and three lerps:
        # about 5x faster on a CPU. Its coordinates are normalised to [-1, 1]
        # (align_corners: -1 and 1 are the centres of the first and last pixels), which
        # costs about 1e-5 pixel in float32. Unlike TensorFlow, a sample exactly on the
        # first or last row/column passes no gradient to that flow component (zero flow
        # at the border: every destination point on its source; docs/warp.md).
        grid = torch.stack([(cols[None, :] - flow[..., 1]) * (2.0 / (w - 1)) - 1,
                            (rows[:, None] - flow[..., 0]) * (2.0 / (h - 1)) - 1], dim=-1)
        return torch.nn.functional.grid_sample(image, grid, mode="bilinear",
                                               padding_mode="border", align_corners=True)


def sparse_image_warp(image: torch.Tensor, source: torch.Tensor, dest: torch.Tensor,
                      interpolation_order: int = 2, regularization_weight: float = 0.0,
                      num_boundary_points: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp ``image`` so that the content at ``source`` moves to ``dest`` (TensorFlow semantics).

    With ``regularization_weight = 0`` the warped image at ``dest[b, i]`` equals the input
    at ``source[b, i]``; with regularisation this holds approximately. Differentiable
    with respect to the image and both point sets.

    Args:
        image: ``(B, C, H, W)`` float.
        source: ``(B, N, 2)`` (row, col) control points in the input image.
        dest: ``(B, N, 2)`` (row, col) where they should land.
        interpolation_order: polyharmonic order (1: ``r``, 2: thin-plate, 3: ``r^3``).
        regularization_weight: added to the spline kernel matrix's diagonal.
        num_boundary_points: zero-flow points per image edge (see :func:`boundary_points`).

    Returns:
        ``(warped, flow)``: ``(B, C, H, W)`` and the dense ``(B, H, W, 2)`` (row, col) flow,
        both float32 (float64 for a float64 ``image``) and computed without autocast,
        whatever the autocast state or a half-precision input's dtype.
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (B, C, H, W), got {tuple(image.shape)}")
    b, _, h, w = image.shape
    if source.shape != dest.shape or source.dim() != 3 or source.shape[0] != b or \
            source.shape[-1] != 2:
        raise ValueError(f"source and dest must both be (B={b}, N, 2), got "
                         f"{tuple(source.shape)} and {tuple(dest.shape)}")
    dtype = _float_dtype(image.dtype)
    with _no_autocast(image):
        source = source.to(_float_dtype(source.dtype))
        dest = dest.to(_float_dtype(dest.dtype))
        flows = dest - source  # (B, N, 2)
        centers = dest
        if num_boundary_points > 0:
            border = boundary_points(h, w, num_boundary_points, dest.dtype, dest.device)
            border = border.expand(b, -1, -1)
            centers = torch.cat([dest, border], dim=1)
            flows = torch.cat([flows, torch.zeros_like(border)], dim=1)
        dense_flow = interpolate_grid(centers, flows.to(dtype), h, w, interpolation_order,
                                      regularization_weight)
        return dense_image_warp(image, dense_flow), dense_flow


__all__ = [
    "KERNEL_EPSILON",
    "apply_interpolation",
    "boundary_points",
    "dense_image_warp",
    "interpolate_grid",
    "interpolate_spline",
    "phi",
    "solve_interpolation",
    "sparse_image_warp",
]
