"""cli: the console command's quick exit keeps what a normal exit does that matters."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import atexit, concurrent.futures, sys, threading, time
from pathlib import Path

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))

def late():
    time.sleep(0.3)
    (out / "thread").write_text("done")

threading.Thread(target=late).start()  # not a daemon: a normal exit waits for it
pool = concurrent.futures.ThreadPoolExecutor(2)  # left idle, never shut down
pool.submit(int).result()
sys.stdout.write("buffered, no newline")  # a pipe: held in the buffer until flushed

from speech2face.cli import exit_now

exit_now(3)
"""


def test_exit_now_waits_for_threads_runs_atexit_and_flushes(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered, no newline"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_the_console_command_and_python_m_exit_through_exit_now():
    from importlib.metadata import entry_points

    (command,) = entry_points(group="console_scripts", name="speech2face")
    assert command.value == "speech2face.cli:run"
    # python -m speech2face with no command prints its help and returns 2 (not SystemExit).
    code = ("import runpy, speech2face.cli as cli; "
            "cli.exit_now = lambda code: print('exit_now', code); "
            "runpy.run_module('speech2face', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "exit_now 2", result.stdout


def test_a_command_that_fails_part_way_leaves_one_line_on_the_terminal(tmp_path, capfd):
    """Its progress bar, drawn before the bad file was reached, is erased (carriage
    return over blanks) rather than left as a line above the error."""
    import numpy as np
    import soundfile as sf

    from speech2face import cli

    noise = np.random.default_rng(0).uniform(-0.1, 0.1, 16000 * 7)
    for i in range(4):
        sf.write(tmp_path / f"a{i}.wav", noise, 16000)
    (tmp_path / "z.wav").write_bytes(b"RIFFxxxxWAVEjunk")
    capfd.readouterr()
    assert cli.main(["spectrogram", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.split("\n") if line]
    assert len(lines) == 1 and "spectrogram:" in lines[0]  # the bar was drawn
    shown = lines[0].split("\r")[-1]  # what a terminal shows after the carriage returns
    assert shown.startswith("speech2face spectrogram: error:") and "z.wav" in shown
    assert "%|" not in shown


def test_options_may_come_between_the_values_of_a_list_argument():
    """``train ... steps=3 --no-progress lr=0.1`` is one command, not an unrecognised
    ``lr=0.1`` (plain argparse stops a list argument at the first option)."""
    from speech2face.cli import build_parser

    args = build_parser("train-decoder").parse_args(
        ["train-decoder", "steps=3", "--data", "D", "--no-progress", "lr=0.1", "-o", "R",
         "batch_size=2"])
    assert args.overrides == ["steps=3", "lr=0.1", "batch_size=2"]
    assert (args.data, args.out, args.no_progress) == ("D", "R", True)
    args = build_parser("spectrogram").parse_args(["spectrogram", "a.wav", "-o", "O", "b.wav"])
    assert [str(a) for a in args.audio] == ["a.wav", "b.wav"] and args.out == "O"


@pytest.mark.parametrize("argv, option", [
    (["train", "--data", "D", "--decoder", "B", "-o", "R", "--config", "a.yaml",
      "--config=b.yaml", "steps=3"], "--config"),
    (["train-decoder", "--data", "D", "--conf", "a.json", "-o", "R", "--config", "b.json"],
     "--config"),
    (["spectrogram", "a.wav", "-o", "X", "b.wav", "--out", "Y"], "-o/--out"),
    (["prepare", "voxceleb1", "--root", "A", "--root", "B", "-o", "X"], "--root"),
])
def test_an_option_given_twice_is_refused_not_overwritten(argv, option, capsys, tmp_path,
                                                          monkeypatch):
    """argparse keeps the last of two values silently: ``--config tiny.yaml --config
    other.yaml`` trained a paper-size model."""
    from speech2face.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"speech2face {argv[0]}: error: {option}: given more than once "
                   f"(see speech2face {argv[0]} --help)\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["spectrogram", "x.wav", "-o", ""],
                                  ["reconstruct", "x.wav", "-o", ""],
                                  ["make-demo-data", "--out", ""]])
def test_an_empty_output_path_is_refused(argv, capsys, tmp_path, monkeypatch):
    from speech2face.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert f"speech2face {argv[0]}: error: -o/--out: an empty path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, prog", [(["demo", "--bogus"], "speech2face demo"),
                                        (["compare", "a=b", "--bogus"], "speech2face compare"),
                                        (["--bogus"], "speech2face")])
def test_an_unknown_argument_points_to_its_commands_help(argv, prog, capsys):
    from speech2face.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: unrecognized arguments:"), err
    assert err.endswith(f"(see {prog} --help)\n") and err.count("\n") == 1



@pytest.mark.parametrize("argv", [
    ["prepare", "voxceleb1", "--root", "{bad}", "-o", "{tmp}/shards"],
    ["evaluate", "--model", "demo", "--data", "{bad}", "-o", "{tmp}/report"],
    ["reconstruct", "{tmp}/a.wav", "-o", "{tmp}/a.png", "--model", "{bad}"],
    ["train-decoder", "--data", "{tmp}", "-o", "{bad}"],
    ["compare", "a={tmp}", "b={tmp}", "-o", "{bad}"],
])
def test_a_path_option_whose_name_is_not_utf8_is_one_line(argv, tmp_path, capsys):
    """A folder named with bytes that are not UTF-8 (kept by Python as surrogates) could
    not go into a manifest or a report: prepare failed with a traceback after leaving a
    folder behind, evaluate after its whole run. Refused first, naming the option."""
    from speech2face.cli import main

    bad = str(tmp_path / "r\udcffoot")
    argv = [a.format(bad=bad, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "r\\xffoot: the name is not valid UTF-8" in err, err
    assert list(tmp_path.iterdir()) == []



def test_a_worker_dying_during_an_fd_handover_prints_no_traceback(monkeypatch, capfd):
    """SIGTERM to a training command alone ends its DataLoader workers while it stops; one
    caught handing over a file descriptor made multiprocessing's sharing thread print
    "ConnectionResetError" with its traceback before the command's one line. Errors of
    other threads still print."""
    import threading
    from multiprocessing import resource_sharer

    from speech2face import cli

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    cli._quiet_fd_handover()
    cli._quiet_fd_handover()  # (main() runs again in one process: not wrapped twice)
    where = {}
    exec(compile("def serve():\n    raise ConnectionResetError(104, 'reset by peer')\n",
                 resource_sharer.__file__, "exec"), where)  # raised in the sharer's file

    def elsewhere():
        raise ConnectionResetError(104, "reset elsewhere")

    for target in (where["serve"], elsewhere):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    err = capfd.readouterr().err
    assert "reset by peer" not in err and "reset elsewhere" in err, err

def test_ctrl_c_while_the_command_loads_is_one_line(monkeypatch, capsys):
    """A Ctrl-C in the first 0.1-0.3 s, while the command's parser and modules loaded,
    printed a KeyboardInterrupt traceback (exit -2)."""
    from speech2face import cli

    def interrupted(command):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["prepare", "--help"]) == 130
    assert capsys.readouterr().err == "speech2face: interrupted\n"

@pytest.mark.parametrize("background", [False, True])
def test_sigterm_stops_a_command_as_ctrl_c_does(tmp_path, background):
    """What kill, SLURM and Kubernetes send: one line, exit 143, and nothing left behind
    (the output folder the run made, its temporary folder beside it). Also in a
    background job of a script (``nohup ... &``), which starts with SIGINT ignored."""
    import os
    import signal
    import time

    command = [sys.executable, "-m", "speech2face", "make-demo-data", "--speakers", "40",
               "--out", str(tmp_path / "corpus")]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background
        else None)
    said = b""
    while b"%" not in said:  # the progress bar: the corpus is being written
        chunk = process.stderr.read1(256)
        assert chunk, said
        said += chunk
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    said += process.stderr.read()
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    shown = said.decode().split("\n")[-2].split("\r")[-1]
    assert shown == "speech2face make-demo-data: terminated (SIGTERM)", said
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_a_stopped_command_erases_its_open_progress_bars_before_its_last_line(
        tmp_path, monkeypatch, capsys, error):
    """A bar a loop was iterating stays open after an error until the traceback holding
    it is freed; it then drew its last state under "interrupted" (a prepare stopped while
    its worker pool started, on CI). The command's last line is the last line."""
    import gc

    from speech2face import audio
    from speech2face.cli import main
    from speech2face.utils import progress

    held = []

    def stopped_part_way(args):
        bar = progress(total=4, desc="spectrogram")
        bar.update(1)
        held.append(bar)  # as a traceback holds the loop's bar
        raise error

    monkeypatch.setattr(audio, "spectrogram_command", stopped_part_way)
    code = main(["spectrogram", "a.wav", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    held.clear()
    gc.collect()  # the bar collected: nothing more may be drawn
    assert capsys.readouterr().err == ""
    lines = [shown for line in err.split("\n") if (shown := line.split("\r")[-1].strip())]
    if error is KeyboardInterrupt:
        assert code == 130 and lines == ["speech2face spectrogram: interrupted"], err
    else:
        assert code == 2 and lines == ["speech2face spectrogram: error: No space left on "
                                       "device; free some space and run the command again"], err


def test_our_warnings_print_as_one_line_others_as_python_prints_them(monkeypatch):
    import warnings

    from speech2face import cli
    from speech2face.data import loader

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after
    python_format = warnings.formatwarning
    cli._plain_warnings()
    cli._plain_warnings()  # twice (main called again in one process): installed once
    ours = warnings.formatwarning("train: 1 shard(s) for 2 loader workers", UserWarning,
                                  loader.__file__, 564)
    assert ours == "speech2face: warning: train: 1 shard(s) for 2 loader workers\n"
    theirs = ("This DataLoader will create 4 worker processes", UserWarning,
              pytest.__file__, 431)
    assert warnings.formatwarning(*theirs) == python_format(*theirs)
