"""The training checkpoint's folder format, and a checkpoint read back and checked before
any of it is restored.

A checkpoint folder (``RUN/checkpoints/step-NNNNNNNN``, written by
``train.save_checkpoint``) is a model bundle plus ``optimizer.safetensors``,
``rng.safetensors`` and ``state.json``. The first part of this module turns the
optimiser's and the random generators' state into those files and back
(:func:`optimizer_to_files`, :func:`gather_rng`), and finds and prunes a run's
checkpoint folders; :mod:`speech2face.train` decides when to save and what to restore.

``--resume`` trusts none of it: every value is held to what this run's model, Adam
optimiser and StepLR scheduler expect before anything is applied, so a damaged or
edited checkpoint stops the run with one line naming the file (exit 2), instead of a
KeyError from deep inside torch or a run that continues half-restored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from speech2face.config import FLOAT32_MAX, FLOAT32_TINY, MAX_STEPS
from speech2face.errors import DataError
from speech2face.utils import float_type_problem, is_number, is_whole

CHECKPOINTS_DIR = "checkpoints"  # RUN/checkpoints/
CHECKPOINT_PREFIX = "step-"  # RUN/checkpoints/step-NNNNNNNN
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
MAX_STATE_BYTES = 64 << 20  # state.json holds settings and scalars: kilobytes, not gigabytes
# Adam's per-parameter state (torch.optim.Adam); ``max_exp_avg_sq`` only with amsgrad.
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------------------- the files


def checkpoint_dirs(run: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of a run's complete checkpoints (those with a state), oldest first."""
    folder = run / CHECKPOINTS_DIR
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            name = path.name
            if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit() \
                    and (path / STATE_FILE).is_file():
                found.append((int(name[len(CHECKPOINT_PREFIX):]), path))
    return sorted(found)


def prune_checkpoints(run: Path, keep_last: int, best_step: int | None) -> None:
    """Remove all but the newest ``keep_last`` checkpoints, and the best one."""
    found = checkpoint_dirs(run)
    for step, path in found[:-keep_last]:
        if step != best_step:
            shutil.rmtree(path, ignore_errors=True)


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """An optimiser state split into JSON (param groups, scalars) and tensors (safetensors)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{index}.{key}"] = value
    return {"param_groups": state["param_groups"], "scalars": scalars}, tensors


def optimizer_from_files(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The optimiser ``state_dict`` that :func:`optimizer_to_files` split, joined again."""
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def gather_rng(device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every process's RNG states, on every process (rank order)."""
    mine = _rng_states(device)
    if not dist.is_initialized():
        return [mine]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {k: v.tolist() for k, v in mine.items()})
    return [{k: torch.tensor(v, dtype=torch.uint8) for k, v in item.items()} for item in everyone]


# ---------------------------------------------------------------------------- the checks


def _bad(file: Path, problem: str) -> DataError:
    return DataError(file, f"{problem}; remove {file.parent.name} to resume from the "
                           f"checkpoint before it")


def read_state(folder: Path) -> dict:
    """``state.json`` of a checkpoint folder: a UTF-8 JSON object with the loop's fields."""
    file = folder / STATE_FILE
    try:
        if file.stat().st_size > MAX_STATE_BYTES:
            raise _bad(file, "too large for a checkpoint state")
        state = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _bad(file, f"cannot read the checkpoint state ({error})") from None
    if not isinstance(state, dict):
        raise _bad(file, f"must hold a JSON object, not {type(state).__name__}")
    for key, low, optional in (("step", 0, False), ("epoch", 0, False),
                               ("epoch_step", 0, False), ("world_size", 1, False),
                               ("best_step", 0, True)):
        value = state.get(key)
        if value is None and optional:
            continue
        if not is_whole(value) or value < low:
            raise _bad(file, f"{key} must be a whole number >= {low}, got {value!r:.40}")
    for key in ("epoch", "epoch_step", "best_step"):  # a step a run has reached
        if state.get(key) is not None and state[key] > state["step"]:
            raise _bad(file, f"{key} must be at most the step, {state['step']}, got "
                             f"{state[key]!r:.40}")
    value = state.get("val_loss")  # NaN is possible: a diverged validation
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise _bad(file, f"val_loss must be a number or null, got {value!r:.40}")
    value = state.get("best_val_loss")  # never NaN: a NaN loss is never the best
    if value is not None and not is_number(value):
        raise _bad(file, f"best_val_loss must be a finite number or null, got {value!r:.40}")
    for key in ("optimizer", "scheduler"):
        if not isinstance(state.get(key), dict):
            raise _bad(file, f"{key} must be a JSON object")
    if state.get("scaler") is not None and not isinstance(state["scaler"], dict):
        raise _bad(file, "scaler must be a JSON object or null")
    return state


def check_checkpoint(folder: Path, state: dict, optimizer_tensors: dict[str, torch.Tensor],
                     rng: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                     scheduler, rank: int) -> str:
    """Hold a checkpoint's optimiser, scheduler and RNG state to this run's; returns the
    key of the RNG state to restore (this process's, else rank 0's)."""
    _check_optimizer(folder / STATE_FILE, folder / OPTIMIZER_FILE, state["optimizer"],
                     optimizer_tensors, optimizer, state["step"])
    _like(folder / STATE_FILE, "scheduler", state["scheduler"], scheduler.state_dict())
    _check_settings(folder / STATE_FILE, state)
    file = folder / RNG_FILE
    key = f"cpu.rank{rank}" if f"cpu.rank{rank}" in rng else "cpu.rank0"
    want = torch.get_rng_state()
    if key not in rng:
        raise _bad(file, f"has no {key} random-generator state")
    if rng[key].dtype != want.dtype or rng[key].shape != want.shape:
        raise _bad(file, f"{key} is not a CPU random-generator state "
                         f"({rng[key].dtype} {tuple(rng[key].shape)})")
    return key


def _check_optimizer(state_file: Path, tensor_file: Path, meta: dict,
                     tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                     steps: int) -> None:
    """``steps``: the run's; Adam's count of each parameter is a whole number up to it."""
    fresh = optimizer.state_dict()["param_groups"]
    groups = meta.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(fresh):
        raise _bad(state_file, f"optimizer.param_groups must be a list of {len(fresh)} "
                               f"group(s), got {groups!r:.40}")
    for i, (group, own) in enumerate(zip(groups, fresh, strict=True)):
        held = group.get("params") if isinstance(group, dict) else None
        if isinstance(held, list) and len(held) != len(own["params"]):
            raise _bad(state_file, f"optimizer.param_groups[{i}] holds {len(held)} parameters, "
                                   f"this model {len(own['params'])}")
        _like(state_file, f"optimizer.param_groups[{i}]", group, own)
        if group["params"] != own["params"]:
            raise _bad(state_file, f"optimizer.param_groups[{i}] holds other parameters than "
                                   f"this model's")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scalars = meta.get("scalars", {})
    if not isinstance(scalars, dict) or not all(is_number(v) for v in scalars.values()):
        raise _bad(state_file, "optimizer.scalars must map names to numbers")
    names: dict[int, set[str]] = {}
    for key in [*tensors, *scalars]:
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params):
            raise _bad(tensor_file, f"names state {key!r:.40} of no parameter of this model")
        names.setdefault(int(index), set()).add(name)
    amsgrad = any(group.get("amsgrad") for group in fresh)
    expected = {*ADAM_STATE, *(("max_exp_avg_sq",) if amsgrad else ())}
    for index, found in names.items():
        if found != expected:
            raise _bad(tensor_file, f"parameter {index} has optimizer state {sorted(found)}, "
                                    f"expected {sorted(expected)}")
    for key, tensor in tensors.items():
        index, _, name = key.partition(".")
        want = (1,) if name == "step" else tuple(params[int(index)].shape)
        shape_ok = tensor.numel() == 1 if name == "step" else tuple(tensor.shape) == want
        if not shape_ok:
            raise _bad(tensor_file, f"{key} has shape {tuple(tensor.shape)}, this model's "
                                    f"parameter needs {want}")
        if float_type_problem(tensor) or not bool(torch.isfinite(tensor).all()):
            raise _bad(tensor_file, f"{key} is not finite floating-point state (float16, "
                                    f"bfloat16, float32 or float64; got "
                                    f"{str(tensor.dtype).removeprefix('torch.')})")
        if name == "step" and not (0 <= float(tensor) <= steps and float(tensor).is_integer()):
            raise _bad(tensor_file, f"{key} must be a whole number of steps from 0 to the "
                                    f"run's {steps}, got {float(tensor):.6g}")
        if name.endswith("exp_avg_sq") and bool((tensor < 0).any()):
            raise _bad(tensor_file, f"{key} holds negative values (squares cannot be)")


# Ranges of the optimiser's and scheduler's settings in state.json, which a resumed run
# takes over from the checkpoint: (where, key, low, high), both ends included. Rates are
# float32 numbers Adam can hold (config.FLOAT32_TINY/MAX), the current ones down to 0 (a
# long decay may take them below float32's range); a step count beyond 2^53 is not one
# a run reaches (and not one a float64 or a log file holds exactly).
_RATE = (FLOAT32_TINY, FLOAT32_MAX)
_SETTINGS = (
    ("optimizer.param_groups", "lr", 0.0, FLOAT32_MAX),
    ("optimizer.param_groups", "initial_lr", *_RATE),
    ("optimizer.param_groups", "eps", *_RATE),
    ("optimizer.param_groups", "betas", 0.0, 1 - 2.0 ** -24),
    ("optimizer.param_groups", "weight_decay", 0.0, FLOAT32_MAX),
    ("scheduler", "step_size", 1, MAX_STEPS),
    ("scheduler", "gamma", FLOAT32_TINY, 1.0),
    ("scheduler", "base_lrs", *_RATE),
    ("scheduler", "_last_lr", 0.0, FLOAT32_MAX),
    ("scheduler", "last_epoch", 0, MAX_STEPS),
)


def _check_settings(file: Path, state: dict) -> None:
    """Refuse optimiser and scheduler settings no run has (betas of 5, a step size of 0,
    a negative rate): torch would take them and fail later, or train on with them."""
    for where, key, low, high in _SETTINGS:
        section, _, sub = where.partition(".")
        nodes = state[section][sub] if sub else [state[section]]
        for i, node in enumerate(nodes):
            values = node.get(key) if isinstance(node, dict) else None
            for value in values if isinstance(values, list) else [values]:
                if value is not None and not low <= value <= high:
                    name = f"{where}[{i}].{key}" if sub else f"{where}.{key}"
                    raise _bad(file, f"{name} must be in [{low:.3g}, {high:.3g}], "
                                     f"got {value!r:.30}")
    if state["step"] > MAX_STEPS:
        raise _bad(file, f"step must be at most {MAX_STEPS}, got {state['step']!r:.30}")


def _like(file: Path, where: str, value, own) -> None:
    """Refuse ``value`` (from JSON) unless it has ``own``'s keys and kinds of values."""
    if not isinstance(value, dict):
        raise _bad(file, f"{where} must be a JSON object")
    missing = sorted(set(own) - set(value))
    if missing:
        raise _bad(file, f"{where} lacks {missing[:3]}")
    for key, mine in own.items():
        if not _same_kind(value[key], mine):
            raise _bad(file, f"{where}.{key} must be like {mine!r:.30}, got {value[key]!r:.30}")


def _same_kind(value, mine) -> bool:
    if isinstance(mine, bool) or mine is None:
        return value is None or isinstance(value, bool)
    if isinstance(mine, (int, float)):
        return is_number(value)
    if isinstance(mine, (list, tuple)):
        return isinstance(value, list) and len(value) == len(mine) and \
            all(_same_kind(v, m) for v, m in zip(value, mine, strict=True))
    if isinstance(mine, str):
        return isinstance(value, str)
    return True


