"""Face front end throughput: faces per second on one core for detect + 68 landmarks +
align + dlib embedding on 640 x 480 frames, with the HOG and the CNN detector.

Rates are faces per CPU-second of this single-threaded process (the machine is shared).
Reference, measured in the same run, interleaved frame by frame: dlib's own minimal
pipeline on the same frames (detector -> 68-point shape -> ``compute_face_descriptor``
on the frame, no crop), i.e. what the aligned 224 crop and our detection policy cost on
top of plain dlib. Target: the ratio ours / plain dlib is at least 0.8.
"""

from __future__ import annotations

import os
import time

import numpy as np

FRAME_SIZE = (480, 640)  # (height, width): VGA video frames
TARGET_RATIO = 0.8


def _frames(count: int) -> list[np.ndarray]:
    """640 x 480 frames, each with one face photo pasted at a different place and size."""
    import matplotlib.cbook
    from PIL import Image
    from skimage import data

    from speech2face.faces import load_image

    photos = [
        data.astronaut()[:400, 20:420],
        load_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))[
            60:460, 56:456
        ],
    ]
    rng = np.random.default_rng(0)
    frames = []
    for i in range(count):
        frame = np.full((*FRAME_SIZE, 3), 90, np.uint8)
        side = int(rng.integers(260, 400))
        photo = np.asarray(
            Image.fromarray(photos[i % 2]).resize((side, side), Image.Resampling.BILINEAR)
        )
        top, left = int(rng.integers(0, 480 - side + 1)), int(rng.integers(0, 640 - side + 1))
        frame[top : top + side, left : left + side] = photo
        frames.append(frame)
    return frames


def _ours(frame, detector, encoder, clock, times) -> int:
    """Our pipeline on one frame; adds per-stage ``clock`` time to ``times``; 1 if a face."""
    from speech2face.faces import align_face, detect_faces

    t0 = clock()
    faces = detect_faces(frame, detector=detector)
    t1 = clock()
    times["detect+landmarks"] += t1 - t0
    if not faces:
        return 0
    crop, _ = align_face(frame, faces[0])
    t2 = clock()
    encoder.embed(crop[None])
    times["align"] += t2 - t1
    times["embed"] += clock() - t2
    return 1


def _plain_dlib(frame, detector) -> int:
    """dlib's documented minimal pipeline on one frame (no crop); 1 if a face."""
    import dlib

    from speech2face.faces import dlib_model

    # Same upsampling as detect_faces picks for a 640 x 480 frame.
    if detector == "hog":
        rects = list(dlib_model("hog")(frame, 1))
    else:
        rects = [d.rect for d in dlib_model("cnn")(frame, 0)]
    if not rects:
        return 0
    rect = dlib.rectangle(max(rects, key=lambda r: r.area()))
    shape = dlib_model("landmarks68")(frame, rect)
    dlib_model("recognition").compute_face_descriptor(frame, shape)
    return 1


def run(quick: bool) -> dict:
    # One core: dlib's CNN and BLAS may use threads; these must be set before dlib loads.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    import torch

    torch.set_num_threads(1)
    from speech2face.face_encoders import load_face_encoder
    from speech2face.faces import dlib_model

    encoder = load_face_encoder("dlib")
    counts = {"hog": 6 if quick else 40, "cnn": 2 if quick else 8}
    details = {
        "frame": "640x480, one face 260-400 px photo pasted per frame",
        "clock": "process CPU time (one thread), ours and reference interleaved per frame",
        "stages_cpu_s_per_face": {},
    }
    rows = []
    for detector, count in counts.items():
        frames = _frames(count)
        for name in (detector, "landmarks68", "recognition"):
            dlib_model(name)  # load before timing
        # Rates in faces per CPU-second: the machine is shared, and CPU time of a
        # single-threaded process is what one core delivers; wall time is kept too.
        clock = time.process_time
        stages = {"detect+landmarks": 0.0, "align": 0.0, "embed": 0.0}
        found = ref_found = 0
        ours_cpu = ref_cpu = ours_wall = 0.0
        _ours(frames[0], detector, encoder, clock, dict(stages))  # warm-up
        for frame in frames:  # interleaved, so load changes hit both alike
            w, c = time.perf_counter(), clock()
            found += _ours(frame, detector, encoder, clock, stages)
            ours_cpu, ours_wall = ours_cpu + clock() - c, ours_wall + time.perf_counter() - w
            c = clock()
            ref_found += _plain_dlib(frame, detector)
            ref_cpu += clock() - c

        ours_rate, ref_rate = found / ours_cpu, ref_found / ref_cpu
        ratio = ours_rate / ref_rate if ref_rate else float("nan")
        rows.append(
            {
                "benchmark": f"faces/s, {detector} detect+landmarks+align+embed, 640x480, 1 core",
                "result": f"{ours_rate:.2f} faces/s",
                "reference": f"{ref_rate:.2f} faces/s (plain dlib, same frames)",
                "ratio": round(ratio, 2),
                "target": f">= {TARGET_RATIO} ({'met' if ratio >= TARGET_RATIO else 'NOT met'})",
            }
        )
        details["stages_cpu_s_per_face"][detector] = {
            k: round(v / max(found, 1), 4) for k, v in stages.items()
        }
        details[f"{detector}_frames"] = count
        details[f"{detector}_faces_found"] = found
        details[f"{detector}_reference_faces_found"] = ref_found
        details[f"{detector}_faces_per_wall_second"] = round(found / ours_wall, 2)
        # ~1.0 = a single busy thread that never waited for the shared CPU.
        details[f"{detector}_cpu_over_wall"] = round(ours_cpu / ours_wall, 2)
    return {"rows": rows, "details": details}
