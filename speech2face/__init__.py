"""Speech2Face (Oh et al., CVPR 2019): reconstruct a canonical face from speech.

Top-level names are imported lazily so that ``import speech2face`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_audio": "speech2face.audio",
    "spectrogram": "speech2face.audio",
    "load_model": "speech2face.model",
    "save_model": "speech2face.model",
    "reconstruct": "speech2face.inference",
    "setup_process": "speech2face.runtime",
    "tune_allocator": "speech2face.runtime",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'speech2face' has no attribute {name!r}")
