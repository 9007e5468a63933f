"""cli: the console command's quick exit keeps what a normal exit does that matters."""

from __future__ import annotations

import subprocess
import sys

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
