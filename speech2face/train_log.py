"""What a training run records besides its checkpoints: ``RUN/metrics.csv``, TensorBoard
scalars and images, and the validation grids ``RUN/images/val-NNNNNNNN.png``; and the
loss sums behind the logged numbers (kept on the device between logging steps).

Kept apart from :mod:`speech2face.train` so that the loop reads as the loop. Only rank 0
writes. The evaluation report's grid (:func:`speech2face.report.image_grid`) is a
different picture: a labelled figure of true, canonical and reconstructed faces made from
a finished model; the grid here is a bare tensor, because TensorBoard takes the same
tensor that is written as a PNG.
"""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

import torch

from speech2face.distributed import all_reduce_mean, reduce_device
from speech2face.errors import Speech2FaceError
from speech2face.utils import atomic_write, png_bytes

METRICS_FILE = "metrics.csv"


def _is_row(row: list[str]) -> bool:
    """A ``step, split, name, value`` row as :class:`MetricsLog` writes it."""
    if len(row) != 4 or not (row[0].isascii() and row[0].isdigit()):
        return False
    try:
        float(row[3])
    except ValueError:
        return False
    return True


class MetricsLog:
    """Scalars to ``RUN/metrics.csv`` (step, split, name, value) and TensorBoard (rank 0 only).

    On resume, rows after the resumed step (written by the interrupted process) are
    dropped and TensorBoard events after it are purged, so the logs read as one run.
    """

    def __init__(self, run: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.csv_path = run / METRICS_FILE
        rows = []
        if self.csv_path.exists():
            # Only well-formed rows up to the resumed step are kept: a damaged log (bytes
            # that are not UTF-8, NULs, torn lines) costs its bad rows, not the resume.
            text = self.csv_path.read_bytes().decode("utf-8", errors="replace")
            rows = list(csv.reader(io.StringIO(text.replace("\0", ""))))[1:]
            rows = [r for r in rows if _is_row(r) and int(r[0]) <= start_step]
        with atomic_write(self.csv_path, "w") as f:
            out = csv.writer(f)
            out.writerow(["step", "split", "name", "value"])
            out.writerows(rows)
        self.file = open(self.csv_path, "a", newline="")  # noqa: SIM115 - closed in close()
        self.csv = csv.writer(self.file)
        board = run / "tensorboard"
        try:  # SummaryWriter would find out in a thread of its own, with a traceback
            board.mkdir(exist_ok=True)
            with tempfile.TemporaryFile(dir=board):
                pass
        except OSError as error:
            raise Speech2FaceError(board, f"cannot write the TensorBoard log here "
                                          f"({error.strerror})") from None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(board), purge_step=start_step + 1)
        except ImportError:  # tensorboard is a dependency, but the CSV is enough to go on
            self.writer = None

    def scalars(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.csv.writerow([step, split, name, f"{value:.8g}"])
            if self.writer is not None:
                self.writer.add_scalar(f"{split}/{name}", value, step)
        self.file.flush()

    def image(self, step: int, tag: str, grid: torch.Tensor) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def accumulate(sums: dict[str, torch.Tensor], values: dict[str, torch.Tensor],
               scale: float = 1.0) -> None:
    """Add detached float32 ``values * scale`` to ``sums``, staying on their device."""
    for name, value in values.items():
        value = value.detach().float() * scale
        sums[name] = sums[name] + value if name in sums else value


def window_means(sums: dict[str, torch.Tensor], steps: int,
                 device: torch.device) -> dict[str, float]:
    """Means over a logging window, averaged over processes: the one host sync."""
    names = sorted(sums)
    stacked = torch.stack([sums[n] for n in names]).to(reduce_device(device), torch.float64)
    mean = all_reduce_mean(stacked / steps)
    return dict(zip(names, mean.tolist(), strict=True))


def term_shares(values: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """Each weighted term's share of the total loss (``share_<term>``), e.g. to see one
    term drowning the others (the distillation term against a near-uniform teacher)."""
    total = sum(weight * values[name] for name, weight in weights.items() if name in values)
    if not total:
        return {}
    return {f"share_{name}": weight * values[name] / total
            for name, weight in weights.items() if name in values}


def validation_grid(columns: list[torch.Tensor], size: int | None = None,
                    pad: int = 2) -> torch.Tensor:
    """Rows of faces side by side: ``columns`` of ``(B, 3, H, W)`` -> ``(3, H', W')`` in [0, 1].

    Every face is resized to ``size`` (default: the size the decoder renders, i.e. the
    largest column after the first, which holds the true 224 faces).
    """
    import torch.nn.functional as F

    size = size or max(c.shape[-2] for c in (columns[1:] or columns))
    columns = [F.interpolate(c.detach().float().cpu(), size=(size, size), mode="bilinear",
                             align_corners=False) if c.shape[-2:] != (size, size)
               else c.detach().float().cpu() for c in columns]
    b = columns[0].shape[0]
    cell = size + pad
    grid = torch.ones(3, b * cell + pad, len(columns) * cell + pad)
    for j, column in enumerate(columns):
        for i in range(b):
            top, left = pad + i * cell, pad + j * cell
            grid[:, top:top + size, left:left + size] = column[i].clamp(0, 1)
    return grid


def write_png(grid: torch.Tensor, path: Path) -> None:
    """Save a ``(3, H, W)`` image in [0, 1] as PNG, atomically."""
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_write(path) as f:
        # Fast compression: a grid is written at every validation and rarely looked at.
        f.write(png_bytes(array, compress_level=1))
