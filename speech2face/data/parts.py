"""The files of a ``prepare`` run beside its shards: the progress file of an unfinished
part, the part manifests, and their merge into ``manifest.json``.

A run (one ``--shard-index`` of ``--num-shards``) is a *part*. While it runs, its
progress file (``parts/progress-I-of-N.json``) records the run's identity (arguments and
a fingerprint of its inputs), where it is (window and samples done) and what its
completed shards hold; when it ends, its part manifest (``parts/manifest-I-of-N.json``)
replaces it. The run that completes the last part merges them all. Nothing read back
from these files is used before it is checked here (``docs/data.md``): a damaged or
edited file is refused in one line naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from speech2face.data.datasets import SPLITS, Unit, _subdirs
from speech2face.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    PARTS_DIR,
    _manifest_problem,
    check_shard,
    is_clip_seconds,
    iterate_tar,
)
from speech2face.errors import DataError, OtherRunError
from speech2face.utils import SHARDS_CLAIM, atomic_write, is_names, is_number, is_whole


def part_name(shard_index: int, num_shards: int) -> str:
    """"00003-of-00016": the part's name in its files' names."""
    return f"{shard_index:05d}-of-{num_shards:05d}"


def fingerprint(obj) -> str:
    """SHA-256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def new_state() -> dict:
    """The progress state of a part that has written nothing yet."""
    return {
        "next_window": 0,
        "samples_done": 0,
        "splits": {},
        "skipped": [],
        "counts": {},
        "landmarks_sum": None,
        "landmarks_count": 0,
        "feature_dim": None,
    }


def read_json(path: Path):
    """A JSON file's content, or a DataError naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise DataError(path, f"unreadable ({type(error).__name__}: {error}); "
                              "use a new --out") from None


def listing_fingerprint(units: list[Unit], root: str | os.PathLike | None = None) -> str:
    """SHA-256 of a listing of units, every field of every unit, clip and frame in order
    (as compact JSON, a unit at a time). With ``root``, the paths are taken without it:
    the whole input listing's fingerprint that parts share, the same on machines that
    mount the dataset at different paths. The JSON of a whole VoxCeleb2-size listing
    (150,000 videos) at once took 15 s and 0.9 GB in every job of an array; this about
    2 s and no copy."""
    fields: dict[type, list[str]] = {}

    def plain(item) -> list:  # a dataclass as the list of its fields' values
        names = fields.setdefault(type(item), [f.name for f in dataclasses.fields(item)])
        return [getattr(item, name) for name in names]

    encoder = json.JSONEncoder(default=plain, separators=(",", ":"))
    prefix = None if root is None else json.dumps(str(root))[1:-1]  # as JSON writes it
    digest = hashlib.sha256()
    for unit in units:
        text = encoder.encode(unit)
        digest.update((text.replace(prefix, "") if prefix else text).encode() + b"\n")
    return digest.hexdigest()


def files_fingerprint(units: list[Unit]) -> str:
    """Size and modification time of every file the units read: part of one part's run
    identity, so that a rerun after inputs were changed in place (same names and sizes,
    e.g. audio normalised) is refused instead of mixing old and new samples. Not in the
    fingerprint parts share (:func:`listing_fingerprint`): parts may run on machines
    whose copies of the dataset have other times. The paths themselves are in the
    listing's fingerprint; here, a file at a time, only what ``stat`` says of them."""
    paths = sorted({c.path for u in units for c in u.clips} | {f.path for u in units
                                                                for f in u.frames})
    digest = hashlib.sha256()
    for path in paths:
        try:
            info = os.stat(path)
            digest.update(f"{info.st_size} {info.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(b"-\n")
    return digest.hexdigest()


# ======================================================== validating what a file holds
#
# Nothing read back from a progress file or a part manifest is used before it is
# checked here: a damaged or edited file is refused in one line naming it.

_REDO = "remove it to redo this part, or use a new --out"

MAX_COUNT = 2**53  # what a JSON number holds exactly; no run counts that many of anything


def _record_problem(record: dict, out: Path) -> str | None:
    """What is wrong with the samples written so far as a progress file's state or a
    part manifest records them, or None. Shard entries are checked as the loader checks
    a manifest (paths inside ``out``), and must be on disk with their recorded size."""
    splits = record.get("splits")
    names = sorted({i for split in splits.values() if isinstance(split, dict)
                    and is_names(split.get("identities")) for i in split["identities"]}
                   if isinstance(splits, dict) else ())
    view = {"identities": names, "encoder": "", "feature_dim": record.get("feature_dim"),
            "splits": splits}
    problem = _manifest_problem(view, out)
    if problem:
        return problem
    for name, split in splits.items():
        if not is_names(split.get("identities")):
            return f"split {name!r} has no list of identities"
        for shard in split["shards"]:
            path = out / shard["path"]
            if not path.is_file() or path.stat().st_size != shard["size"]:
                return f"shard {shard['path']} is missing or not of its recorded size"
    counts = record.get("counts")
    if not (isinstance(counts, dict) and all(is_whole(v, 0, MAX_COUNT) for v in counts.values())):
        return "'counts' is not a mapping of counts"
    skipped = record.get("skipped")
    if not (isinstance(skipped, list)
            and all(is_names(s) and len(s) == 2 for s in skipped)):
        return "'skipped' is not a list of [item, reason] pairs"
    train = splits.get("train", {}).get("samples", 0)
    if record.get("landmarks_count") != train or not is_whole(train, 0):
        return f"'landmarks_count' is not the number of training samples ({train})"
    if not _is_landmarks_sum(record.get("landmarks_sum"), train):
        return "'landmarks_sum' is not a (68, 2) sum of landmarks"
    return None


def _is_landmarks_sum(value, count: int) -> bool:
    if count == 0:
        return value is None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    # landmarks are pixels of a 224 x 224 crop, give or take: no sum is near 1e308
    return (array.shape == (68, 2) and bool(np.isfinite(array).all())
            and float(np.abs(array).max()) <= 1e6 * count)


def _part_problem(part, out: Path) -> str | None:
    """What is wrong with a part manifest, or None."""
    if not isinstance(part, dict):
        return "not a JSON object"
    if part.get("format") != FORMAT_VERSION:
        return f"format {part.get('format')!r}, this version writes {FORMAT_VERSION}"
    if not isinstance(part.get("run"), dict):
        return "'run' is not a JSON object"
    for key in ("part", "dataset", "encoder"):
        if not isinstance(part.get(key), str):
            return f"{key!r} is not a name"
    for key in ("samples_per_shard", "crops_per_sample"):
        if not is_whole(part.get(key), 1):
            return f"{key!r} is not a positive integer"
    if not is_clip_seconds(part.get("seconds")):
        return "'seconds' is not a positive number of seconds"
    options = part["run"].get("options")
    if not (isinstance(options, dict) and options.get("dataset") == part["dataset"]
            and options.get("encoder") == part["encoder"]):
        return "'dataset' or 'encoder' is not its run's"
    if not _is_merging_report(part["run"].get("identity_merging")):
        return "'run.identity_merging' is not a report of identity merging"
    return _record_problem(part, out)


def _is_merging_report(report) -> bool:
    """None, or what ``identities.merge_units`` reports (counts, files, the settings)."""
    if report is None:
        return True
    counts = ("videos", "identities", "merged_videos", "moved_videos", "videos_without_face")
    return (isinstance(report, dict) and all(is_whole(report.get(k), 0) for k in counts)
            and is_names(report.get("unreadable_descriptor_files"))
            and is_number(report.get("threshold"), 0) and isinstance(report.get("linkage"), str))


def read_part(path: Path, out: Path) -> dict:
    """A part manifest, validated (DataError naming it otherwise)."""
    part = read_json(path)
    problem = _part_problem(part, out)
    if problem is None and path.name != f"manifest-{part['part']}.json":
        problem = f"it is part {part['part']!r}"
    if problem:
        raise DataError(path, f"malformed part manifest: {problem}; {_REDO}")
    return part


def _state_problem(state, windows: list[list[Unit]], out: Path) -> str | None:
    """What is wrong with a progress file's state for this run's windows, or None."""
    if not isinstance(state, dict):
        return "'state' is not a JSON object"
    problem = _record_problem(state, out)
    if problem:
        return problem
    window, done = state.get("next_window"), state.get("samples_done")
    if not (is_whole(window, 0) and window <= len(windows)):
        return f"'next_window' is not a window number in [0, {len(windows)}]"
    clips = [sum(len(u.clips) for u in w) for w in windows] + [0]
    if not (is_whole(done, 0) and done <= clips[window]):
        return f"'samples_done' is not in [0, {clips[window]}] (window {window}'s clips)"
    written = sum(split["samples"] for split in state["splits"].values())
    if not done <= written <= sum(clips[:window]) + done:
        return f"its shards hold {written} samples, more or fewer than its windows can"
    return None


def resume_state(path: Path, run_id: dict, processing: int, windows: list[list[Unit]],
                 out: Path) -> dict:
    """The validated state of the progress file of an unfinished part begun with
    ``run_id`` by prepare's ``processing`` version."""
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise DataError(path, f"malformed progress file: not a JSON object; {_REDO}")
    part = path.stem[len("progress-"):]
    if saved.get("run") != run_id:
        raise OtherRunError(
            out,
            f"holds an unfinished part {part} with other arguments or inputs; "
            "use a new --out or rerun with the same arguments",
        )
    if saved.get("processing") != processing:
        raise DataError(
            out,
            f"holds an unfinished part {part} begun by another version of prepare "
            f"(its processing {saved.get('processing', 'not recorded')!r:.20}, this one's "
            f"{processing!r}); finish it with that version or use a new --out",
        )
    problem = _state_problem(saved.get("state"), windows, out)
    if problem:
        raise DataError(path, f"malformed progress file: {problem}; {_REDO}")
    check_written(saved["state"], out, path, hashed=True)
    return saved["state"]


def check_written(record: dict, out: Path, path: Path, hashed: bool) -> None:
    """Hold the shards that a progress file or part manifest (``record``, read from
    ``path``; its shards' paths and sizes already checked by ``_record_problem``) lists to
    what it says of them: with ``hashed`` each one's SHA-256 (a resumed part re-reads
    what it wrote before it goes on; a merge, which may cover terabytes, does not: the
    loader hashes every shard it reads), and the feature size against the first sample of
    its first shard. A record that does not match its shards would give a manifest the
    loader refuses: DataError naming it."""
    shards = [out / shard["path"] for split in record["splits"].values()
              for shard in split["shards"]]
    if hashed:
        for split in record["splits"].values():
            for shard in split["shards"]:
                try:
                    check_shard(out / shard["path"], shard["size"], shard["sha256"])
                except DataError as error:
                    raise DataError(path, f"does not match its shards ({error}); "
                                          f"{_REDO}") from None
    dim = record.get("feature_dim")
    if shards and dim is not None:
        sample = next(iterate_tar(shards[0]), {})
        try:
            shape = np.load(io.BytesIO(sample["feature.npy"]), allow_pickle=False).shape
        except (KeyError, ValueError, OSError):
            shape = None
        if shape != (dim,):
            raise DataError(path, f"says the features are {dim}-D, but {shards[0].name} holds "
                                  f"{'features of shape ' + str(shape) if shape else 'none'}; "
                                  f"{_REDO}")


def remove_leftovers(out: Path, prefix: str, part: str) -> None:
    """Delete what a killed run of this part left behind: temporary shards, and the
    temporary files of its progress and part manifest (``utils.atomic_write``)."""
    if not out.is_dir():
        return
    for split_dir in _subdirs(out):
        pattern = re.compile(
            rf"\.{re.escape(split_dir.name)}-{re.escape(prefix)}\d{{6}}\.tar\.partial"
        )
        for path in split_dir.iterdir():
            if pattern.fullmatch(path.name):
                path.unlink(missing_ok=True)
    for name in (f"progress-{part}.json", f"manifest-{part}.json"):
        for path in (out / PARTS_DIR).glob(f".{name}.*.tmp"):
            path.unlink(missing_ok=True)


def part_manifest(state: dict, run_id: dict, options, dataset: str, part: str) -> dict:
    """A finished part's manifest from its state (``options``: prepare's Options)."""
    splits = {}
    for split, done in state["splits"].items():
        splits[split] = {
            "samples": done.get("samples", 0),
            "identities": done.get("identities", []),
            "shards": done["shards"],
        }
    return {
        "format": FORMAT_VERSION,
        "run": run_id,
        "part": part,
        "dataset": dataset,
        "encoder": options.encoder,
        "feature_dim": state["feature_dim"],
        "samples_per_shard": options.samples_per_shard,
        "crops_per_sample": options.crops_per_sample,
        "seconds": options.seconds,
        "splits": splits,
        "counts": state["counts"],
        "skipped": state["skipped"],
        "landmarks_sum": state["landmarks_sum"],
        "landmarks_count": state["landmarks_count"],
    }


_PART_FILE = re.compile(r"(?:manifest|progress)-(\d{5})-of-(\d{5})\.json")


def part_paths(out: Path, num_shards: int) -> list[Path]:
    return [out / PARTS_DIR / f"manifest-{part_name(i, num_shards)}.json"
            for i in range(num_shards)]


def part_counts(out: Path) -> set[int]:
    """The ``--num-shards`` of the parts, finished or not, in ``out/parts``."""
    folder = out / PARTS_DIR
    counts = set()
    for path in folder.iterdir() if folder.is_dir() else ():
        if not path.name.startswith(("manifest-", "progress-")):
            continue  # lock and temporary files
        match = _PART_FILE.fullmatch(path.name)
        if match is None or int(match[1]) >= int(match[2]):
            raise DataError(path, "not a part file of prepare "
                                  "(manifest-I-of-N.json or progress-I-of-N.json); remove it")
        counts.add(int(match[2]))
    return counts


# Each part's output lock in ``out/parts`` (utils.lock_file_for); with
# utils.SHARDS_CLAIM in ``out``, the lock files of running (or killed) parts.
_PART_LOCK = re.compile(r"\.\d{5}-of-(\d{5})\.lock")


def claimed_counts(out: Path) -> set[int]:
    """The ``--num-shards`` of the runs whose lock files are in ``out``: parts that have
    started, whether or not they have written a progress file yet."""
    counts = set()
    for pattern, folder in ((SHARDS_CLAIM, out), (_PART_LOCK, out / PARTS_DIR)):
        for path in folder.iterdir() if folder.is_dir() else ():
            match = pattern.fullmatch(path.name)
            if match is not None and int(match[1]) >= 1:
                counts.add(int(match[1]))
    return counts


def maybe_merge(out: Path, num_shards: int) -> None:
    if all(p.is_file() for p in part_paths(out, num_shards)):
        merge_manifests(out, num_shards)


def merge_manifests(out: str | os.PathLike, num_shards: int | None = None) -> dict:
    """Merge the part manifests of ``out/parts`` into ``out/manifest.json`` and return it.

    Shards are listed part by part; identities, skipped inputs and counts are merged
    (sorted), the mean landmarks are the landmark sum over all training crops divided by
    their number. ``num_shards``: the parts' count (default: the only one in the folder).
    Raises DataError when a part is missing, malformed or parts disagree, and when no part
    has a sample; then nothing is written.
    """
    out = Path(out)
    if num_shards is not None and not is_whole(num_shards, 1):
        raise DataError(None, f"num_shards must be a whole number >= 1, got {num_shards!r}")
    counts = part_counts(out)
    if num_shards is None:
        counts = counts or claimed_counts(out)  # parts started that have written nothing yet
        if not counts:
            raise DataError(out, "no part manifests to merge, and no part has started here "
                                 "(run prepare first)")
        if len(counts) > 1:
            raise DataError(out / PARTS_DIR, f"holds parts of runs with --num-shards "
                                             f"{sorted(counts)}; give the one to merge")
        num_shards = counts.pop()
    elif counts and num_shards not in counts:
        given = ", ".join(str(n) for n in sorted(counts))
        raise DataError(out / PARTS_DIR, f"holds no part of a run with --num-shards "
                                         f"{num_shards} (its parts are of --num-shards {given})")
    manifest = merge(out, num_shards)
    with atomic_write(out / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def _spans(numbers: list[int]) -> str:
    """Sorted numbers as runs: ``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _shared_run(run: dict) -> dict:
    """What all parts of one run share: all of its identity but the part's own."""
    return {k: v for k, v in run.items() if k not in ("part", "units", "files")}


def check_siblings(out: Path, num_shards: int, part: str, run_id: dict) -> None:
    """Refuse, before anything is written, a part whose inputs or arguments differ from
    those of the other parts in ``out`` (done or begun): it would do all its work and
    only then fail to merge, leaving a part that blocks its own corrected rerun. A damaged
    file of another part is left for that part's rerun and the merge to name."""
    from speech2face.utils import read_json

    shared = _shared_run(run_id)
    for path in sorted((out / PARTS_DIR).glob(f"*-of-{num_shards:05d}.json")):
        if path.name.endswith(f"-{part}.json"):
            continue
        saved = read_json(path)
        run = saved.get("run") if isinstance(saved, dict) else None
        if not isinstance(run, dict) or _shared_run(run) == shared:
            continue
        options = run.get("options") if isinstance(run.get("options"), dict) else {}
        differ = [f"--{k.replace('_', '-')}" for k in sorted(shared["options"])
                  if options.get(k) != shared["options"][k]] + \
                 [k.replace("_", " ") for k in sorted(shared) if k != "options"
                  and run.get(k) != shared[k]]
        raise DataError(path, f"another part of this --out was prepared with other "
                              f"{', '.join(differ) or 'arguments'}; give this part the same "
                              "inputs and options as the others, or use a new --out")


def merge(out: Path, num_shards: int, pending: tuple[Path, dict] | None = None) -> dict:
    """The merged manifest of the ``num_shards`` parts, validated, not written.
    ``pending``: a part manifest (path, content) not written yet."""
    paths = part_paths(out, num_shards)
    missing = [i for i, path in enumerate(paths)
               if not path.is_file() and (pending is None or path != pending[0])]
    if len(missing) == 1:
        raise DataError(paths[missing[0]], f"part {missing[0]} of {num_shards} is not "
                                           "complete yet (or it ended with no samples: its "
                                           "run said so)")
    if missing:
        raise DataError(out / PARTS_DIR, f"parts {_spans(missing)} of {num_shards} are not "
                                         f"complete yet (no manifest-IIIII-of-"
                                         f"{num_shards:05d}.json)")
    parts = [pending[1] if pending is not None and path == pending[0] else read_part(path, out)
             for path in paths]
    for path, part in zip(paths, parts, strict=True):
        if pending is None or path != pending[0]:  # (the pending one was just written)
            check_written(part, out, path, hashed=False)
    first = parts[0]
    for path, p in zip(paths[1:], parts[1:], strict=True):
        if _shared_run(p["run"]) != _shared_run(first["run"]):
            raise DataError(path, f"was prepared from other inputs or arguments than "
                                  f"{paths[0]}; prepare all parts with the same ones")
    feature_dims = {p["feature_dim"] for p in parts if p["feature_dim"] is not None}
    if len(feature_dims) > 1:
        raise DataError(out, f"parts disagree on the feature size: {sorted(feature_dims)}")
    splits: dict[str, dict] = {}
    for split in SPLITS:
        entries = [p["splits"][split] for p in parts if split in p["splits"]]
        if entries:
            splits[split] = {
                "samples": sum(e["samples"] for e in entries),
                "identities": sorted({i for e in entries for i in e["identities"]}),
                "shards": [s for e in entries for s in e["shards"]],
            }
    counts: Counter = Counter()
    for p in parts:
        counts.update(p["counts"])
    skipped = sorted({(item, reason) for p in parts for item, reason in p["skipped"]})
    total = sum(p["landmarks_count"] for p in parts)
    mean = None
    if total:
        mean = sum(np.asarray(p["landmarks_sum"]) for p in parts if p["landmarks_count"]) / total
        mean = np.asarray(mean, dtype=np.float32).tolist()
    manifest = {
        "format": FORMAT_VERSION,
        "dataset": first["dataset"],
        "encoder": first["encoder"],
        "feature_dim": next(iter(feature_dims), None),
        "samples_per_shard": first["samples_per_shard"],
        "crops_per_sample": first["crops_per_sample"],
        "seconds": first["seconds"],
        "num_parts": num_shards,
        "identities": sorted({i for s in splits.values() for i in s["identities"]}),
        "splits": splits,
        "counts": dict(sorted(counts.items())),
        "skipped": [{"item": item, "reason": reason} for item, reason in skipped],
        "skipped_by_reason": dict(sorted(Counter(reason for _, reason in skipped).items())),
        "mean_landmarks": mean,
        "identity_merging": first["run"].get("identity_merging"),
    }
    problem = _manifest_problem(manifest, out)
    if problem:
        raise DataError(out / MANIFEST, f"the merged manifest would be malformed: {problem}")
    if not sum(s["samples"] for s in splits.values()):
        raise DataError(out, "no samples: every input was skipped "
                             f"({manifest['skipped_by_reason']})")
    return manifest
