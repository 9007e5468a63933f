"""``speech2face download avspeech`` end to end, offline: a local HTTP server on 127.0.0.1
serves videos made from the generated speakers (and a missing, a truncated, a slow, a
silent-track-less and a face-less one); ``prepare avspeech`` then reads what came down."""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import claim_held, make_mp4

from speech2face import cli, utils
from speech2face.data import download

SLOW_SECONDS = 6.0  # the slow video answers after this; the client's timeout is 2 s


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET with byte ranges (FFmpeg seeks with them) over the server's ``files`` dict."""

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        name = self.path.lstrip("/")
        if name in self.server.slow:
            time.sleep(SLOW_SECONDS)
        if name.startswith("SlowRanges"):
            time.sleep(0.2)
        body = self.server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        start, end = 0, len(body) - 1
        ranged = self.headers.get("Range", "").startswith("bytes=")
        if ranged:
            first, _, last = self.headers["Range"][6:].partition("-")
            start = int(first or 0)
            end = min(int(last), end) if last else end
        if start > 0 and name.startswith("MidFail"):  # fails once FFmpeg reads on
            self.send_error(500)
            return
        if start > 0 and name.startswith("ShortBody"):  # closes a response half-way
            self.send_response(206)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
            self.end_headers()
            self.wfile.write(body[start : start + (end - start + 1) // 2])
            self.close_connection = True
            return
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if ranged:  # (RFC 7233 lets a server that does not know the size say "*")
            total = "*" if name.startswith("NoTotal") else len(body)
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        self.end_headers()
        try:
            for at in range(start, end + 1, 16384):
                chunk = body[at : min(at + 16384, end + 1)]
                self.wfile.write(chunk)
                self.server.sent[name] = self.server.sent.get(name, 0) + len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # clients read the headers only, or seek away: not an error

    def setup(self):
        super().setup()
        # A small send buffer, so that what the server counts as sent is close to what
        # the client read before it closed or seeked away.
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        self.server.connections.append(self.request)  # closed when the server stops

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(demo_speakers, tmp_path_factory):
    """The videos by name; ``server.url`` is the --url-template."""
    (face0, wave0), (face1, wave1), _ = demo_speakers
    folder = tmp_path_factory.mktemp("served")
    good0 = make_mp4(folder / "good0.mp4", face0[:1], wave0, 8.0)
    grey = np.full((320, 320, 3), 120, np.uint8)
    files = {
        "GoodVideo00.mp4": good0,
        "GoodVideo01.mp4": make_mp4(folder / "good1.mp4", face1[:1], wave1, 8.0),
        "NoAudio0000.mp4": make_mp4(folder / "noaudio.mp4", face0[:1], None, 8.0),
        "NoFace00000.mp4": make_mp4(folder / "noface.mp4", [grey], wave0, 8.0),
        "Truncated00.mp4": good0[: len(good0) // 2],
        "SlowVideo00.mp4": good0,
    }
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    # A long video (2 min): a segment in its middle must not bring the whole file down.
    files["LongVideo00.mp4"] = make_mp4(folder / "long.mp4", face1[:1], np.tile(wave1, 15), 120.0)
    files["SlowRanges0.mp4"] = files["LongVideo00.mp4"]
    files["MidFail0000.mp4"] = files["ShortBody00.mp4"] = files["LongVideo00.mp4"]
    files["NoTotal0000.mp4"] = files["LongVideo00.mp4"]
    httpd.files, httpd.slow, httpd.sent = files, {"SlowVideo00.mp4"}, {}
    httpd.connections = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/{{id}}.mp4"
    httpd.waves = (wave0, wave1)
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    for connection in httpd.connections:  # a slow reply's handler may still hold one: it
        connection.close()  # would be an "unclosed socket" warning in a later test


TRAIN_ROWS = [
    "GoodVideo00,1.000000,4.000000,0.5,0.5",
    "GoodVideo00,4.500000,7.500000,0.5,0.5",
    "NoAudio0000,1.0,4.0,0.5,0.5",
    "NoFace00000,1.0,4.0,0.5,0.5",
    "Truncated00,5.0,7.5,0.5,0.5",
    "Missing0000,1.0,4.0,0.5,0.5",
    "SlowVideo00,1.0,4.0,0.5,0.5",
]
TEST_ROWS = ["GoodVideo01,2.0,6.0,0.5,0.5"]


def _csvs(tmp_path: Path, train=TRAIN_ROWS, test=TEST_ROWS) -> list[str]:
    """The CSVs of the splits with rows (an empty CSV is refused)."""
    paths = []
    for split, rows in (("train", train), ("test", test)):
        if rows:
            path = tmp_path / f"avspeech_{split}.csv"
            path.write_text("\n".join(rows) + "\n")
            paths.append(str(path))
    return paths


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _download_args(csvs, root, server, *extra) -> list[str]:
    args = ["download", "avspeech", "--out", str(root), "--url-template", server.url,
            "--timeout", "2", "--no-progress", *extra]
    for c in csvs:
        args += ["--csv", c]
    return args


def test_download_then_prepare(server, tmp_path, capsys):
    csvs = _csvs(tmp_path)
    root = tmp_path / "avspeech"
    code, out, err = _run(_download_args(csvs, root, server, "--workers", "3"), capsys)
    # Two segments failed for a transient reason (timeout, truncated) with attempts left:
    # exit 75, so that a job array's scheduler runs the task again.
    assert code == 75, err
    assert "3 fetched" in out and "5 failed now" in out
    assert "2 segment(s) failed for a transient reason and will be tried again" in out
    segments = sorted(p.relative_to(root).as_posix() for p in (root / "segments").rglob("*.*"))
    assert segments == [
        "segments/GoodVideo00/s000001000.face.npy", "segments/GoodVideo00/s000001000.mkv",
        "segments/GoodVideo00/s000004500.face.npy", "segments/GoodVideo00/s000004500.mkv",
        "segments/GoodVideo01/s000002000.face.npy", "segments/GoodVideo01/s000002000.mkv",
    ]
    log = [json.loads(line) for p in (root / "download_log").glob("*.jsonl")
           for line in p.read_text().splitlines()]
    kinds = {r["video"]: (r["kind"], r["transient"]) for r in log}
    assert kinds == {
        "NoAudio0000": ("no-audio", False),
        "NoFace00000": ("no-face", False),
        "Truncated00": ("truncated", True),
        "Missing0000": ("removed", False),  # HTTP 404
        "SlowVideo00": ("timeout", True),
    }
    # The audio that came down is the speaker's, cut at the segment: the source WAV's
    # samples (16-bit, lossless ALAC on the server) to within one quantisation step.
    from speech2face.audio import load_audio

    wave = load_audio(root / "segments/GoodVideo00/s000004500.mkv")
    source = server.waves[0][int(4.5 * 16000) : int(7.5 * 16000)]
    np.testing.assert_allclose(wave, source, atol=1.5 / 32768)

    # A rerun fetches nothing again and gives up nothing new: the two transient ones are
    # tried again (attempt 2); permanent ones are not.
    code, out, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 75, err  # attempt 2 of 3
    assert "0 fetched, 3 already there, 2 failed now (timeout 1, truncated 1), 3 given up" in out

    # prepare reads the folder as it is.
    from speech2face import data

    shards = tmp_path / "shards"
    data.prepare("avspeech", root, shards, progress=False, identity_threshold=0.2)
    manifest = data.load_manifest(shards)
    assert sum(s["samples"] for s in manifest["splits"].values()) == 3
    assert manifest["splits"]["test"]["samples"] == 1
    batch = data.load_split(shards, "test")
    assert [m["clip"] for m in batch["meta"]] == ["s000002000"]

    # A segment that failed while others of its video came down is reported as skipped.
    for suffix in (".mkv", ".face.npy"):
        (root / "segments" / "GoodVideo00" / f"s000004500{suffix}").unlink()
    shards = tmp_path / "shards-2"
    data.prepare("avspeech", root, shards, progress=False, identity_threshold=0.2)
    manifest = data.load_manifest(shards)
    assert sum(s["samples"] for s in manifest["splits"].values()) == 2
    assert {"item": "GoodVideo00/GoodVideo00/s000004500",
            "reason": "segment not downloaded"} in manifest["skipped"]
    assert manifest["counts"]["clips_skipped"] == 1 + 5  # and the 5 failed videos' clips


def test_a_server_that_does_not_say_the_size(server, tmp_path, capfd):
    """"Content-Range: bytes a-b/*": FFmpeg's seek to the end fails as FFmpeg's own error
    and it reads on. Raised into its callback, it was PyAV's printed traceback and a
    transient failure, tried again by every rerun."""
    csvs = _csvs(tmp_path, train=["NoTotal0000,60.0,63.0,0.5,0.5"], test=[])
    root = tmp_path / "avspeech"
    code, out, err = _run(_download_args(csvs, root, server), capfd)  # (PyAV prints to fd 2)
    assert code == 0 and "1 fetched, 0 already there, 0 failed now" in out, err
    assert "Traceback" not in err and "exception" not in err, err


def test_fetches_only_the_segment(server, tmp_path, capsys):
    csvs = _csvs(tmp_path, train=["LongVideo00,60.0,63.0,0.5,0.5"], test=[])
    root = tmp_path / "avspeech"
    code, out, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 0 and "1 fetched" in out, err
    assert "no failure logged" in out and not (root / "download_log").exists()
    size = len(server.files["LongVideo00.mp4"])
    # Sent counts what the server wrote; a reader that seeks away closes early, so this
    # is an upper bound on what travelled.
    assert server.sent["LongVideo00.mp4"] < 0.25 * size, (server.sent, size)


def test_face_must_be_at_the_given_centre(server, tmp_path, capsys):
    # The speaker's face is in the middle of the frame; the CSV says the top-left corner.
    csvs = _csvs(tmp_path, train=["GoodVideo01,1.0,4.0,0.02,0.02"], test=[])
    root = tmp_path / "avspeech"
    code, out, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 0 and "1 failed now (no-face 1)" in out, (out, err)
    assert not (root / "segments").exists()


def test_max_attempts_then_given_up(server, tmp_path, capsys):
    csvs = _csvs(tmp_path, train=["Truncated00,5.0,7.5,0.5,0.5"], test=[])
    root = tmp_path / "avspeech"
    # exit 75 while an attempt is left, 0 once the segment is given up
    for expected, status in (("1 failed now", 75), ("1 failed now", 0),
                             ("0 failed now, 1 given up", 0)):
        code, out, err = _run(_download_args(csvs, root, server, "--max-attempts", "2"), capsys)
        assert code == status and expected in out, (out, err)


def test_shards_split_the_videos(server, tmp_path, capsys):
    rows = [r for r in TRAIN_ROWS if r.startswith(("GoodVideo", "Missing"))]
    csvs = _csvs(tmp_path, train=rows)
    root = tmp_path / "avspeech"
    for index in range(2):
        code, _, err = _run(
            _download_args(csvs, root, server, "--num-shards", "2", "--shard-index", str(index)),
            capsys,
        )
        assert code == 0, err
    assert len(list((root / "segments").rglob("*.mkv"))) == 3
    logs = sorted(p.name for p in (root / "download_log").iterdir())
    assert len(logs) == 1 and logs[0].endswith("-of-00002.jsonl")  # only one shard had Missing
    # Unsharded rerun: all done or given up, whichever shard did them.
    code, out, _ = _run(_download_args(csvs, root, server), capsys)
    assert "0 fetched, 3 already there, 0 failed now, 1 given up" in out
    assert out.strip().endswith(f"logs: {root / 'download_log'}")  # (none of its own)


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "row, problem",
    [
        ("youtube_id,start,end,x,y", "line 1: start, end, x, y must be numbers"),
        ("GoodVideo00,1.0,4.0,0.5", "line 1: expected 5 columns"),
        ("GoodVideo00,4.0,1.0,0.5,0.5", "line 1: need 0 <= start < end"),
        # fetched before, then refused by prepare: too short for one STFT window
        ("GoodVideo00,1.0,1.0001,0.5,0.5", "line 1: the segment 1.0-1.0001 s is shorter than "
                                           "0.025 s"),
        # a 300-digit segment file name, then a traceback (an overflow in seeking before)
        ("GoodVideo00,1e300,1e301,0.5,0.5", "line 1: end 1e+301 s is past 999,999 s"),
        ("GoodVideo00,999999,1000000.5,0.5,0.5", "line 1: end 1000000.5 s is past 999,999 s"),
        ("GoodVideo00,1.0,4.0,1.5,0.5", "line 1: face centre x, y must be fractions"),
        ("../../etc,1.0,4.0,0.5,0.5", "line 1: '../../etc' is not a video id"),
    ],
)
def test_bad_csv_rows(server, tmp_path, capsys, row, problem):
    csvs = _csvs(tmp_path, train=[row])
    root = tmp_path / "avspeech"
    code, _, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 2
    assert err.strip() == err.strip().splitlines()[0]  # one line
    assert f"avspeech_train.csv: {problem}" in err
    assert not root.exists()  # nothing written


def test_bad_options(server, tmp_path, capsys):
    csvs = _csvs(tmp_path)
    root = tmp_path / "avspeech"
    args = _download_args(csvs, root, server)
    for bad, problem in (
        ("http://127.0.0.1:9/video.mp4", "--url-template: must contain {id}"),
        ("http://127.0.0.1:9/{id}/{name}.mp4",
         "--url-template: only a plain {id} may be filled in, got '{name}'"),
    ):
        args[args.index("--url-template") + 1] = bad
        code, _, err = _run(args, capsys)
        assert code == 2 and problem in err, err
    (tmp_path / "list.csv").write_text(TRAIN_ROWS[0] + "\n")
    code, _, err = _run(_download_args([str(tmp_path / "list.csv")], root, server), capsys)
    assert code == 2 and "list.csv: cannot tell the split" in err
    # a path that does not exist is named as such, whatever its name says
    for missing in ("avspeech_train.csv", "list.csv"):
        code, _, err = _run(_download_args([str(tmp_path / "none" / missing)], root, server),
                            capsys)
        assert code == 2 and f"{missing}: CSV file not found" in err, err
    assert not root.exists()


def _fail_writing_videos(monkeypatch, error: int, after: int = 0) -> None:
    """Writing a segment's video fails with ``error`` after ``after`` videos, once some of
    its bytes reached the disk (as a disk that fills, or a file size limit, fails it)."""
    real = utils.staged_writes
    written = []

    @contextlib.contextmanager
    def failing():
        with real() as stage:
            @contextlib.contextmanager
            def failing_stage(path, mode="wb"):
                with stage(path, mode) as f:
                    if str(path).endswith(".mkv"):
                        written.append(path)
                        if len(written) > after:
                            f.write(b"x" * 1000)
                            raise OSError(error, os.strerror(error))
                    yield f

            yield failing_stage

    monkeypatch.setattr(utils, "staged_writes", failing)


def test_full_disk_stops_cleanly_and_rerun_continues(server, tmp_path, capsys, monkeypatch):
    csvs = _csvs(tmp_path, train=TRAIN_ROWS[:2], test=[])
    root = tmp_path / "avspeech"
    real = utils.staged_writes
    _fail_writing_videos(monkeypatch, errno.ENOSPC, after=1)
    code, _, err = _run(_download_args(csvs, root, server, "--workers", "1"), capsys)
    assert code == 2
    assert "s000004500.mkv: no space left on device" in err and len(err.splitlines()) == 1
    left = sorted(p.name for p in (root / "segments").rglob("*"))
    assert left == ["GoodVideo00", "s000001000.face.npy", "s000001000.mkv"]  # no temp file
    assert not (root / "download_log").exists()  # not the video's fault: not logged
    monkeypatch.setattr(utils, "staged_writes", real)
    code, out, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 0 and "1 fetched, 1 already there" in out, err


def test_a_full_disk_leaves_no_half_record_in_the_log(server, tmp_path, capsys, monkeypatch):
    """The failure log's records are whole lines: a write that fills the disk part-way is
    cut off again, and a line torn anyway (a crash mid-write) is cut before the next."""
    csvs = _csvs(tmp_path, train=TRAIN_ROWS[:1], test=[])
    root = tmp_path / "avspeech"
    log = root / "download_log" / "shard-00000-of-00001.jsonl"
    log.parent.mkdir(parents=True)
    log.write_bytes(b'{"key": "Other/s1", "attempt": 1, "transient": true}\n{"key": "Oth')
    real = os.write

    def disk_fills(fd, data):
        if os.fstat(fd).st_ino == log.stat().st_ino:
            real(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    def cut_short(f, *args):
        raise download.Failure("truncated", "cut short", transient=True)

    monkeypatch.setattr(download, "_write_segment", cut_short)
    monkeypatch.setattr(download.os, "write", disk_fills)
    code, _, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 2 and "shard-00000-of-00001.jsonl: no space left on device" in err, err
    # the torn line is gone, and so are the 10 bytes of the record that did not fit
    assert log.read_bytes() == b'{"key": "Other/s1", "attempt": 1, "transient": true}\n'
    monkeypatch.setattr(download.os, "write", real)
    code, _, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 75, err  # the segment cut short: attempt 1 of 3
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["key"], r["attempt"]) for r in records] == [
        ("Other/s1", 1), ("GoodVideo00/s000001000", 1)]


def test_a_file_size_limit_stops_the_run(server, tmp_path, capsys, monkeypatch):
    csvs = _csvs(tmp_path, train=TRAIN_ROWS[:1], test=[])
    root = tmp_path / "avspeech"

    _fail_writing_videos(monkeypatch, errno.EFBIG)
    code, _, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "s000001000.mkv: file too large" in err
    assert not (root / "download_log").exists()  # not the video's fault: not logged


@pytest.mark.parametrize("video, kind", [("MidFail0000", "network"),
                                          ("ShortBody00", "network")])
def test_a_request_failing_once_ffmpeg_reads_is_logged_without_tracebacks(
        server, tmp_path, capfd, video, kind):
    """A 500 or a response cut short after the file's index was read: one failure of its
    kind in the log, and no PyAV "exception being dropped" traceback on stderr (raised
    inside FFmpeg's read callback, it was printed at every retry)."""
    csvs = _csvs(tmp_path, train=[f"{video},60.0,63.0,0.5,0.5"], test=[])
    root = tmp_path / "avspeech"
    assert cli.main(_download_args(csvs, root, server)) == 75  # a transient failure
    err = capfd.readouterr().err
    assert "Traceback" not in err and "PyAV" not in err, err
    log = [json.loads(line) for p in (root / "download_log").glob("*.jsonl")
           for line in p.read_text().splitlines()]
    assert [(r["video"], r["kind"], r["transient"]) for r in log] == [(video, kind, True)]


def test_a_full_disk_while_muxing_is_one_error_without_tracebacks(tmp_path, capfd):
    """FFmpeg writes a segment through PyAV: the first ENOSPC comes back as it was, and
    PyAV prints nothing of it."""

    class Full:
        def __init__(self):
            self.size = 0

        def write(self, data):
            if self.size + len(data) > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.size += len(data)

        def seek(self, offset, whence=0):
            return offset

        def tell(self):
            return self.size

    frames = [(0.0, np.zeros((64, 64, 3), np.uint8))]
    with pytest.raises(OSError) as error:
        download._write_segment(Full(), np.full(16000, 0.1, np.float32), frames)
    assert error.value.errno == errno.ENOSPC
    err = capfd.readouterr().err
    assert "Traceback" not in err and "PyAV" not in err, err


def test_a_segment_is_done_only_with_both_files(server, tmp_path, capsys):
    """The descriptor is renamed into place first, the segment (what marks it done)
    last; a segment left without its descriptor (an older run killed between the two)
    is fetched again, and a folder in the way of the descriptor is named, nothing moved."""
    csvs = _csvs(tmp_path, train=TRAIN_ROWS[:1], test=[])
    root = tmp_path / "avspeech"
    folder = root / "segments" / "GoodVideo00"
    folder.mkdir(parents=True)
    (folder / "s000001000.mkv").write_bytes(b"an older run's, its descriptor never written")
    code, out, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 0 and "1 fetched, 0 already there" in out, err
    assert (folder / "s000001000.face.npy").is_file()
    assert (folder / "s000001000.mkv").stat().st_size > 1000
    for name in ("s000001000.mkv", "s000001000.face.npy"):
        (folder / name).unlink()
    (folder / "s000001000.face.npy").mkdir()
    code, out, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{folder / 's000001000.face.npy'}: is in the way: a folder" in err
    assert sorted(p.name for p in folder.iterdir()) == ["s000001000.face.npy"]  # no temp


def test_ctrl_c_stops_between_segments(server, tmp_path):
    """SIGINT while a video's segments come down: the run ends after the segment in
    hand, not after every segment of the video (a minute or more on long videos)."""
    import signal
    import subprocess
    import sys

    rows = [f"SlowRanges0,{t}.0,{t + 3}.0,0.5,0.5" for t in (10, 40, 70, 100)]
    csvs = _csvs(tmp_path, train=rows, test=[])
    root = tmp_path / "avspeech"
    args = [a for a in _download_args(csvs, root, server, "--workers", "1")
            if a != "--no-progress"]  # with the bar: it ends before the last line
    process = subprocess.Popen([sys.executable, "-m", "speech2face", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = root / "segments" / "SlowRanges0"
    deadline = time.monotonic() + 120
    while not list(folder.glob("*.mkv")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0:  # the signal came as the run was ending: then it is whole
        assert len(list(folder.glob("*.mkv"))) == len(rows) and "Traceback" not in err, err
        assert not list(folder.glob(".*.tmp"))
        return
    assert process.returncode == 130, err
    last = err.replace("\r", "\n").strip().splitlines()[-1:]  # after the progress bar's
    assert last == ["speech2face download: interrupted"], err
    assert len(list(folder.glob("*.mkv"))) <= 2, sorted(folder.iterdir())  # + the one in hand
    assert not (root / "download_log").exists()  # a stop is no failure of the video
    assert not list(folder.glob(".*.tmp"))


def test_an_interrupted_run_closes_its_bar_on_the_way_out(tmp_path, capsys, monkeypatch):
    """The bar closes (and erases itself) before the interrupt leaves the download, while
    the traceback still holds its frame: else it drew its last state under the command's
    "interrupted" line when it was collected."""
    def interrupted(self, video, segments, attempts):
        raise KeyboardInterrupt

    monkeypatch.setattr(download._Fetcher, "video", interrupted)
    with pytest.raises(KeyboardInterrupt) as stopped:
        download.download_avspeech(_csvs(tmp_path), tmp_path / "avspeech", workers=1,
                                   url_template="http://127.0.0.1:9/{id}", progress=True)
    shown = capsys.readouterr().err.split("\n")[-1].split("\r")[-1]  # what a terminal shows
    assert stopped.traceback and shown.strip() == "", shown


def test_classify_failures():
    cases = {
        "[youtube] abc: Private video. Sign in if you've been granted access": "private",
        "[youtube] abc: Video unavailable. This video has been removed by the uploader": "removed",
        "[youtube] abc: Video unavailable. The uploader has not made this video available "
        "in your country": "geo-blocked",
        "[youtube] abc: Sign in to confirm your age": "age-restricted",
        "[youtube] abc: Sign in to confirm you're not a bot": "rate-limited",
        "Unable to download webpage: HTTP Error 429: Too Many Requests": "rate-limited",
        "Unable to download webpage: The read operation timed out": "timeout",
        "Unable to download webpage: HTTP Error 503: Service Unavailable": "network",
        "Unable to download webpage: HTTP Error 403: Forbidden": "forbidden",
        "Unable to download webpage: HTTP Error 451: Unavailable For Legal Reasons":
            "geo-blocked",
        "Unsupported URL: http://127.0.0.1/page.html": "no-format",
        "Invalid data found when processing input": "truncated",
        "something new": "error",
    }
    assert {m: download.classify(m).kind for m in cases} == cases
    assert download.classify("something new").transient
    assert not download.classify("Private video").transient
    assert not download.classify("HTTP Error 451: Unavailable For Legal Reasons").transient


def test_rate_limit_spaces_requests(monkeypatch):
    """--rate-limit 120: requests 0.5 s apart, across threads (on a fake clock)."""
    now = [100.0]
    starts = []

    class Stopping:  # the run's stop event, on the fake clock
        def wait(self, seconds):
            now[0] += seconds
            return False

    monkeypatch.setattr(download.time, "monotonic", lambda: now[0])
    limit = download._RateLimit(120, Stopping())
    for _ in range(4):
        limit.wait()
        starts.append(now[0])
    assert np.diff(starts).tolist() == [0.5, 0.5, 0.5]
    download._RateLimit(None).wait()  # no limit: returns at once
    assert now[0] == starts[-1]
    stopped = threading.Event()
    stopped.set()  # a run that stops does not sit out its turn (up to 1000 min)
    with pytest.raises(download._Stopped):
        download._RateLimit(0.001, stopped).wait()


def test_jobs_of_an_array_run_side_by_side(server, tmp_path, capsys):
    """A job locks its own log, not --out: job 0 runs while job 1 is running; a second
    copy of job 1 is refused (one line, exit 2)."""
    import subprocess
    import sys

    from speech2face import utils

    if not hasattr(utils, "output_lock"):
        pytest.skip("the output lock (issue 16) is not in this tree yet")
    csvs = _csvs(tmp_path, train=[TRAIN_ROWS[0]], test=[])
    root = tmp_path / "avspeech"
    held = download.log_path(root, 1, 2)
    holder = subprocess.Popen(  # job 1, still running (it only holds its lock)
        [sys.executable, "-c", "import sys, time; from speech2face.utils import output_lock\n"
         "with output_lock(sys.argv[1], folder=False):\n print('held', flush=True); "
         "time.sleep(60)", str(held)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for index, expected_code in ((0, 0), (1, 2)):
            args = _download_args(csvs, root, server, "--num-shards", "2",
                                  "--shard-index", str(index))
            code, _, err = _run(args, capsys)
            assert code == expected_code, err
        assert "another run is writing" in err and len(err.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_runs_that_split_the_videos_otherwise_are_refused(server, tmp_path, capsys):
    """While a job of a 2-shard array writes --out, an unsharded run or a 3-shard job
    would fetch and log the same segments: refused in one line; another job of the same
    array runs; once the job has ended, so does any run."""
    csvs = _csvs(tmp_path, train=[TRAIN_ROWS[0]], test=[])
    root = tmp_path / "avspeech"
    with claim_held(root, 2, "download"):  # job 1 of 2, still running
        for sharding in ([], ["--num-shards", "3", "--shard-index", "0"]):
            code, _, err = _run(_download_args(csvs, root, server, *sharding), capsys)
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert "another download into it splits the work into 2 shard(s)" in err
        assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []
        code, _, err = _run(_download_args(csvs, root, server, "--num-shards", "2",
                                           "--shard-index", "0"), capsys)
        assert code == 0, err
    code, out, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 0 and ("1 already there" in out or "1 fetched" in out), (out, err)


# ---------------------------------------------- one CSV reader for download and prepare


def _prepare(root: Path, tmp_path: Path, capsys) -> tuple[int, str, str]:
    return _run(["prepare", "avspeech", "--root", str(root), "--out", str(tmp_path / "shards")],
                capsys)


@pytest.mark.parametrize(
    "rows, problem",
    [
        (["../../outside,1.0,4.0,0.5,0.5"], "line 1: '../../outside' is not a video id"),
        (["GoodVideo00,1.0,4.0,0.5,0.5", ",1.0,4.0,0.5,0.5"], "line 2: '' is not a video id"),
        (["GoodVideo00,1.0,4.0,0.5,0.5,extra"], "line 1: expected 5 columns"),
        (["GoodVideo00,1.0,4_0,0.5,0.5"], "line 1: start, end, x, y must be plain numbers"),
        (["GoodVideo00,1.0,4.0,0.5,0.5", "GoodVideo00,1.0,6.0,0.5,0.5"],
         "line 2: segment GoodVideo00/s000001000 is also at "),
    ],
)
def test_download_and_prepare_refuse_the_same_rows(server, tmp_path, capsys, rows, problem):
    csvs = _csvs(tmp_path, train=rows, test=[])
    root = tmp_path / "avspeech"
    code, _, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"avspeech_train.csv: {problem}" in err
    assert not root.exists()
    # prepare reads a folder with that CSV the same way: nothing outside --root is read,
    # nothing is written.
    root.mkdir()
    (root / "avspeech_train.csv").write_text("\n".join(rows) + "\n")
    code, _, err = _prepare(root, tmp_path, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"avspeech_train.csv: {problem}" in err
    assert not (tmp_path / "shards").exists()
    if "is also at" in problem:  # both lines are named
        assert "avspeech_train.csv:1 " in err


def test_a_repeated_row_is_one_segment(server, tmp_path, capsys):
    from speech2face import data

    row = "GoodVideo00,1.0,4.0,0.5,0.5"
    csvs = _csvs(tmp_path, train=[row, "GoodVideo00,1.000,4.0,0.50,0.5"], test=[])
    root = tmp_path / "avspeech"
    code, out, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 0 and "1 fetched" in out, err
    (unit,) = data.list_avspeech(root)
    assert [(c.name, c.end) for c in unit.clips] == [("s000001000", 3.0)]


@pytest.mark.parametrize("template", [
    "http://127.0.0.1:9/{{id}}.mp4",  # a literal "{id}": every video would 404
    "file:///tmp/{id}.mp4", "ftp://127.0.0.1/{id}.mp4", "/tmp/{id}.mp4",
    "http://127.0.0.1:9/{id!r}.mp4",
    "http://127.0.0.1:99999/{id}.mp4", "http://127.0.0.1:port/{id}.mp4",  # not a port
    "http://:80/{id}.mp4",  # no host
    "http://[::1/{id}.mp4", "http://[zz]/{id}.mp4",  # not an IPv6 address
    "http://127.0.0.1:9/{id:>5}.mp4",
])
def test_url_template_must_be_http_with_an_id_field(server, tmp_path, capsys, template):
    csvs = _csvs(tmp_path)
    root = tmp_path / "avspeech"
    args = _download_args(csvs, root, server)
    args[args.index("--url-template") + 1] = template
    code, _, err = _run(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--url-template: " in err
    assert not root.exists()


@pytest.mark.parametrize("option, value", [
    ("--timeout", "inf"), ("--timeout", "1e300"), ("--timeout", "0"),
    ("--rate-limit", "1e-300"), ("--rate-limit", "inf"), ("--rate-limit", "nan"),
])
def test_timing_options_are_bounded(server, tmp_path, capsys, option, value):
    csvs = _csvs(tmp_path)
    root = tmp_path / "avspeech"
    with pytest.raises(SystemExit) as usage:  # an argparse usage error: one line, exit 2
        cli.main(_download_args(csvs, root, server, option, value))
    err = capsys.readouterr().err
    assert usage.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"argument {option}" in err
    assert not root.exists()
    from speech2face.errors import ConfigError

    with pytest.raises(ConfigError, match=option):  # the library checks them too
        download.download_avspeech(csvs, root, **{option[2:].replace("-", "_"): float(value)})


@pytest.mark.parametrize("code_", [errno.EROFS, errno.EACCES, errno.EPERM])
def test_unwritable_output_stops_cleanly(server, tmp_path, capsys, monkeypatch, code_):
    csvs = _csvs(tmp_path, train=TRAIN_ROWS[:1], test=[])
    root = tmp_path / "avspeech"

    _fail_writing_videos(monkeypatch, code_)
    code, _, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "s000001000.mkv: cannot write" in err
    assert not (root / "download_log").exists()  # not the video's fault: not logged
    assert not list((root / "segments").rglob("*.*"))


def test_rerun_removes_the_temp_files_of_a_killed_write(server, tmp_path, capsys):
    csvs = _csvs(tmp_path, train=TRAIN_ROWS[:1], test=[])
    root = tmp_path / "avspeech"
    folder = root / "segments" / "GoodVideo00"
    folder.mkdir(parents=True)
    stale = [folder / ".s000001000.mkv.ab12cd34.tmp", folder / ".s000001000.face.npy.x1y2z3w4.tmp"]
    for path in stale:
        path.write_bytes(b"half a segment")
    other = folder / ".s000004500.mkv.ab12cd34.tmp"  # another segment's: not this write's
    other.write_bytes(b"")
    code, out, err = _run(_download_args(csvs, root, server, "--num-shards", "2",
                                         "--shard-index", str(download.stable_hash("GoodVideo00")
                                                              % 2)), capsys)
    assert code == 0 and "1 fetched" in out, err
    assert sorted(p.name for p in folder.iterdir()) == [
        other.name, "s000001000.face.npy", "s000001000.mkv"]


@pytest.mark.parametrize("obstacle", [
    "download_log/shard-00000-of-00001.jsonl/", "download_log", "avspeech_train.csv/",
    "segments", "segments/GoodVideo00",
])
def test_obstacles_in_out_are_named(server, tmp_path, capsys, obstacle):
    csvs = _csvs(tmp_path, train=TRAIN_ROWS[:1], test=[])
    root = tmp_path / "avspeech"
    path = root / obstacle.rstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if obstacle.endswith("/"):
        path.mkdir()
    else:
        path.write_text("")
    code, _, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{path}: is in the way" in err
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if not p.name.startswith(".")) == sorted(
        {obstacle.rstrip("/"), *[p.as_posix() for p in Path(obstacle.rstrip("/")).parents
                                 if p.name]})


def test_csv_details(server, tmp_path, capsys):
    root = tmp_path / "avspeech"
    # a byte-order mark is not part of the first id
    bom = tmp_path / "bom_train.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + TRAIN_ROWS[0].encode() + b"\n")
    code, out, err = _run(_download_args([str(bom)], root, server), capsys)
    assert code == 0 and "1 fetched" in out, err
    # a folder is named as one, an empty CSV is refused
    (tmp_path / "dir_train.csv").mkdir()
    (tmp_path / "empty_test.csv").write_text("\n\n")
    for name, problem in (("dir_train.csv", "is a folder"), ("empty_test.csv", "no rows")):
        code, _, err = _run(_download_args([str(tmp_path / name)], tmp_path / "x", server),
                            capsys)
        assert code == 2 and f"{name}: {problem}" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("name", "split"), [
    ("avspeech_train.csv", "train"), ("avspeech_test.csv", "test"), ("small_TEST.CSV", "test"),
    ("train.csv", "train"), ("test.csv", "test"),
    ("mytrain.csv", None), ("contest.csv", None), ("avspeech_train.txt", None),
    ("mytrain.txt", None), ("avspeech_train.csv.gz", None), ("list.csv", None),
])
def test_the_split_is_the_end_of_the_csv_name(tmp_path, capsys, name, split):
    """One rule, as docs/data.md says: *_train.csv or *_test.csv (or train.csv, test.csv)."""
    csv = tmp_path / name
    csv.write_text(TRAIN_ROWS[0] + "\n")
    if split is not None:
        assert download.split_of_csv(csv) == split
        return
    code, out, err = _run(["download", "avspeech", "--csv", str(csv), "--out",
                           str(tmp_path / "out"), "--url-template", "http://127.0.0.1:9/{id}"],
                          capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"speech2face download: error: {csv}: cannot tell the split from the name: call it "
        "*_train.csv or *_test.csv (as the official avspeech_train.csv, avspeech_test.csv)"]
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_named_as_such(tmp_path, capsys):
    (tmp_path / "out").write_text("notes\n")
    csv = tmp_path / "avspeech_train.csv"
    csv.write_text(TRAIN_ROWS[0] + "\n")
    for extra in ([], ["--num-shards", "2"]):
        code, _, err = _run(["download", "avspeech", "--csv", str(csv), "--out",
                             str(tmp_path / "out"), *extra], capsys)
        assert code == 2 and err.strip() == (f"speech2face download: error: {tmp_path / 'out'}: "
                                             "is a file; the output is a folder"), err
    assert (tmp_path / "out").read_text() == "notes\n"


def test_every_failure_kind_is_documented():
    import re

    source = Path(download.__file__).read_text()
    kinds = {k for k, _, _ in download._FAILURE_KINDS} | set(
        re.findall(r'Failure\(\s*"([a-z-]+)"', source))
    docs = (Path(__file__).parents[1] / "docs" / "data.md").read_text()
    assert {k for k in kinds if f"| `{k}` |" not in docs} == set()


def test_audio_without_timed_frames_says_so():
    """A decode that yields no timed audio frame is "truncated", with no made-up time."""

    class Stream:
        rate = 16000

    class Container:
        duration = None
        streams = type("S", (), {"audio": [Stream()]})()

        def seek(self, *args, **kwargs):
            pass

        def decode(self, stream):
            return iter(())

    segment = download.Segment("GoodVideo00", 1.0, 4.0, 0.5, 0.5, "train", "x.csv:1")
    fetcher = download._Fetcher(Path("."), download.YOUTUBE_URL, 1.0, 720, None, None)
    with pytest.raises(download.Failure) as failure:
        fetcher._audio(Container(), segment)
    assert failure.value.kind == "truncated"
    assert "no timed" in failure.value.message and "0.00 s" not in failure.value.message


def test_a_segment_is_the_same_bytes_on_every_run():
    """A rerun or another job writes a segment byte for byte as before (Matroska's
    random track UIDs and the muxer's version string are left out)."""
    import io

    rng = np.random.default_rng(0)
    wave = 0.1 * rng.standard_normal(16000).astype(np.float32)
    frames = [(0.5, rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))]
    written = []
    for _ in range(2):
        f = io.BytesIO()
        download._write_segment(f, wave, frames)
        written.append(f.getvalue())
    assert written[0] == written[1] and len(written[0]) > 1000


def test_a_truncated_segment_is_said_to_be_truncated(tmp_path):
    """prepare reads a segment's middle frame; a segment cut short said "cannot decode
    video: Operation not permitted" (FFmpeg's EPERM from the seek)."""
    from speech2face.data.prepare import read_video_frame
    from speech2face.errors import ImageError

    rng = np.random.default_rng(0)
    frames = [(1.0 + 0.04 * i, rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
              for i in range(3)]
    with open(tmp_path / "whole.mkv", "wb") as f:
        download._write_segment(f, rng.uniform(-0.1, 0.1, 48000).astype(np.float32), frames)
    assert read_video_frame(tmp_path / "whole.mkv", 1.04).shape == (240, 320, 3)
    (tmp_path / "cut.mkv").write_bytes((tmp_path / "whole.mkv").read_bytes()[:4000])
    with pytest.raises(ImageError, match="cannot seek to the frame at 1.04 s "
                                         r"\(a truncated or damaged file\?\)"):
        read_video_frame(tmp_path / "cut.mkv", 1.04)


def test_the_face_is_checked_on_the_frame_as_stored(server, tmp_path, capsys):
    """The descriptor is that of the stored (re-encoded) middle frame, the frame prepare
    reads: checked on the original, a face just above the detector's cut-off could be
    lost in the re-encoding, and prepare skipped a segment download had counted."""
    from speech2face.data import identities
    from speech2face.data.prepare import read_video_frame

    csvs = _csvs(tmp_path, train=TRAIN_ROWS[:1], test=[])
    root = tmp_path / "avspeech"
    code, _, err = _run(_download_args(csvs, root, server), capsys)
    assert code == 0, err
    segment = root / "segments" / "GoodVideo00" / "s000001000.mkv"
    stored = read_video_frame(segment, 1.5)  # the middle of 1.0-4.0 s, from the start
    expected = identities.face_descriptor(stored, (0.5, 0.5))
    saved = np.load(identities.descriptor_path(segment))
    np.testing.assert_allclose(saved, expected, atol=1e-6)
