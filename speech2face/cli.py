"""Command line: ``speech2face <command> ...`` (also ``python -m speech2face``).

The commands live at the bottom of the module they drive, as a pair of functions
``add_<command>_arguments(parser)`` and ``<command>_command(args) -> int``. This module
only knows their names, so ``speech2face --help`` does not import torch, and a command
imports only what it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

from speech2face.errors import ConfigError, Speech2FaceError
from speech2face.runtime import setup_process
from speech2face.utils import (
    IMAGE_SUFFIXES,
    close_progress_bars,
    output_lock,
    undecodable_name,
)

# command name -> (module that implements it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "spectrogram": ("speech2face.audio", "audio/video files -> compressed complex STFTs (.npy)"),
    "faces": ("speech2face.faces", "images -> aligned 224x224 crops, 68 landmarks, features"),
    "make-demo-data": ("speech2face.demo_data", "generate a VoxCeleb1-style demo corpus"),
    "download": ("speech2face.data.download", "AVSpeech CSVs -> segments for prepare (yt-dlp)"),
    "prepare": ("speech2face.data.prepare", "VoxCeleb1/VoxCeleb2/AVSpeech -> WebDataset shards"),
    "train-decoder": ("speech2face.train", "stage 1: train the face decoder on faces"),
    "train": ("speech2face.train", "stage 2: train the voice encoder against faces"),
    "evaluate": ("speech2face.evaluate", "the paper's metrics on the test split, with a report"),
    "compare": ("speech2face.report", "evaluation reports side by side (e.g. encoder vs baseline)"),
    "reconstruct": ("speech2face.inference", "speech in, face image out"),
    "serve": ("speech2face.serve", "a local web page: speak or upload, see the face"),
    "demo": ("speech2face.demo", "the end-to-end demo on generated data"),
}


# How long a torchrun worker other than rank 0 holds back a usage or settings error.
RANK_0_FIRST_S = 20.0


def _let_rank_0_say_it() -> None:
    """Hold back a usage or settings error in a ``torchrun`` worker other than rank 0.

    Every worker runs the same command line on the same files, so such an error is the
    same in each, and each printed it. Rank 0 says it; the others wait, and torchrun ends
    them as soon as rank 0 has exited (a worker that exited first, silently, had torchrun
    end rank 0 before it could say anything). One that is still running after
    ``RANK_0_FIRST_S`` says its own error: rank 0 did not meet it."""
    if os.environ.get("RANK", "0") != "0":
        import time

        time.sleep(RANK_0_FIRST_S)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line (the standard for every error)."""

    def error(self, message: str):
        _let_rank_0_say_it()
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _StoreOnce(argparse._StoreAction):
    """argparse's ``store`` for an option that takes a value, refusing it given twice:
    plain argparse keeps the last value silently (``--config a.yaml --config b.yaml`` ran
    with b.yaml alone, a paper-size run where a.yaml asked for the tiny one). Options
    meant to repeat say ``action="append"``."""

    def __call__(self, parser, namespace, values, option_string=None):
        if self.option_strings:
            if self.dest in parser.given:
                parser.error(f"{'/'.join(self.option_strings)}: given more than once")
            parser.given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class _CommandParser(_Parser):
    """A command's parser: its options may come between the values of a list argument
    (``train ... steps=500 --resume lr=1e-4``, ``spectrogram a.wav -o OUT b.wav``), which
    plain argparse takes for unrecognised arguments after the first option; an option
    that takes a value may be given once (:class:`_StoreOnce`)."""

    _inner = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.given: set[str] = set()  # options seen in this parse (_StoreOnce)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # argparse's intermixed parsing calls this twice itself
            return super().parse_known_args(args, namespace)
        self._inner = True
        self.given = set()
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def bounded(kind: type, low=None, high=None, what: str = "value"):
    """An argparse ``type`` that parses ``kind`` (int or float) and refuses values outside
    ``[low, high]`` (and NaN), so that a bad option value is a one-line usage error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            kind_name = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {kind_name}: {text!r}") from None
        if value != value or (low is not None and value < low) or \
                (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"the {what} must be {span}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def seed(text: str) -> int:
    """An argparse ``type`` for ``--seed``: an integer the generators take (utils.MAX_SEED)."""
    from speech2face.utils import MAX_SEED

    return bounded(int, 0, MAX_SEED, "seed")(text)


seed.__name__ = "int"


def device(text: str) -> str:
    """An argparse ``type`` for ``--device``: a torch device this machine has."""
    from speech2face.utils import device_problem

    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


# Commands whose -o/--out names a file instead of a folder: always (None), or when it has
# one of these suffixes (reconstruct writes PNG, and refuses another image type).
FILE_OUTPUTS: dict[str, tuple[str, ...] | None] = {"reconstruct": IMAGE_SUFFIXES,
                                                   "compare": None}


def _check_out(command: str, out) -> bool:
    """Whether ``-o/--out`` names a single output file; refuses an existing file where a
    folder is written."""
    from pathlib import Path

    path = Path(out)
    suffixes = FILE_OUTPUTS.get(command, ())
    is_file = suffixes is None or (path.suffix.lower() in suffixes and not path.is_dir())
    if path.exists() and not path.is_dir() and not is_file:
        raise Speech2FaceError(path, "-o/--out: exists and is not a folder")
    if suffixes is None and path.is_dir():
        raise Speech2FaceError(path, "-o/--out: is a folder; name the file to write")
    return is_file


# OS errors that the machine causes, not the code (a full disk, a read-only folder): one
# line, like bad input. The write that failed was to a temporary file, so nothing is
# half-written, and a rerun continues where the run stopped.
ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                      errno.EPERM}


def _output(module, args):
    """``(path, is_folder)`` that the command writes and locks, or None.

    ``-o/--out`` unless the module says otherwise with ``<command>_output(args)`` (e.g.
    one machine of a cluster ``prepare`` locks only its own part of the folder).
    """
    custom = getattr(module, f"{_snake(args.command)}_output", None)
    if custom is not None:
        return custom(args)
    out = getattr(args, "out", None)
    if out is None:
        return None
    return out, not _check_out(args.command, out)


def _snake(name: str) -> str:
    return name.replace("-", "_")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = _Parser(
        prog="speech2face",
        description="Speech2Face: reconstruct a canonical face from a few seconds of speech.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    parser.commands = {}  # name -> its parser, whose --help a usage error points to
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = parser.commands[name] = sub.add_parser(name, help=help_text,
                                                            description=help_text)
        if name == command:
            getattr(importlib.import_module(module), f"add_{_snake(name)}_arguments")(sub_parser)
    return parser


def run() -> None:
    """The ``speech2face`` console command: :func:`main`, then :func:`exit_now`."""
    exit_now(main())


def exit_now(code: int) -> None:
    """End the process with ``code`` without tearing the interpreter down.

    A normal exit frees every object one by one and runs C++ destructors before the
    process gives all its memory back anyway: 0.4 s of CPU with torch imported, 0.8 s
    with ``torch._dynamo`` (which ``torch.optim`` imports), on every command
    (``bench/bench_exit.py``, docs/benchmarks.md). What a normal exit does that matters
    still happens, in its order: threads that are not daemons are waited for, the
    ``atexit`` handlers run (multiprocessing's, which stops daemonic children such as
    DataLoader workers, among them), and the standard streams are flushed. The commands
    close every file they write before they return.
    """
    import atexit
    import threading

    # What Py_FinalizeEx does first, in its order: threading's own exit hooks (which stop
    # idle executor threads) and the joins of non-daemon threads, then the atexit handlers.
    threading._shutdown()  # noqa: SLF001
    atexit._run_exitfuncs()  # noqa: SLF001
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more can be said
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    except KeyboardInterrupt:  # before the command began: its arguments and imports
        print("speech2face: interrupted", file=sys.stderr)
        return 130
    if "speech2face.distributed" in sys.modules:  # a training command (torch is loaded)
        from speech2face.distributed import leave_launched_process

        leave_launched_process(code)  # under torchrun: does not return
    return code


# Set when SIGTERM asked the command to stop (see _stop_on_sigterm).
_TERMINATED: list[int] = []


def _stop_on_sigterm() -> None:
    """SIGTERM (what ``kill``, SLURM at a time limit and Kubernetes send) stops a command
    as Ctrl-C does: its temporary files and the output folders it made are removed, and
    a rerun continues. It is passed on as SIGINT, so that code which defers Ctrl-C to a
    safe point (prepare, between videos) defers it too. Where SIGINT is ignored (a
    background job of a script: ``nohup speech2face download ... &``), Python's Ctrl-C
    handler is put back first: the process is being stopped anyway, and the default end
    would leave temporary files behind. Not under torchrun, whose agent stops its workers
    itself, nor in forked workers: there SIGTERM ends the process as it always did."""
    if "RANK" in os.environ or threading.current_thread() is not threading.main_thread():
        return  # (signal handlers can only be set in the main thread)
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if not callable(signal.getsignal(signal.SIGINT)):  # ignored: a background job
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if callable(signal.getsignal(signal.SIGCHLD)):
            # torch's DataLoader raises from SIGCHLD when a worker dies of a signal: the
            # SIGTERM sent to the whole group (timeout, scancel) ends its workers too,
            # and that error cut into the stop with a traceback. (A handler that does
            # nothing: SIG_DFL made a SIGCHLD already on its way print a warning.)
            signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        _TERMINATED.append(signum)
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, handler)


def _quiet_fd_handover() -> None:
    """No traceback from multiprocessing's thread that hands file descriptors to other
    processes (torch's DataLoader workers take tensors that way) when one of them dies
    in the middle of a handover: a SIGTERM to a training command ends its workers while
    it stops, and the thread printed "ConnectionResetError: Connection reset by peer"
    before the command's one line. A worker that dies otherwise is reported by torch."""
    previous = threading.excepthook
    if getattr(previous, "quiet_fd_handover", False):
        return
    sharer = os.path.join("multiprocessing", "resource_sharer.py")

    def hook(args) -> None:
        tb = args.exc_traceback
        while tb is not None and not tb.tb_frame.f_code.co_filename.endswith(sharer):
            tb = tb.tb_next
        if tb is None or not issubclass(args.exc_type, (ConnectionError, EOFError)):
            previous(args)

    hook.quiet_fd_handover = True
    threading.excepthook = hook


def _plain_warnings() -> None:
    """Our own warnings print as one line, ``speech2face: warning: ...``, as the commands'
    other notes do, instead of with our source file, line and code line (the Python API
    keeps Python's format; other packages' warnings keep it too)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    python_format = warnings.formatwarning
    if getattr(python_format, "plain_for_speech2face", False):
        return

    def format_warning(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package):
            return f"speech2face: warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    format_warning.plain_for_speech2face = True
    warnings.formatwarning = format_warning


# Options that name a file or folder the command reads or writes as a whole.
PATH_OPTIONS = ("root", "out", "data", "model", "decoder", "config", "gallery", "weights",
                "encoder_weights", "recognizer_weights", "csv", "merge")


def _undecodable_path(args) -> str | None:
    """What is wrong with the first path option whose name is not valid UTF-8, or None.
    Such a name (bytes Python keeps as surrogates) could not be written into a manifest,
    a report or a message: prepare and evaluate failed with a traceback, evaluate's after
    its whole run. (Inputs given one by one are named and skipped where they are read.)"""
    for dest in PATH_OPTIONS:
        values = getattr(args, dest, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, (str, os.PathLike)) and \
                    (shown := undecodable_name(value)) is not None:
                return (f"--{dest.replace('_', '-')}: {shown}: the name is not valid UTF-8 "
                        "(it could not be recorded or printed); rename it")
    return None


def _empty_out(argv: list[str]) -> bool:
    """Whether ``-o``/``--out`` is given an empty value (``-o ""``, ``--out=``)."""
    return any(a == "--out=" or (a in ("-o", "--out") and i + 1 < len(argv) and not argv[i + 1])
               for i, a in enumerate(argv))


@contextlib.contextmanager
def _progress_bars_closed_on_error() -> Iterator[None]:
    """An error, Ctrl-C or SIGTERM closes (and erases) the bars left open before the
    command's last line is written (utils.close_progress_bars)."""
    try:
        yield
    except BaseException:
        close_progress_bars()
        raise


def _main(argv: list[str] | None) -> int:
    setup_process()  # keep freed memory, sleeping threads (runtime.py): before torch loads
    _stop_on_sigterm()
    _plain_warnings()
    _quiet_fd_handover()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's parser, so that its --help is the one pointed to
        parser.commands.get(args.command, parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    if _empty_out(argv):  # which Path("") would take for the current folder
        parser.commands[args.command].error("-o/--out: an empty path")
    if problem := _undecodable_path(args):
        parser.commands[args.command].error(problem)
    module = importlib.import_module(COMMANDS[args.command][0])
    run = getattr(module, f"{_snake(args.command)}_command")
    try:
        # One writer per output: every command with -o/--out holds its lock while it runs.
        lock = contextlib.nullcontext()
        target = _output(module, args)
        # Under torchrun every process runs the command; rank 0 writes, and locks.
        if target is not None and os.environ.get("RANK", "0") == "0":
            lock = output_lock(*target)
        with lock, _progress_bars_closed_on_error():
            return int(run(args) or 0)
    except Speech2FaceError as error:
        if isinstance(error, ConfigError):
            _let_rank_0_say_it()
        print(f"speech2face {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Whatever read our output has gone (`speech2face demo | head -1`): stop quietly, as
        # a program that SIGPIPE ends does; stdout now points nowhere, so the final flush
        # cannot fail again. What the command wrote is whole (it resumes as after Ctrl-C).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRORS:
            raise  # anything else is a bug, and its traceback is wanted
        where = f"{error.filename}: " if error.filename else ""
        again = " with --resume" if hasattr(args, "resume") else ""
        hint = f"; free some space and run the command again{again}" \
            if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        print(f"speech2face {args.command}: error: {where}{error.strerror}{hint}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _TERMINATED:
            print(f"speech2face {args.command}: terminated (SIGTERM)", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"speech2face {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    run()
