"""Command line: ``speech2face <command> ...`` (also ``python -m speech2face``).

The commands live at the bottom of the module they drive, as a pair of functions
``add_<command>_arguments(parser)`` and ``<command>_command(args) -> int``. This module
only knows their names, so ``speech2face --help`` does not import torch, and a command
imports only what it needs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from speech2face.errors import Speech2FaceError
from speech2face.runtime import setup_process

# command name -> (module that implements it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "spectrogram": ("speech2face.audio", "audio/video files -> compressed complex STFTs (.npy)"),
    "faces": ("speech2face.faces", "images -> aligned 224x224 crops, 68 landmarks, features"),
    "make-demo-data": ("speech2face.demo_data", "generate a VoxCeleb1-style demo corpus"),
    "download": ("speech2face.data.download", "AVSpeech CSVs -> the segments prepare needs (yt-dlp)"),
    "prepare": ("speech2face.data.prepare", "VoxCeleb1/VoxCeleb2/AVSpeech -> WebDataset shards"),
    "train-decoder": ("speech2face.train", "stage 1: train the face decoder on faces"),
    "train": ("speech2face.train", "stage 2: train the voice encoder against faces"),
    "evaluate": ("speech2face.evaluate", "the paper's metrics on the test split, with a report"),
    "compare": ("speech2face.report", "evaluation reports side by side (e.g. encoder vs baseline)"),
    "reconstruct": ("speech2face.inference", "speech in, face image out"),
    "serve": ("speech2face.serve", "a local web page: speak or upload, see the face"),
    "demo": ("speech2face.demo", "the end-to-end demo on generated data"),
}


def _snake(name: str) -> str:
    return name.replace("-", "_")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="speech2face",
        description="Speech2Face: reconstruct a canonical face from a few seconds of speech.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            getattr(importlib.import_module(module), f"add_{_snake(name)}_arguments")(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_process()  # keep freed memory, sleeping threads (runtime.py): before torch loads
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    run = getattr(
        importlib.import_module(COMMANDS[args.command][0]), f"{_snake(args.command)}_command"
    )
    try:
        return int(run(args) or 0)
    except Speech2FaceError as error:
        print(f"speech2face {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"speech2face {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
