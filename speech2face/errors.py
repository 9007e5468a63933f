"""Typed errors for bad input.

Every error that a user can cause (a missing file, a corrupt clip, a photo with no face)
is a subclass of :class:`Speech2FaceError`. Its message is one line naming the file and
the problem; the command line prints it and exits with code 2, without a traceback.
"""

from __future__ import annotations

import os


class Speech2FaceError(Exception):
    """Base class of all user-facing errors: one line, names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")

    def __reduce__(self):
        """Pickled as its path and problem (the default, its one-line message, does not
        fit ``__init__``): a worker process hands it to the command that prints it."""
        return type(self), (self.path, self.problem)


class AudioError(Speech2FaceError):
    """An audio or video file that cannot give a usable speech signal."""


class ImageError(Speech2FaceError):
    """An image that cannot be read, is too large, or has no usable face."""


class NoFaceError(ImageError):
    """No face was found in an image where one was required."""


class WeightsError(Speech2FaceError):
    """A weights file or model bundle that is missing, truncated or does not match."""


class DataError(Speech2FaceError):
    """A dataset folder, shard or manifest that does not have the expected layout."""


class OtherRunError(DataError):
    """An output folder holding a run begun with other arguments or inputs (``prepare``'s
    part): it is not continued, so that one folder never mixes two runs."""


class ConfigError(Speech2FaceError):
    """A configuration file or override that names an unknown key or a bad value."""


class TrainingError(Speech2FaceError):
    """Training that cannot go on: its loss or weights are no longer finite."""
