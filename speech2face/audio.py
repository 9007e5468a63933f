"""Audio front end: any audio or video file -> 16 kHz mono -> 6 s -> compressed complex STFT.

Paper section 3.1: "we use up to 6 seconds of audio ... resampled at 16 kHz and only a
single channel is used. Spectrograms are computed by taking STFT with a Hann window of
25 mm, the hop length of 10 ms, and 512 FFT frequency bands. Each complex spectrogram S
subsequently goes through the power-law compression, resulting sgn(S)|S|^0.3 for real
and imaginary independently."

Framing follows TensorFlow's ``tf.signal.stft`` (README, "Decisions"): frames of 400
samples start every 160 samples with no centring, each is windowed by a periodic Hann
window of 400 and zero-padded *at its end* to 512 before the real FFT. That gives the
paper's 598 frames for 6 s; librosa/torch with ``center=True`` give 601 frames and a
window centred in the 512-sample frame, which changes the phase.
"""

from __future__ import annotations

import errno
import functools
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from speech2face.errors import AudioError
from speech2face.utils import is_whole

if TYPE_CHECKING:
    import torch

# torch is imported where the spectrogram needs it, not here: decoding needs only numpy,
# soundfile and PyAV, and prepare's worker processes, which only decode, would otherwise
# spend 2 CPU-seconds each importing torch (docs/benchmarks.md).

SAMPLE_RATE = 16_000  # Hz (paper 3.1)
CLIP_SECONDS = 6.0  # seconds of speech per example (paper 3.1)
CLIP_SAMPLES = int(SAMPLE_RATE * CLIP_SECONDS)  # 96,000
WIN_LENGTH = 400  # 25 ms window (paper 3.1)
HOP_LENGTH = 160  # 10 ms hop (paper 3.1)
N_FFT = 512  # FFT size (paper 3.1)
MIN_SECONDS = WIN_LENGTH / SAMPLE_RATE  # the shortest clip load_audio accepts: one window
N_FREQ = N_FFT // 2 + 1  # 257 frequency bins
POWER_LAW = 0.3  # sign(x)|x|^0.3 on real and imaginary parts (paper 3.1)
MAX_SECONDS = 600.0  # longest clip the spectrogram command (and fit_duration) makes
MAX_SAMPLE_RATE = 768_000  # the highest rate audio interfaces record at
# A file's own rate below this holds no speech to speak of (telephones record at 8 kHz):
# a header saying 1 Hz is damaged, and its "audio" was resampled 16,000-fold.
MIN_FILE_RATE = 4_000

# Formats libsndfile reads directly and partially (fast path); everything else goes
# through FFmpeg (PyAV): containers with an audio track (mp4, m4a, webm, mkv, ...), and
# MP3, which libsndfile decodes with libmpg123, a library that prints notes and warnings
# about damaged streams straight onto the C stderr; FFmpeg reports the same damage
# through its log, which PyAV keeps quiet, and we turn it into one AudioError line.
_RESAMPLE_MARGIN = 0.05  # seconds decoded past max_seconds, for the resampler's filter
_SNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au"}
# Audio files and videos with an audio track, as datasets hold them.
AUDIO_SUFFIXES = (".wav", ".flac", ".m4a", ".aac", ".mp3", ".ogg", ".opus")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
# What the commands look for in a folder given as input (any file can be named directly).
MEDIA_SUFFIXES = tuple(sorted({*_SNDFILE_SUFFIXES, *AUDIO_SUFFIXES, *VIDEO_SUFFIXES}))
# The first bytes of the formats libsndfile reads for us (WAV, RF64, BW64, FLAC, Ogg,
# AIFF, AU): a file named .wav that holds anything else (an MP3, say, which libsndfile's
# libmpg123 would decode with warnings printed on the process's stderr) goes to FFmpeg.
_SNDFILE_MAGIC = (b"RIFF", b"RF64", b"BW64", b"fLaC", b"OggS", b"FORM", b".snd")


# --------------------------------------------------------------------------- decoding


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode an audio or video file to float32 mono at ``sample_rate``: in [-1, 1] from
    integer formats; float formats as stored (their peak at most ``PEAK_LIMIT``).

    Multi-channel audio is averaged to mono; the resampler is soxr (band-limited, high
    quality). With ``max_seconds`` only that much of the file is decoded, so taking 6 s
    from a two-hour recording costs the same as from a 6-s clip.

    Returns:
        ``(N,)`` float32.

    Raises:
        AudioError: missing, empty, truncated or non-audio file, no audio track, an
            unsupported codec, or a signal that is all zeros or not finite.
    """
    _check_sample_rate(sample_rate)
    if max_seconds is not None:
        _check_seconds(max_seconds, "max_seconds", sample_rate)
    if not isinstance(path, (str, os.PathLike)) or path == "":
        raise AudioError(None, f"path must be a file's path (str or os.PathLike), got "
                               f"{path!r:.60}")
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found" if not path.exists() else "not a regular file")
    try:  # the decoders would call a file they may not open "not audio"
        with open(path, "rb") as f:
            head = f.read(len(_SNDFILE_MAGIC[0]))
    except OSError as error:
        raise AudioError(path, f"cannot be read ({error.strerror})") from None
    if not head:  # (its size is no guide: /proc's files say 0 and are not empty)
        raise AudioError(path, "empty file")

    # Decode a little past the cut so the resampler's filter sees the samples after it.
    decode_seconds = None if max_seconds is None else max_seconds + _RESAMPLE_MARGIN
    wave, native_rate = None, None
    if _for_sndfile(path, head):
        wave, native_rate = _read_sndfile(path, decode_seconds)
    if wave is None:
        wave, native_rate = _read_ffmpeg(path, decode_seconds)
    if wave.size == 0:
        raise AudioError(path, "no audio samples (truncated or empty stream)")
    if head == b"OggS" and (decode_seconds is None or wave.shape[0] < decode_seconds *
                            native_rate) and (problem := _ogg_end_problem(path)):
        # An Ogg file's length is read from its last page: one cut short decodes whole.
        raise AudioError(path, f"truncated: {problem}, after "
                               f"{wave.shape[0] / native_rate:.2f} s of audio")
    if not MIN_FILE_RATE <= native_rate <= MAX_SAMPLE_RATE:
        raise AudioError(path, f"sample rate {native_rate:,} Hz is outside {MIN_FILE_RATE:,} "
                               f"to {MAX_SAMPLE_RATE:,} Hz (a damaged header, or not speech)")
    check_signal(wave, path)
    if native_rate != sample_rate:
        import soxr

        wave = soxr.resample(wave, native_rate, sample_rate, quality="HQ")
    if max_seconds is not None:
        wave = wave[: seconds_samples(max_seconds, sample_rate)]
    _check_long_enough(path, wave.shape[0], sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


# A signal whose loudest sample is below this (-80 dBFS; 16-bit audio's smallest step is
# -90) holds no speech to hear: refused as silent. One whose samples pass PEAK_LIMIT is
# not a waveform in [-1, 1] (typically integers stored as floats: divide by 32768).
SILENCE_PEAK = 1e-4
PEAK_LIMIT = 16.0


def check_signal(wave: np.ndarray, path: str | os.PathLike | None = None) -> None:
    """AudioError (naming ``path``) unless ``wave`` is finite, not silent and within
    ``PEAK_LIMIT``: what a file's decoded samples and an API caller's array must be."""
    with np.errstate(over="ignore"):  # an overflow is diagnosed just below
        energy = float(np.dot(wave, wave))  # one pass: NaN/inf if any sample is, 0 if silent
    if not math.isfinite(energy) and not np.isfinite(wave).all():
        raise AudioError(path, "signal contains NaN or infinite samples")
    peak = float(np.abs(wave).max())
    if peak > PEAK_LIMIT:
        raise AudioError(path, f"sample values reach {peak:.3g}, far outside [-1, 1] "
                               f"(corrupt, not audio, or integers stored as floats)")
    if peak < SILENCE_PEAK:
        loudest = "all samples are zero" if peak == 0 else \
            f"its loudest sample is {20 * math.log10(peak):.0f} dBFS"
        raise AudioError(path, f"signal is silent ({loudest})")


def _check_sample_rate(sample_rate) -> None:
    if not is_whole(sample_rate, 1, MAX_SAMPLE_RATE):
        raise AudioError(None, f"sample_rate must be a whole number of Hz from 1 to "
                               f"{MAX_SAMPLE_RATE}, got {sample_rate!r}")


def _check_seconds(seconds, name: str, sample_rate: int) -> None:
    """AudioError unless ``seconds`` is a finite number (numpy's too) giving at least one
    sample at ``sample_rate``."""
    import numbers

    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or \
            not math.isfinite(seconds) or seconds_samples(seconds, sample_rate) < 1:
        raise AudioError(None, f"{name} must be a positive number of seconds (at least one "
                               f"sample at {sample_rate} Hz), got {seconds!r}")


def _check_long_enough(path: Path, samples: int, sample_rate: int) -> None:
    """Raise unless the decoded clip fills at least one spectrogram window (25 ms)."""
    if samples < seconds_samples(MIN_SECONDS, sample_rate):
        raise AudioError(path, f"too short: {samples / sample_rate:.4f} s of audio at "
                               f"{sample_rate} Hz, at least {MIN_SECONDS} s is needed")


def _read_sndfile(path: Path, max_seconds: float | None) -> tuple[np.ndarray | None, int | None]:
    """libsndfile fast path; ``(None, None)`` when it cannot open the file (FFmpeg tries)."""
    import soundfile as sf

    try:
        with sf.SoundFile(path) as f:
            declared = f.frames
            # A stream of unknown length, or a WAV written as a stream (its header's data
            # size 0, the samples after it): FFmpeg reads it to its end.
            if declared >= _SF_UNKNOWN_FRAMES or declared == 0:
                return None, None
            if path.suffix.lower() == ".wav":
                # libsndfile silently shrinks a WAV's length to the bytes present.
                declared = max(declared, _wav_declared_frames(path) or 0)
            want = (
                declared
                if max_seconds is None
                else min(declared, _frames(max_seconds, f.samplerate))
            )
            # 16-bit PCM (VoxCeleb1, most WAVs) is read raw: libsndfile's own int-to-float
            # conversion costs ten times the read, numpy's a fraction of it.
            pcm16 = f.subtype == "PCM_16"
            data = f.read(want, dtype="int16" if pcm16 else "float32", always_2d=True)
            rate = f.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return None, None
    _check_complete(path, data.shape[0] / rate, want / rate, declared / rate)
    return _downmix(data), rate


# The longest an Ogg page can be: its 27-byte header, 255 lacing values, 255 x 255 bytes.
_OGG_PAGE_MAX = 27 + 255 + 255 * 255


def _ogg_end_problem(path: Path) -> str | None:
    """What is wrong with an Ogg file's end, or None: its last page must be whole and
    flagged end-of-stream (RFC 3533, the ``header_type`` bit 0x04). libsndfile and FFmpeg
    take the length from the last page there is, so a download cut short reads as a
    shorter, complete file. A file cut at a page boundary and one written without the
    flag look alike: both are refused. Trailing bytes after the last page are allowed;
    where no page starts in the last two pages' worth of bytes, nothing is said."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 2 * _OGG_PAGE_MAX))
        tail = f.read()
    at = tail.rfind(b"OggS")
    while at >= 0:
        header = tail[at:at + 27]
        if header[4:5] in (b"", b"\0"):  # the only stream structure version, or cut off
            lacing = tail[at + 27:at + 27 + header[26]] if len(header) == 27 else b""
            if len(header) < 27 or len(lacing) < header[26] or \
                    at + 27 + len(lacing) + sum(lacing) > len(tail):
                return "the Ogg stream's last page is cut short"
            if not header[5] & 0x04:
                return ("the Ogg stream has no end-of-stream page (cut short at a page, "
                        "or written without one)")
            return None
        at = tail.rfind(b"OggS", 0, at)  # the pattern inside a page's data
    return None


def _downmix(data: np.ndarray) -> np.ndarray:
    """``(n, channels)`` float or int16 PCM -> ``(n,)`` float32 mean over channels.

    int16 is scaled by 1/32768 as libsndfile does (README, "Decisions"). Adding columns is several
    times faster than ``mean(axis=1)``, which reduces over a length-2 inner axis.
    """
    scale = 1.0 / data.shape[1]
    if data.dtype == np.int16:
        data = data.astype(np.float32)
        scale /= 32768.0
    out = data[:, 0].copy()
    for channel in range(1, data.shape[1]):
        out += data[:, channel]
    if scale != 1.0:
        out *= np.float32(scale)
    return out


def _wav_declared_frames(path: Path) -> int | None:
    """Frames a RIFF/WAVE header promises (its data chunk size over the frame size)."""
    with open(path, "rb") as f:
        header = f.read(4096)
    if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return None
    pos, block_align = 12, None
    while pos + 8 <= len(header):
        chunk, size = header[pos : pos + 4], int.from_bytes(header[pos + 4 : pos + 8], "little")
        if chunk == b"fmt ":
            block_align = int.from_bytes(header[pos + 20 : pos + 22], "little")
        elif chunk == b"data":
            return size // block_align if block_align and size < 0xFFFFFFFF else None
        pos += 8 + size + (size & 1)
    return None


# The demuxers FFmpeg may use on a file we are given: audio and video containers. Not
# the playlist and concatenation formats (hls, dash, concat, ...), which open the files or
# URLs named inside the file: an uploaded HLS playlist made `serve` read a file of the
# uploader's choosing, or wait for ever on a "live" one. Nor any protocol but plain files
# ("file:" in front: a file named "pipe:0" is a file, not standard input).
MEDIA_FORMATS = ("wav,w64,flac,ogg,mp3,aac,ac3,eac3,amr,aiff,caf,au,wv,ape,tta,mov,matroska,"
                 "webm,avi,asf,flv,mpeg,mpegts")


def open_media(source, **options):
    """``av.open`` of a media file's path (or a file object) for reading, allowing only
    :data:`MEDIA_FORMATS` and the file protocol; ``options`` go to ``av.open``."""
    import av

    if isinstance(source, (str, os.PathLike)):
        source = "file:" + os.path.abspath(source)
    return av.open(source, options={"format_whitelist": MEDIA_FORMATS,
                                    "protocol_whitelist": "file"}, **options)


def _read_ffmpeg(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of any container FFmpeg knows, stopping early."""
    import av

    try:
        container = open_media(path, metadata_errors="ignore")
    except av.error.FFmpegError:
        raise AudioError(
            path, "not a readable audio or video file (unknown format, corrupt or truncated)"
        ) from None
    with container:
        streams = container.streams.audio
        if not streams:
            raise AudioError(path, "no audio track")
        stream = streams[0]
        if stream.codec_context is None:  # FFmpeg knows the container but has no decoder
            raise AudioError(path, "unsupported audio codec (FFmpeg has no decoder for it)")
        rate = stream.codec_context.sample_rate or stream.sample_rate
        if not rate:
            raise AudioError(path, "audio track has no sample rate")
        limit = None if max_seconds is None else _frames(max_seconds, rate)
        chunks, total = [], 0
        try:
            for frame in container.decode(stream):
                chunk = _to_float(_frame_array(frame)).mean(axis=0)
                chunks.append(chunk)
                total += chunk.size
                if limit is not None and total >= limit:
                    break
        except av.error.FFmpegError as error:
            if total == 0 and "decoder" in str(error).lower():
                raise AudioError(
                    path, f"unsupported audio codec {stream.codec_context.name!r}"
                ) from None
            raise AudioError(
                path,
                f"corrupt or truncated audio after {total / rate:.2f} s: {_ffmpeg_reason(error)}",
            ) from None
        declared = _audio_seconds(container, stream)
    if not chunks:
        raise AudioError(path, "no audio samples (truncated or empty stream)")
    if declared is not None:
        wanted = declared if max_seconds is None else min(declared, max_seconds)
        _check_complete(path, total / rate, wanted, declared)
    return np.concatenate(chunks).astype(np.float32, copy=False), int(rate)


def _for_sndfile(path: Path, head: bytes | None = None) -> bool:
    """Whether libsndfile decodes ``path``: a suffix it is for and content that starts
    as that kind of file does (the same bytes decode alike whatever their name).
    ``head``: the file's first bytes, where the caller has read them."""
    if path.suffix.lower() not in _SNDFILE_SUFFIXES:
        return False
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(len(_SNDFILE_MAGIC[0]))
        except OSError:
            return False
    return head in _SNDFILE_MAGIC


def _stream_seconds(stream) -> float | None:
    """An audio stream's own declared duration, where it has one."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return None


def _audio_seconds(container, stream) -> float | None:
    """The length the file declares for its audio track: the track's own duration; the
    container's only where the track has none and there is no video (a container's
    duration is its longest stream's: a complete 2-s track in a 10-s video, or one
    starting late, was called truncated)."""
    import av

    if (seconds := _stream_seconds(stream)) is not None:
        return seconds
    if container.duration and not container.streams.video:
        return container.duration / av.time_base
    return None


def _frame_array(frame) -> np.ndarray:
    """A decoded audio frame's samples, ``(channels, n)``, in its own sample type, or as
    float32 for one that numpy has no type for (64-bit integers: FFmpeg converts)."""
    import av

    try:
        chunk = frame.to_ndarray()  # (channels, n) planar or (1, n*channels) packed
    except ValueError:
        converter = av.AudioResampler(format="fltp", layout=frame.layout.name,
                                      rate=frame.sample_rate)
        return np.concatenate([f.to_ndarray() for f in converter.resample(frame)], axis=1)
    if not frame.format.is_planar:
        chunk = chunk.reshape(-1, len(frame.layout.channels)).T
    return chunk


_SF_UNKNOWN_FRAMES = 2**62  # libsndfile reports an unknown length as SF_COUNT_MAX (2**63 - 1)


def declared_seconds(path: str | os.PathLike) -> float | None:
    """The duration a file's header declares, read without decoding any audio.

    For refusing long uploads before they are decoded. ``None`` when the file is not
    one libsndfile or FFmpeg can open, or declares no duration (a browser's WebM
    recording); :func:`load_audio` then gives the reason, or decodes at most
    ``max_seconds`` of it.
    """
    import soundfile as sf

    path = Path(path)
    if _for_sndfile(path):
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError, TypeError):
            info = None
        # libsndfile's "unknown" count (a streamed FLAC declares 0 samples): no duration
        if info is not None and info.samplerate and info.frames < _SF_UNKNOWN_FRAMES:
            frames = info.frames
            if path.suffix.lower() == ".wav":  # the header, not the bytes present
                frames = max(frames, _wav_declared_frames(path) or 0)
            return frames / info.samplerate
    import av

    try:
        with open_media(path, metadata_errors="ignore") as container:
            streams = container.streams.audio
            if streams and (seconds := _stream_seconds(streams[0])) is not None:
                return seconds
            if container.duration:  # (at most the audio's: a bound for refusing uploads)
                return container.duration / av.time_base
    except av.error.FFmpegError:
        pass
    return None


def _frames(seconds: float, rate: int) -> int:
    return int(math.ceil(seconds * rate)) + 1


def _check_complete(path: Path, got_seconds: float, wanted_seconds: float,
                    declared_seconds: float) -> None:
    """Raise if far less audio decoded than was asked for (``wanted_seconds``: the header's
    ``declared_seconds``, or less with ``max_seconds``): a truncated download."""
    # Codec priming and padding make declared and decoded lengths differ by a few frames.
    if got_seconds < 0.98 * wanted_seconds - 0.1:
        raise AudioError(
            path,
            f"truncated: header declares {declared_seconds:.2f} s of audio, "
            f"only {got_seconds:.2f} s could be decoded",
        )


def _to_float(chunk: np.ndarray) -> np.ndarray:
    """Integer PCM -> float in [-1, 1] (int16 / 32768, as libsndfile scales it); float
    passes through."""
    if chunk.dtype.kind == "f":
        return chunk.astype(np.float32, copy=False)
    if chunk.dtype.kind == "u":  # unsigned 8-bit PCM is centred at 128
        bits = 8 * chunk.dtype.itemsize
        return (chunk.astype(np.float32) - 2 ** (bits - 1)) / 2 ** (bits - 1)
    return chunk.astype(np.float32) / float(2 ** (8 * chunk.dtype.itemsize - 1))


def _ffmpeg_reason(error: Exception) -> str:
    if getattr(error, "errno", None) == errno.EPERM:  # a decoder's AVERROR(EPERM) on bad
        return "invalid data in the stream"  # data, not a permission ("Operation not permitted")
    return getattr(error, "strerror", None) or str(error).splitlines()[0]


# ------------------------------------------------------------------------- durations


def seconds_samples(seconds: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Samples in ``seconds`` of audio at ``sample_rate``, to the nearest sample."""
    return int(round(seconds * sample_rate))


def spectrogram_frames(samples: int) -> int:
    """Frames :func:`spectrogram` makes of ``samples`` samples (0 below one window)."""
    return max(0, 1 + (samples - WIN_LENGTH) // HOP_LENGTH)


def frames_seconds(frames: int) -> float:
    """Seconds of the shortest waveform that gives ``frames`` spectrogram frames."""
    return ((frames - 1) * HOP_LENGTH + WIN_LENGTH) / SAMPLE_RATE


N_FRAMES = spectrogram_frames(CLIP_SAMPLES)  # 598 frames for 6 s


def fit_duration(
    wave: np.ndarray | torch.Tensor,
    seconds: float = CLIP_SECONDS,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray | torch.Tensor:
    """Repeat a clip end to end until it lasts ``seconds``, then cut (README, "Decisions").

    Works on the last axis of a numpy array or tensor ``(..., N) -> (..., seconds*rate)``.
    """
    _check_sample_rate(sample_rate)
    _check_seconds(seconds, "seconds", sample_rate)
    if seconds > MAX_SECONDS:  # repeated to hours, a clip fills the memory
        raise AudioError(None, f"seconds must be at most {MAX_SECONDS:g}, got {seconds!r}")
    if not hasattr(wave, "shape") or wave.ndim == 0:
        raise AudioError(None, f"expected a waveform array or tensor (..., N), got "
                               f"{type(wave).__name__}{getattr(wave, 'shape', '')}")
    target = seconds_samples(seconds, sample_rate)
    n = wave.shape[-1]
    if n == 0:
        raise AudioError(None, "cannot fit an empty waveform to a duration")
    repeats = -(-target // n)  # ceil
    if repeats > 1:
        reps = (1,) * (wave.ndim - 1) + (repeats,)
        wave = np.tile(wave, reps) if isinstance(wave, np.ndarray) else wave.repeat(*reps)
    return wave[..., :target]


# ----------------------------------------------------------------------- spectrogram


@functools.lru_cache(maxsize=16)
def _padded_window(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Periodic Hann(400) followed by 112 zeros: a 512-sample frame holding a 400 frame.

    Made once per device and dtype (it cost a tenth of a clip's spectrogram); read only.
    """
    import torch

    # A normal tensor even when first made under torch.inference_mode (reconstruct): an
    # inference tensor cannot take part in a later spectrogram that autograd records.
    with torch.inference_mode(False):
        window = torch.zeros(N_FFT, device=device, dtype=dtype)
        window[:WIN_LENGTH] = torch.hann_window(WIN_LENGTH, periodic=True, device=device,
                                                dtype=dtype)
    return window


def _compress(x: torch.Tensor, exponent: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sign(x)|x|^p`` into ``out`` (a new tensor if None), without autograd."""
    # |x|^p as exp(p log|x|): PyTorch's vectorised log and exp together cost a third of
    # its pow with a fractional exponent, which was most of the front end's time
    # (issue 17). At x = 0, log gives -inf and exp(-inf) = 0, as pow does.
    import torch

    y = x.abs() if out is None else torch.abs(x, out=out)
    return y.log_().mul_(exponent).exp_().copysign_(x)


@functools.cache
def _power_law_function():
    """The autograd function of :func:`power_law` (made on first use: torch is imported
    lazily)."""
    import torch

    class PowerLaw(torch.autograd.Function):
        """``sign(x)|x|^p`` whose gradient is 0, not NaN, where x == 0 (the DC and Nyquist
        bins' imaginary parts are exactly 0)."""

        @staticmethod
        def forward(ctx, x: torch.Tensor, exponent: float) -> torch.Tensor:
            y = _compress(x, exponent)
            ctx.save_for_backward(x, y)
            ctx.exponent = exponent
            return y

        @staticmethod
        def backward(ctx, grad: torch.Tensor):
            x, y = ctx.saved_tensors
            slope = torch.where(x != 0, ctx.exponent * y / x, torch.zeros_like(x))  # p|x|^(p-1)
            return grad * slope, None

    return PowerLaw


def power_law(x: torch.Tensor, exponent: float = POWER_LAW) -> torch.Tensor:
    """``sign(x) * |x|**exponent`` element-wise, with gradient 0 (not NaN) at x == 0."""
    return _power_law_function().apply(x, exponent)


def _stft(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``(..., N + 112)`` -> ``(..., T, F, 2)`` real and imaginary parts, TF framing."""
    import torch

    stft = torch.stft(
        x, n_fft=N_FFT, hop_length=HOP_LENGTH, window=window, center=False, return_complex=True
    )  # (..., F, T) complex, a view of (..., T, F) memory
    return torch.view_as_real(stft.transpose(-2, -1))


def spectrogram(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Power-law compressed complex STFT, TensorFlow framing (paper 3.1; README, "Decisions").

    Args:
        wave: ``(N,)`` or ``(B, N)`` float waveform at 16 kHz (numpy or tensor, any
            device). ``N >= 400``.

    Returns:
        ``(2, T, 257)`` or ``(B, 2, T, 257)`` float tensor on ``wave``'s device, channel 0
        the real and 1 the imaginary part, ``T = 1 + (N - 400) // 160`` (598 for 6 s).
        Differentiable with respect to ``wave``. Its memory is channels-last (real and
        imaginary parts side by side, as the FFT writes them and as the voice encoder's
        convolutions read them): ``.contiguous()`` gives the plain layout if one needs it.
    """
    import torch

    if not isinstance(wave, (np.ndarray, torch.Tensor)):
        raise AudioError(None, f"expected a waveform (numpy array or tensor), got "
                               f"{type(wave).__name__} (a file: clip_spectrogram(path))")
    if isinstance(wave, np.ndarray) and any(step < 0 for step in wave.strides):
        wave = np.ascontiguousarray(wave)  # a reversed view (x[::-1]): torch takes none
    x = torch.as_tensor(wave)
    if not x.is_floating_point():  # int16 PCM cast as it is would be 32,768 times too loud
        raise AudioError(None, f"expected a float waveform in [-1, 1], got {x.dtype} "
                               "(load_audio reads files as float)")
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        x = x.float()  # the CPU FFT has no half precision
    single = x.dim() == 1
    if single:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise AudioError(None, f"expected a waveform (N,) or a batch (B, N), got shape "
                               f"{tuple(x.shape)}")
    if x.shape[-1] < WIN_LENGTH:
        hint = "" if x.shape[0] < WIN_LENGTH else (
            f" (shape {tuple(x.shape)} is a batch of {x.shape[0]} waveforms: for samples by "
            "channels, pass one channel or their mean)")
        raise AudioError(None, f"waveform has {x.shape[-1]} samples, at least {WIN_LENGTH} "
                               f"are needed{hint}")
    # torch.stft frames are N_FFT long; pad the end so the last 400-sample TF frame fits
    # in a 512 frame, and put the window in the first 400 samples of each frame.
    pad = (0, N_FFT - WIN_LENGTH)
    window = _padded_window(x.device, x.dtype)
    # The power law runs on the FFT's own memory order and the result is only permuted:
    # de-interleaving real and imaginary parts into a (B, 2, T, F) copy cost half as much
    # as the FFT itself.
    if x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
        # One clip at a time into one output, padded one at a time too: each clip's
        # samples, frames and FFT stay in the core's cache, so a batch costs per clip what
        # a single clip does (done at once, a batch of 64 streams every intermediate
        # through memory: ~1.2x per clip; padding the whole batch first, ~1.1x).
        out = x.new_empty(x.shape[0], spectrogram_frames(x.shape[-1]), N_FREQ, 2)
        for clip, dest in zip(x, out, strict=True):
            _compress(_stft(torch.nn.functional.pad(clip, pad), window), POWER_LAW, out=dest)
    else:
        out = power_law(_stft(torch.nn.functional.pad(x, pad), window))  # (B, T, F, 2)
    out = out.permute(0, 3, 1, 2)  # (B, 2, T, F), channels-last memory
    return out[0] if single else out


def clip_spectrogram(path: str | os.PathLike, seconds: float = CLIP_SECONDS) -> torch.Tensor:
    """File -> ``(2, T, 257)``: decode ``seconds`` of audio, repeat short clips, transform."""
    wave = load_audio(path, max_seconds=seconds)
    return spectrogram(fit_duration(wave, seconds))


# ------------------------------------------------------------------------------- CLI


def add_spectrogram_arguments(parser) -> None:
    parser.add_argument("audio", nargs="+", help="audio or video files, or folders of them")
    parser.add_argument("-o", "--out", required=True, help="output folder for <name>.npy files")
    from speech2face.cli import bounded

    parser.add_argument(
        "--seconds",
        # At least one STFT frame; at most ten minutes (a 120-MB spectrogram), since a
        # short clip is repeated to the length asked for.
        type=bounded(float, WIN_LENGTH / SAMPLE_RATE, MAX_SECONDS, "clip length"),
        default=CLIP_SECONDS,
        help=f"clip length in seconds, {WIN_LENGTH / SAMPLE_RATE} to {MAX_SECONDS:g}: "
             f"longer audio is cut, shorter repeated (default 6)",
    )


def spectrogram_command(args) -> int:
    from speech2face.utils import find_inputs, resumable_writes
    from speech2face.utils import progress as tqdm

    out = Path(args.out)
    inputs = find_inputs(args.audio, MEDIA_SUFFIXES, AudioError, outputs=(".npy",), out=out)
    if not inputs:
        raise AudioError(args.audio[0], "no audio or video files found")
    # All or nothing: a bad file fails the command before any output appears, and memory
    # stays at one spectrogram however many files there are. A killed run's spectrograms
    # are kept for its rerun (utils.resumable_writes).
    done = 0
    with resumable_writes(out, {"command": "spectrogram", "seconds": args.seconds}) as batch:
        for path, stem in tqdm(inputs, desc="spectrogram", unit="file",
                               disable=len(inputs) < 4):
            name = f"{stem}.npy"
            if batch.done(name, path):
                done += 1
                continue
            buffer = io.BytesIO()
            np.save(buffer, clip_spectrogram(path, args.seconds).numpy())
            batch.write({name: buffer.getvalue()}, path)
    shape = np.load(out / f"{inputs[0][1]}.npy", mmap_mode="r").shape  # all alike
    for path, stem in inputs:
        print(f"{path} -> {out / f'{stem}.npy'} {shape}")
    if done:
        print(f"{done} of {len(inputs)} made by an earlier run that was stopped")
    return 0
