"""Tests of speech2face.train: config, the shared loop, DDP, checkpoints and resume, both stages."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from speech2face.data import InMemoryData
from speech2face.distributed import Placement
from speech2face.errors import ConfigError
from speech2face.train import TrainConfig, fit, latest_checkpoint, load_config

REPO = Path(__file__).resolve().parents[1]

# A small stand-in stage (an MLP with BatchNorm on a linear regression problem), written to
# a file so that the in-process run and the subprocess / torchrun runs use the same code.
TOY_STAGE = '''
import torch
from torch import nn
from speech2face.data import InMemoryData
from speech2face.distributed import init_distributed
from speech2face.train import Stage, TrainConfig, fit

class ToyStage(Stage):
    name = "toy"

    def __init__(self, seed=0, dropout=0.0):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.BatchNorm1d(32),
                                   nn.Dropout(dropout), nn.Linear(32, 3))
        self.trainable = self.model

    def loss(self, forward, batch):
        error = forward(batch["x"]) - batch["y"]
        mse = error.pow(2).mean()
        return mse, {"mse": mse.detach(), "mae": error.abs().mean().detach()}

def toy_tensors(n=96):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    return {"x": x, "y": x @ w + 0.1 * torch.randn(n, 3, generator=g)}

def run(out, resume=False, kill_at=None, dropout=0.0, **changes):
    import os, signal
    config = TrainConfig.tiny(**{"steps": 20, "checkpoint_every": 5, "val_every": 5,
                                 "lr": 0.03, "lr_decay_steps": 4, "lr_decay": 0.5,
                                 **changes})
    placement = init_distributed(config.device)
    data = InMemoryData(toy_tensors(), placement.micro_batch(config), seed=config.seed,
                        placement=placement, grad_accum=config.grad_accum)
    val = InMemoryData(toy_tensors(32), 16, shuffle=False)

    def on_step(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    return fit(ToyStage(config.seed, dropout), data, val, config, out, resume=resume,
               on_step=on_step, progress=False)

if __name__ == "__main__":
    import json, sys
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args.pop("threads"))
    run(**args)
    from speech2face.distributed import leave_launched_process

    leave_launched_process(0)  # as the CLI does: under torchrun, the process ends here
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    path = folder / "toy_stage.py"
    path.write_text(TOY_STAGE)
    spec = importlib.util.spec_from_file_location("toy_stage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = str(threads)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run_script(script: Path, args: dict, launcher: list[str] | None = None,
                threads: int | None = None):
    """Run the toy script in a subprocess; a single process uses this process's thread
    count, so that its float sums agree bit for bit with in-process runs. (Changing the
    thread count in-process instead slows every later test of the session severalfold.)"""
    threads = threads or (1 if launcher else torch.get_num_threads())
    payload = json.dumps({**args, "threads": threads})
    command = [*(launcher or [sys.executable]), str(script), payload]
    return subprocess.run(command, env=_env(threads), capture_output=True, text=True,
                          timeout=120)


def _failure(result) -> str:
    """A failed run's stderr: its start (the child's error) and end (torchrun's summary)."""
    err = result.stderr
    return err if len(err) < 8000 else f"{err[:5000]}\n[...]\n{err[-3000:]}"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


# ---------------------------------------------------------------------------- config


def test_presets_follow_the_paper():
    paper = TrainConfig.paper()
    assert (paper.batch_size, paper.lr, paper.beta1, paper.eps) == (8, 1e-3, 0.5, 1e-4)
    assert (paper.lr_decay, paper.lr_decay_steps, paper.preset) == (0.95, 10_000, "paper")
    assert TrainConfig.tiny().preset == "tiny"


def test_config_file_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\nsteps = 30\n[loss]\nlambda1 = 0.5\n')
    config = load_config(toml, ["lr=2e-4", "loss.lambda2=3", "face_encoder_weights=none",
                                "amp=bf16", "steps=1_000"])
    assert config.preset == "tiny" and config.steps == 1000 and config.lr == 2e-4
    assert config.loss.lambda1 == 0.5 and config.loss.lambda2 == 3.0
    assert config.amp == "bf16" and config.face_encoder_weights is None
    assert config.log_every == TrainConfig.tiny().log_every  # the preset's value
    # "none" is None only where a setting can be None: amp=none is a mode
    config = load_config(None, ["amp=none", "train_seconds=None", "face_encoder_weights="])
    assert config.amp == "none" and config.train_seconds is None
    assert config.face_encoder_weights is None
    with pytest.raises(ConfigError, match="<command line>"):
        load_config(None, ["steps=none"])

    js = tmp_path / "run.json"
    js.write_text(json.dumps({"batch_size": 16, "grad_accum": 4, "loss": {"temperature": 3}}))
    config = load_config(js)
    assert (config.preset, config.batch_size, config.grad_accum) == ("paper", 16, 4)
    assert config.loss.temperature == 3.0

    # YAML (it was read as JSON: "not valid YAML: Expecting value"); plain data only
    yml = tmp_path / "run.yaml"
    yml.write_text("preset: tiny\nsteps: 30\nloss:\n  lambda1: 0.5\n")
    config = load_config(yml)
    assert (config.preset, config.steps, config.loss.lambda1) == ("tiny", 30, 0.5)
    yml.write_text("steps: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="run.yaml: not valid YAML"):
        load_config(yml)
    yml.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match="run.yaml: not valid YAML") as error:
        load_config(yml)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("items, words", [
    (["stepz=3"], "unknown setting 'stepz'"),
    (["loss.lambda3=1"], "unknown setting 'loss.lambda3'"),
    (["loss=3"], "loss: a group of settings (a [loss] table, or loss.lambda1=...), got '3'"),
    (["steps=three"], "steps: Value 'three' of type 'str' could not be converted to Integer"),
    (["steps=1.5"], "steps: Value '1.5'"),
    (["deterministic=maybe"], "deterministic: Value 'maybe' is not a valid bool"),
    (["loss.lambda1=big"], "loss.lambda1: Value 'big'"),
    (["steps.x=1"], "steps: Value"),
    (["steps=0"], "steps must be from 1 to 2^53, got 0"),
    (["steps=99999999999999999999"], "steps must be from 1 to 2^53"),  # trained until killed
    (["lr=-1"], "lr must be a float32 number in [1.18e-38, 3.4e+38], got -1.0"),
    (["lr=inf"], "lr must be a float32 number in [1.18e-38, 3.4e+38], got inf"),
    (["lr=1e308"], "lr must be a float32 number in [1.18e-38, 3.4e+38], got 1e+308"),
    # Adam's first step lr / (1 - beta1) overflowed float32 in torch.optim, a traceback
    (["lr=1.8e38"], "lr must be at most (1 - beta1) x 3.4e+38 = 1.7e+38 (Adam's first step"),
    (["lr=1e36", "beta1=0.999"], "= 3.4e+35 (Adam's first step, lr / (1 - beta1), is a "
                                 "float32), got 1e+36"),
    (["eps=nan"], "eps must be a float32 number in [1.18e-38, 3.4e+38], got nan"),
    (["eps=1e-320"], "eps must be a float32 number in [1.18e-38, 3.4e+38], got 1e-320"),
    (["clip_seconds=inf"], "clip_seconds must be a finite number >= 0.025"),
    (["clip_seconds=0.01"], "clip_seconds must be a finite number >= 0.025 (one STFT window)"),
    (["classifier_l2=inf"], "classifier_l2 must be a finite number >= 0, got inf"),
    (["feature_noise=-0.1"], "feature_noise must be a finite number >= 0"),
    (["grad_clip=-1"], "grad_clip must be a number >= 0 (0: off), got -1.0"),
    (["grad_clip=nan"], "grad_clip must be a number >= 0 (0: off), got nan"),
    (["amp=fp8"], "amp must be one of"),
    (["preset=huge"], "preset must be one of"),
    (["batch_size=8", "grad_accum=3"], "not a multiple of grad_accum"),
    (["train_seconds=7"],
     "train_seconds must be from 0.025 (one STFT window) to clip_seconds (6.0)"),
    (["clip_seconds=3", "train_seconds=4"], "to clip_seconds (3.0), got 4.0"),
    (["train_seconds=0"], "train_seconds must be from 0.025"),
    (["train_seconds=0.001"], "train_seconds must be from 0.025"),
    (["seed=-1"], "seed must be an integer from 0"),
    (["loss.lambda1=-1"], "loss.lambda1 must be a finite number >= 0, got -1.0"),
    (["loss.perceptual_weight=nan"], "loss.perceptual_weight must be a finite number >= 0"),
    (["loss.temperature=0"], "loss.temperature must be a finite number > 0, got 0.0"),
    (["loss.temperature=inf"], "loss.temperature must be a finite number > 0, got inf"),
    (["num_workers=99999999999"], "num_workers must be at most 1024"),
    (["steps"], "expected key=value"),
])
def test_bad_overrides_are_config_errors(items, words):
    with pytest.raises(ConfigError, match="<command line>") as error:
        load_config(None, items)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_examples_too_short_for_the_voice_encoder_are_refused():
    """clip_seconds and train_seconds are checked against the encoder's convolutions before
    training starts; the shortest length allowed is one the encoder itself accepts."""
    from speech2face.audio import SAMPLE_RATE, spectrogram
    from speech2face.train import _check_example_length
    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    encoder = VoiceEncoder(VoiceEncoderConfig.tiny()).eval()
    with pytest.raises(ConfigError, match=r"train_seconds=2.6 gives 258 .* at least 259"):
        _check_example_length(encoder, TrainConfig.tiny(train_seconds=2.6))
    with pytest.raises(ConfigError, match="clip_seconds=1 gives 98"):
        _check_example_length(encoder, TrainConfig.tiny(clip_seconds=1.0))
    # Longer than the shards' clips: the loader would repeat each clip to fill it.
    with pytest.raises(ConfigError, match=r"clip_seconds=10 is longer than the shards' clips"):
        _check_example_length(encoder, TrainConfig.tiny(clip_seconds=10.0), 6.0)
    _check_example_length(encoder, TrainConfig.tiny(clip_seconds=6.0), 6.0)
    shortest = 2.605  # 259 frames: 258 hops of 10 ms and one 25-ms window
    _check_example_length(encoder, TrainConfig.tiny(train_seconds=shortest))
    samples = int(round(shortest * SAMPLE_RATE))
    with torch.no_grad():
        assert encoder(spectrogram(torch.zeros(1, samples))).shape == (1, 128)
        with pytest.raises(ValueError, match="at least 259"):
            encoder(spectrogram(torch.zeros(1, samples - 1)))


def test_bad_config_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_config(bad)
    bad.write_text(json.dumps({"num_workers": "many"}))
    with pytest.raises(ConfigError, match="bad.json: num_workers: Value 'many'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.toml: cannot read"):
        load_config(tmp_path / "missing.toml")
    bad.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="bad.json: nested too deeply"):
        load_config(bad)


@pytest.mark.parametrize("text, words", [
    ("a: &a [*a]\n", "line 1: YAML aliases"),  # a structure that holds itself
    ("steps: 5\nloss: &x {lambda1: *x}\n", "line 2: YAML aliases"),
    # "billion laughs": 9^7 strings from seven lines (minutes of CPU before the fix)
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n"
        for p, n in zip("abcdef", "bcdefg", strict=True)),
     "line 2: YAML aliases"),
    ("steps: 10\nsteps: 20\n", "line 2: duplicate key 'steps'"),
    ("loss:\n  lambda1: 1\n  lambda1: 2\n", "line 3: duplicate key 'lambda1'"),
])
def test_yaml_config_refuses_aliases_and_repeated_keys(tmp_path, text, words):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"run.yaml: not valid YAML: {words}"):
        load_config(path)


@pytest.mark.parametrize("text", ['{"steps": 10, "steps": 20}',
                                  '{"loss": {"lambda1": 1, "lambda1": 2}}'])
def test_json_config_refuses_repeated_keys(tmp_path, text):
    """``json`` keeps the last of a repeated key silently; YAML and TOML refuse it."""
    path = tmp_path / "run.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="run.json: not valid JSON: duplicate key '(steps|"
                                          "lambda1)'"):
        load_config(path)


@pytest.mark.parametrize("name, text", [
    ("a.json", '{"loss.lambda1": 3, "loss": {"lambda1": 4}}'),
    ("b.json", '{"loss": {"lambda1": 4}, "loss.lambda1": 3}'),
    ("c.yaml", "loss.lambda1: 3\nloss:\n  lambda1: 4\n"),
    ("d.toml", '"loss.lambda1" = 3\n[loss]\nlambda1 = 4\n'),
])
def test_a_setting_given_dotted_and_nested_is_refused(tmp_path, name, text):
    """Each parser sees two keys ("loss.lambda1" and "loss"); merged, the later won."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{name}: loss.lambda1 is given twice"):
        load_config(path)
    path.write_text(text.replace("lambda1", "lambda2", 1))  # two settings: both taken
    assert load_config(path).loss.lambda1 in (3, 4)


def test_config_files_that_are_not_files_or_too_large_are_one_line(tmp_path):
    """/dev/zero was read whole (a MemoryError traceback), a FIFO waited forever. (Here a
    device and a FIFO that end, so that a regression fails instead of hanging.)"""
    import os
    import threading

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text('{"steps": 5}'), daemon=True)
    writer.start()
    for path in (Path("/dev/null"), fifo):
        with pytest.raises(ConfigError, match="cannot read the config file: not a regular"):
            load_config(path)
    if writer.is_alive():  # the FIFO was not opened: let the writer finish
        with open(fifo) as f:
            f.read()
    big = tmp_path / "big.json"
    big.write_text('{"steps": 5' + " " * (2 << 20) + "}")
    with pytest.raises(ConfigError, match="big.json: cannot read the config file: larger "
                                          "than 1 MB"):
        load_config(big)


@pytest.mark.parametrize("settings, words", [
    ({"steps": 2.5}, "steps must be a whole number, got 2.5"),
    ({"steps": "5"}, "steps must be a whole number, got '5'"),
    ({"deterministic": "no"}, "deterministic must be true or false, got 'no'"),
    ({"lr": True}, "lr must be a number, got True"),
    ({"train_seconds": "3"}, "train_seconds must be a number, got '3'"),
    ({"loss": {}}, "loss must be a LossConfig, got dict"),
])
def test_settings_of_another_type_are_refused_in_python_too(settings, words):
    """Files and key=value settings go through OmegaConf's types; a TrainConfig built in
    Python is checked the same (2.5 steps ran 3, 'no' counted as true)."""
    with pytest.raises(ConfigError, match=re.escape(words)):
        TrainConfig.tiny("decoder", **settings)
    assert TrainConfig.tiny("decoder", lr=1, train_seconds=None).lr == 1


def test_the_library_names_a_config_of_the_wrong_kind(tmp_path):
    from speech2face.train import train_decoder

    with pytest.raises(TypeError, match="config must be a TrainConfig .* got dict"):
        train_decoder(tmp_path / "data", tmp_path / "run", {"steps": 2})
    with pytest.raises(TypeError, match="base must be a TrainConfig, got dict"):
        load_config(overrides=["steps=3"], base={"steps": 1})
    assert load_config(overrides=None).steps == TrainConfig.paper().steps


# ---------------------------------------------------------------------------- data order


def test_in_memory_order_is_the_same_for_any_split_of_the_global_batch():
    tensors = {"i": torch.arange(40)}
    one = InMemoryData(tensors, micro_batch=4, seed=3, grad_accum=2)
    two = [InMemoryData(tensors, micro_batch=4, seed=3, placement=Placement(r, 2), grad_accum=1)
           for r in range(2)]
    single = [b["i"] for b in one.batches(epoch=1)]
    split = [b["i"] for pair in zip(*(d.batches(epoch=1) for d in two), strict=True) for b in pair]
    assert len(single) == 10 and all(map(torch.equal, single, split))
    # Skipping gives the tail of the same order; another epoch gives another order.
    assert all(map(torch.equal, single[6:], [b["i"] for b in one.batches(1, 6)]))
    assert not torch.equal(torch.cat(single), torch.cat([b["i"] for b in one.batches(2)]))
    assert sorted(torch.cat(single).tolist()) == list(range(40))


# ---------------------------------------------------------------------------- the loop


def test_loop_is_deterministic_and_logs(toy, tmp_path):
    module, _ = toy
    a = module.run(tmp_path / "a")
    module.run(tmp_path / "b")
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.step == 20 and a.best_step is not None

    rows = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    train = {(int(r["step"]), r["name"]): float(r["value"]) for r in rows if r["split"] == "train"}
    # every loss term and the lr, at every logging step; lr halves every 4 steps
    assert {n for _, n in train} >= {"total", "mse", "mae", "lr", "samples_per_s"}
    assert train[(5, "lr")] == pytest.approx(0.03 * 0.5)
    assert train[(20, "lr")] == pytest.approx(0.03 * 0.5**4)
    assert train[(20, "total")] < 0.5 * train[(5, "total")]
    assert any(r["split"] == "val" for r in rows)
    assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    # keep_last=2 plus the best one
    folders = (tmp_path / "a" / "checkpoints").glob("step-*")
    steps = sorted(int(p.name.split("-")[1]) for p in folders)
    best = json.loads((tmp_path / "a" / "checkpoints" / "best.json").read_text())
    assert steps[-2:] == [15, 20] and set(steps) <= {15, 20, best["step"]}
    assert best["step"] == a.best_step and best["val_loss"] == pytest.approx(a.best_val_loss)


def test_grad_accumulation_matches_one_big_batch_without_batchnorm(toy, tmp_path):
    """With no BatchNorm, 1 x 8 and 2 x 4 (accumulated) are the same gradient."""
    module, _ = toy
    stage_a, stage_b = module.ToyStage(), module.ToyStage()
    for stage in (stage_a, stage_b):  # drop the BatchNorm: batch statistics differ by split
        stage.model[2] = torch.nn.Identity()
    tensors = module.toy_tensors()
    config = TrainConfig.tiny(steps=6, val_every=100, checkpoint_every=100)
    data = InMemoryData(tensors, 8, grad_accum=1)
    fit(stage_a, data, None, config, tmp_path / "a", progress=False)
    config = TrainConfig.tiny(steps=6, val_every=100, checkpoint_every=100, grad_accum=2)
    data = InMemoryData(tensors, 4, grad_accum=2)
    fit(stage_b, data, None, config, tmp_path / "b", progress=False)
    for p, q in zip(stage_a.model.parameters(), stage_b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_torchrun_worker_leaves_with_its_code_and_its_output_flushed():
    """Under torchrun the finished command's process ends in ``leave_launched_process``
    (no interpreter teardown, where gloo's threads can abort it) with the command's exit
    code and everything it printed; outside torchrun the function returns."""
    code = ("from speech2face.distributed import leave_launched_process; "
            "print('written', end=''); leave_launched_process(3); print(' and after')")
    for extra, returncode, output in (({"TORCHELASTIC_RUN_ID": "t"}, 3, "written"),
                                      ({}, 0, "written and after\n")):
        env = {k: v for k, v in _env(1).items() if k != "TORCHELASTIC_RUN_ID"}
        result = subprocess.run([sys.executable, "-c", code], env={**env, **extra},
                                capture_output=True, text=True, timeout=120)
        assert (result.returncode, result.stdout) == (returncode, output), result.stderr


def test_under_torchrun_a_settings_error_is_said_once(shards, tmp_path):
    """Every torchrun worker runs the same command line, so each met the same bad setting
    and printed it: rank 0 says it, the others exit 2 without a word."""
    for bad in (["stepz=3"], ["--config", "a.json", "--config", "b.json"]):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node", "2", "-m", "speech2face", "train-decoder", "--data",
             str(shards), "--out", str(tmp_path / "run"), "--no-progress", *bad],
            env=_env(1), capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        ours = [line for line in result.stderr.splitlines()
                if line.startswith("speech2face train-decoder: error: ")]
        assert len(ours) == 1, result.stderr
        assert "stepz" in ours[0] or "--config: given more than once" in ours[0], ours
        assert not (tmp_path / "run").exists()


def test_ddp_two_processes_equal_one_process(toy, tmp_path):
    """torchrun, 2 CPU processes with gloo, batch 8 = 2 x 4 vs one process with 2 x 4 accumulated.

    BatchNorm: SyncBatchNorm does not run on CPU, so each process normalises its own 4
    samples. The 1-process run accumulates two micro-batches of 4, made of exactly the
    samples that the two processes see (InMemoryData's order), so the batch statistics and
    the gradients are the same and the weights must agree to float tolerance. The running
    BatchNorm averages are not compared: DDP keeps rank 0's, accumulation updates twice.
    """
    _, script = toy
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    # validation every 3 steps, checkpoints every 5: a new best between checkpoints makes
    # every process join an extra checkpoint, which they must all agree on
    args = {"steps": 12, "val_every": 3}
    result = _run_script(script, {"out": str(tmp_path / "ddp"), **args}, launcher)
    assert result.returncode == 0, _failure(result)
    # the 1-process reference with one thread too, so that float sums agree closely
    result = _run_script(script, {"out": str(tmp_path / "one"), "grad_accum": 2, **args},
                         threads=1)
    assert result.returncode == 0, _failure(result)
    ddp, one = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
    params = [k for k in ddp if not k.startswith("2.running") and "num_batches" not in k]
    assert len(params) == 6
    for key in params:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6)
    # and the runs did train: the weights moved from the initial ones
    assert not torch.allclose(ddp["0.weight"], _weights_initial(toy)["0.weight"])
    best = json.loads((tmp_path / "ddp" / "checkpoints" / "best.json").read_text())
    assert (tmp_path / "ddp" / "checkpoints" / f"step-{best['step']:08d}").is_dir()


def _weights_initial(toy):
    module, _ = toy
    return module.ToyStage().model.state_dict()


def test_resume_after_sigkill_ends_with_the_same_weights(toy, tmp_path):
    module, script = toy
    module.run(tmp_path / "straight")
    killed = _run_script(script, {"out": str(tmp_path / "killed"), "kill_at": 13})
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000010"
    assert not (tmp_path / "killed" / "model").exists()
    resumed = _run_script(script, {"out": str(tmp_path / "killed"), "resume": True})
    assert resumed.returncode == 0, _failure(resumed)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the CSV reads as one run: no duplicate rows from the steps done twice
    rows = _metric_keys(tmp_path / "killed")
    assert len(rows) == len(set(rows))
    assert sorted(rows) == sorted(_metric_keys(tmp_path / "straight"))


def test_a_stage_that_draws_at_random_resumes_to_the_same_weights(toy, tmp_path):
    """With dropout, 20 steps in one run equal 10, then --resume to 20: the first run's
    end (precise BatchNorm in training mode, validation; the unbroken run does neither
    at step 10) leaves torch's generator as the checkpoint must hold it."""
    module, _ = toy
    settings = {"val_every": 4, "dropout": 0.3}
    module.run(tmp_path / "straight", **settings)
    module.run(tmp_path / "split", steps=10, **settings)
    module.run(tmp_path / "split", resume=True, **settings)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metric_keys(run: Path) -> list[tuple[str, str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(r["step"], r["split"], r["name"]) for r in csv.DictReader(f)]


def test_checkpoint_holds_no_pickle(toy, tmp_path):
    module, _ = toy
    module.run(tmp_path / "run", steps=5)
    folder = latest_checkpoint(tmp_path / "run")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 5 and state["epoch"] == 0 and state["epoch_step"] == 5
    optimizer = load_file(folder / "optimizer.safetensors")
    assert {k.split(".", 1)[1] for k in optimizer} == {"step", "exp_avg", "exp_avg_sq"}
    for file in folder.glob("*.safetensors"):  # safetensors: 8-byte header size, then JSON
        size = int(np.frombuffer(file.read_bytes()[:8], dtype="<u8")[0])
        json.loads(file.read_bytes()[8:8 + size])


# ---------------------------------------------------------------------------- both stages


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The demo corpus, 8 speakers, prepared into small shards (once for this module)."""
    from speech2face.data import prepare
    from speech2face.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / "corpus", speakers=8, seed=0, progress=False)
    prepare("voxceleb1", root / "corpus", root / "shards", samples_per_shard=16, progress=False)
    return root / "shards"



@pytest.mark.parametrize("to_group", [True, False])
def test_sigterm_stops_training_with_loader_workers_in_one_line(shards, tmp_path, to_group):
    """SIGTERM to the whole job (``timeout``, SLURM's scancel, Kubernetes) also ends the
    DataLoader's worker processes, and torch's check of its workers raised from SIGCHLD
    in the middle of the stop: a traceback and exit 1. Also SIGTERM to the command
    alone, which could land while the workers started (torch's half-made iterator)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "speech2face", "train-decoder", "--data", str(shards),
         "--out", str(tmp_path / "run"), "preset=tiny", "steps=100000", "num_workers=2",
         "batch_size=4", "val_batches=0"],
        stderr=subprocess.PIPE, env=_env(1), start_new_session=True)
    said = b""
    while not re.search(rb"\b[3-9]/100000", said):  # a few steps, the workers running
        chunk = process.stderr.read1(256)
        assert chunk, said
        said += chunk
    (os.killpg if to_group else os.kill)(process.pid, signal.SIGTERM)
    said += process.stderr.read()
    assert process.wait(timeout=60) == 128 + signal.SIGTERM, said
    text = said.decode()
    assert "Traceback" not in text and "Exception ignored" not in text, text
    assert text.replace("\r", "\n").strip().splitlines()[-1] == \
        "speech2face train-decoder: terminated (SIGTERM)", text


def test_a_run_killed_before_its_first_checkpoint_resumes_with_its_own_settings(
        shards, tmp_path, monkeypatch):
    """Killed while the stage was set up (the identity classifier takes minutes at
    scale), a run held no record of its settings, and ``--resume`` trained the paper
    preset from the start: ``preset=tiny steps=24`` became a 100,000-step paper run."""
    import argparse

    from speech2face import train as train_module
    from speech2face.cli import main
    from speech2face.config import load_config as load

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "decoder_stage", killed)
        assert main(["train-decoder", "--data", str(shards), "--out", str(run), "preset=tiny",
                     "steps=24", "--no-progress"]) == 130
    assert train_module.latest_checkpoint(run) is None
    again = argparse.Namespace(out=str(run), resume=True, config=None, overrides=[])
    assert train_module._config_from_args(again, "decoder").to_dict() == \
        load(None, ["preset=tiny", "steps=24"], stage="decoder").to_dict()

def _train_totals(run: Path, name: str = "total") -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(r["value"]) for r in csv.DictReader(f)
                if r["split"] == "train" and r["name"] == name]


def test_both_stages_learn_through_the_command_line(shards, tmp_path, capsys):
    from PIL import Image

    from speech2face.cli import main
    from speech2face.model import load_model

    decoder_run, voice_run = tmp_path / "decoder", tmp_path / "voice"
    common = ["--no-progress", "preset=tiny", "log_every=5"]
    assert main(["train-decoder", "--data", str(shards), "--out", str(decoder_run), *common,
                 "steps=30", "lr=0.01", "val_every=30", "checkpoint_every=30"]) == 0
    totals = _train_totals(decoder_run)  # mean loss of each 5 steps
    # Identity-mixed shards (issue 12) give every batch many people: the loss falls
    # steadily but a little slower at first (0.64x over 30 steps measured; 0.6x before).
    assert len(totals) == 6 and totals[-1] < 0.7 * totals[0], totals
    grid = Image.open(decoder_run / "images" / "val-00000030.png")
    assert grid.size == (2 * 66 + 2, 7 * 66 + 2)  # true | decoded, 7 validation faces, 64 px
    stage1 = load_model(decoder_run)
    assert stage1.voice_encoder is None and stage1.feature_dim == 128

    # 3-s clips: half the cost of the paper's 6 s, and the encoder takes any length. The
    # encoder starts at the mean face (OutputStandardization), so the loss starts low and
    # falls as the encoder learns to tell the 5 training speakers apart. Most of the total
    # is lambda2 times the teacher's entropy, which no student can remove (the distillation
    # term minus it is the KL divergence): what is left falls to about half over 40 steps
    # (121 -> 57 measured; the total 332 -> 269).
    assert main(["train", "--data", str(shards), "--decoder", str(decoder_run),
                 "--out", str(voice_run), *common, "steps=40", "lr=3e-3", "clip_seconds=3",
                 "val_every=40", "checkpoint_every=40", "val_batches=1"]) == 0
    assert "model bundle in" in capsys.readouterr().out
    from speech2face.losses import LAMBDA2

    entropy = _train_totals(voice_run, "teacher_entropy")
    learnable = [total - LAMBDA2 * h for total, h in
                 zip(_train_totals(voice_run), entropy, strict=True)]
    assert len(learnable) == 8 and learnable[-1] < 0.65 * learnable[0], learnable
    model = load_model(voice_run)
    assert model.num_identities == 5  # the training identities of the 8-speaker corpus
    # the decoder was frozen in stage 2
    a, b = stage1.face_decoder.state_dict(), model.face_decoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    grid = Image.open(voice_run / "images" / "val-00000040.png")
    assert grid.size[0] == 3 * 66 + 2  # true | decoded from the face | decoded from the voice
    with torch.no_grad():
        features = model.predict_features(torch.randn(2, 2, 598, 257))
    assert features.shape == (2, 128) and torch.isfinite(features).all()

    # --resume with more steps: the run's settings come back from train_config.json, the
    # identity classifier from the checkpoint (not fitted again), and training goes on.
    assert main(["train", "--data", str(shards), "--decoder", str(decoder_run),
                 "--out", str(voice_run), "--resume", "--no-progress", "steps=42"]) == 0
    assert "face decoder" not in capsys.readouterr().err
    resumed = load_model(voice_run)
    assert torch.equal(resumed.classifier.weight, model.classifier.weight)
    assert json.loads((voice_run / "train_config.json").read_text())["clip_seconds"] == 3.0
    assert latest_checkpoint(voice_run).name == "step-00000042"

    # --resume with another decoder: the run goes on against its own, and says so.
    from speech2face.model import save_model

    with torch.no_grad():
        next(stage1.face_decoder.parameters()).add_(1.0)
    save_model(stage1, tmp_path / "other-decoder")
    assert main(["train", "--data", str(shards), "--decoder", str(tmp_path / "other-decoder"),
                 "--out", str(voice_run), "--resume", "--no-progress", "steps=43"]) == 0
    err = capsys.readouterr().err
    assert "resuming against the face decoder saved in" in err and "other-decoder" in err
    kept = load_model(voice_run).face_decoder.state_dict()
    assert all(torch.equal(kept[k], b[k]) for k in b)


def test_decoder_feature_noise_is_as_long_as_configured_and_only_in_training(shards):
    """feature_noise=0.5: the decoder trains on features moved by Gaussian noise vectors
    of lengths uniform between 0 and half the features' spread (root-mean-square distance
    to their mean, re-derived in float64 numpy from the shards), and validates on the
    clean features."""
    from speech2face.data.loader import training_features
    from speech2face.train import decoder_stage

    features, _ = training_features(shards, progress=False)
    spread = np.sqrt(((features.astype(np.float64) - features.mean(0)) ** 2).sum(1).mean())
    stage = decoder_stage(shards, TrainConfig.tiny("decoder", feature_noise=0.5))
    decoder = stage.trainable
    batch = {"feature": torch.from_numpy(features[:8]), "face": torch.rand(8, 3, 224, 224),
             "landmarks": 40 + 144 * torch.rand(8, 68, 2)}
    seen = []

    def forward(x, **options):
        seen.append(x.detach().clone())
        return decoder(x, **options)

    torch.manual_seed(0)
    draws = []
    for _ in range(50):
        stage.loss(forward, batch)
        draws.append((seen[-1] - batch["feature"]).numpy())
    noise = np.concatenate(draws).astype(np.float64)  # 400 vectors
    lengths = np.sqrt((noise ** 2).sum(1)) / spread
    # uniform on [0, 0.5]: mean 0.25, deciles 0.05 apart (a 128-D Gaussian's length
    # varies by 6 % around its expectation)
    assert abs(lengths.mean() - 0.25) < 0.02 and lengths.max() < 0.6
    assert np.allclose(np.quantile(lengths, [0.1, 0.5, 0.9]), [0.05, 0.25, 0.45], atol=0.03)
    directions = noise / np.linalg.norm(noise, axis=1, keepdims=True)
    # no preferred direction: each coordinate's mean over 400 random unit vectors in 128-D
    # has a standard deviation of 1 / sqrt(128 * 400) = 0.0044
    assert np.abs(directions.mean(0)).max() < 0.02
    decoder.eval()
    stage.loss(forward, batch)
    assert torch.equal(seen[-1], batch["feature"])
    decoder.train()
    with torch.no_grad():
        stage.loss(forward, batch)
    assert torch.equal(seen[-1], batch["feature"])
    # none by default
    plain = decoder_stage(shards, TrainConfig.tiny("decoder"))
    plain.loss(forward, batch)
    assert torch.equal(seen[-1], batch["feature"])


def test_decoder_targets_are_kept_per_sample_and_crop_and_equal_fresh_ones(shards, monkeypatch):
    """The decoder's texture targets are warped once per (sample, crop) and kept across
    epochs (``sample_cache_mb``): each equals register_texture of its own batch to the
    last bit, every crop has its own, a budget too small for the split keeps nothing, and
    batches without the loader's meta are computed every time."""
    from speech2face import face_decoder
    from speech2face.data.loader import ShardData
    from speech2face.train import KeptTargets, decoder_stage

    real = face_decoder.register_texture
    rows = []
    monkeypatch.setattr(face_decoder, "register_texture",
                        lambda images, *a, **k: rows.append(len(images)) or real(images, *a, **k))
    config = TrainConfig.tiny("decoder", batch_size=4)
    stage = decoder_stage(shards, config)
    decoder = stage.model.face_decoder

    def fresh(batch):
        return real(batch["face"], batch["landmarks"].float(), decoder.mean_landmarks,
                    size=decoder.config.image_size)

    train = ShardData(shards, "train", 4, config)
    keys = set()
    for epoch in range(4):
        for batch in train.batches(epoch):
            assert torch.equal(stage._targets(batch), fresh(batch))
            keys.update(json.dumps(meta, sort_keys=True) for meta in batch["meta"])
    assert all('"crop": 0' in key and '"key": "id' in key for key in keys)
    assert sum(rows) == len(keys) == len(stage.kept_targets._rows) > 4
    # a split whose targets cannot all fit keeps none from the start
    side = decoder.config.image_size
    assert len(keys) * 3 * side * side * 4 > 2**20
    assert decoder_stage(shards, TrainConfig.tiny("decoder", sample_cache_mb=1)).kept_targets.full
    # another crop of the same samples is another target, warped from its own face
    flipped = {**batch, "face": batch["face"].flip(-1),
               "meta": [{**meta, "crop": 1} for meta in batch["meta"]]}
    rows.clear()
    assert torch.equal(stage._targets(flipped), fresh(flipped)) and sum(rows) == 4
    # too small a budget: nothing kept, every batch warped afresh
    stage.kept_targets = KeptTargets(1)
    rows.clear()
    batches = list(train.batches(0))
    for batch in batches:
        assert torch.equal(stage._targets(batch), fresh(batch))
    assert stage.kept_targets.full and not stage.kept_targets._rows
    assert sum(rows) == sum(len(b["meta"]) for b in batches)
    # in-memory batches carry no meta: computed every time
    stage.kept_targets = KeptTargets(2**30)
    plain = {k: v for k, v in batches[0].items() if k != "meta"}
    rows.clear()
    assert torch.equal(stage._targets(plain), fresh(plain)) and sum(rows) == len(plain["face"])
    # nor does a meta without the shard key, which may not tell two samples apart
    keyless = {**batches[0], "meta": [{k: v for k, v in m.items() if k != "key"}
                                      for m in batches[0]["meta"]]}
    rows.clear()
    assert torch.equal(stage._targets(keyless), fresh(keyless))
    assert sum(rows) == len(keyless["face"]) and not stage.kept_targets._rows


def test_feature_noise_draws_the_same_bits_whichever_kernels_the_cpu_gets():
    """torch picks its CPU kernels by the instruction sets the CPU has; its float32 normal
    draw differs in the last bits between them, and the demo's training carries such bits
    into its printed numbers. The training noise is drawn the same on every CPU: here with
    the kernels this CPU gets and with torch's baseline ones (ATEN_CPU_CAPABILITY=default).
    """
    code = ("import hashlib, torch; from speech2face.train import draw_feature_noise; "
            "torch.manual_seed(3); x = draw_feature_noise(torch.zeros(8, 128), 0.7); "
            "print(torch.backends.cpu.get_cpu_capability(), "
            "hashlib.sha256(x.numpy().tobytes()).hexdigest())")
    digests = {}
    for capability in (None, "default"):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        kernels, digest = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                         capture_output=True, text=True).stdout.split()
        digests[kernels] = digest
    if len(digests) == 1:
        pytest.skip("this CPU gets torch's baseline kernels only")
    assert len(set(digests.values())) == 1, digests


def test_decoder_with_feature_noise_resumes_to_the_same_weights(shards, tmp_path):
    from speech2face.cli import main

    common = ["--no-progress", "preset=tiny", "feature_noise=0.5", "checkpoint_every=3",
              "val_every=3", "val_batches=1", "log_every=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train-decoder", "--data", str(shards), "--out", str(straight), *common,
                 "steps=6"]) == 0
    assert main(["train-decoder", "--data", str(shards), "--out", str(split), *common,
                 "steps=3"]) == 0
    assert main(["train-decoder", "--data", str(shards), "--out", str(split), "--resume",
                 "--no-progress", "steps=6"]) == 0
    a, b = _weights(straight), _weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_nothing_to_resume_says_so(shards, tmp_path, capsys):
    from speech2face.cli import main

    out = tmp_path / "run"
    assert main(["train-decoder", "--data", str(shards), "--out", str(out), "--resume",
                 "--no-progress", "preset=tiny", "steps=1", "val_batches=1"]) == 0
    assert f"{out}: no checkpoint to resume: training from the start" in capsys.readouterr().err
    # only incomplete checkpoint folders (no state.json): one line that says which
    (out / "model").rename(tmp_path / "model")
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    assert main(["train-decoder", "--data", str(shards), "--out", str(out), "--resume",
                 "--no-progress", "preset=tiny", "steps=1", "val_batches=1"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "resum" in line]
    assert len(said) == 1 and "step-00000001" in said[0] and "no complete checkpoint" in said[0]


def test_a_run_folder_holding_a_model_is_not_trained_over(shards, tmp_path, capsys):
    """Its checkpoints deleted, a finished run's model/ is still not overwritten by a run
    started without --resume."""
    from speech2face.cli import main

    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    assert main(["train-decoder", "--data", str(shards), "--out", str(out), "--no-progress",
                 "preset=tiny", "steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a trained model (model/)" in err[0], err
    assert (out / "model" / "config.json").read_text() == "{}"


def test_a_model_bundle_is_not_taken_for_a_run_folder(shards, tmp_path, capsys):
    from speech2face.cli import main

    run = tmp_path / "run"
    assert main(["train-decoder", "--data", str(shards), "--out", str(run), "--no-progress",
                 "preset=tiny", "steps=1", "val_batches=1"]) == 0
    before = sorted(p.name for p in (run / "model").iterdir())
    capsys.readouterr()
    for resume in ([], ["--resume"]):
        assert main(["train-decoder", "--data", str(shards), "--out", str(run / "model"),
                     "--no-progress", "preset=tiny", "steps=1", *resume]) == 2
        err = capsys.readouterr().err
        assert "model: is a model bundle, not a run folder; choose another --out" in err, err
    assert sorted(p.name for p in (run / "model").iterdir()) == before


def test_a_tensorboard_folder_that_cannot_be_written_is_one_line(shards, tmp_path, capfd,
                                                                 monkeypatch):
    """As a user who may not write there (root may, so the refusal is simulated): one
    line, not the traceback of SummaryWriter's writer thread."""
    from speech2face import train_log
    from speech2face.cli import main

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(train_log.tempfile, "TemporaryFile", refused)
    out = tmp_path / "run"
    assert main(["train-decoder", "--data", str(shards), "--out", str(out), "--no-progress",
                 "preset=tiny", "steps=1"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"speech2face train-decoder: error: {out / 'tensorboard'}: cannot write the "
                   "TensorBoard log here (Permission denied)"], err


def test_a_diverged_run_stops_in_one_line_and_writes_no_nan_model(shards, tmp_path, capsys):
    """lr = 1e30 turns the weights to NaN: the run stops at the first logged non-finite
    loss (exit 2, one line) with no checkpoint or model of NaN weights; the checkpoint
    before it is kept and resumes with another lr."""
    from speech2face.cli import main

    out = tmp_path / "run"
    common = ["--no-progress", "preset=tiny", "val_batches=0", "precise_bn_batches=0",
              "log_every=1", "checkpoint_every=2"]
    assert main(["train-decoder", "--data", str(shards), "--out", str(out), *common,
                 "steps=2"]) == 0
    capsys.readouterr()
    assert main(["train-decoder", "--data", str(shards), "--out", str(out), "--resume",
                 "--no-progress", "steps=6", "lr=1e30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the new lr's line, then the error
    assert len(err) == 2 and "training diverged: the loss is nan at step" in err[1], err
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002"]
    assert main(["train-decoder", "--data", str(shards), "--out", str(out), "--resume",
                 "--no-progress", "steps=4", "lr=1e-4"]) == 0
    weights = _weights(out)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_other_settings_changed_on_resume_are_said(shards, tmp_path, capsys):
    from speech2face.cli import main

    out = tmp_path / "run"
    common = ["--no-progress", "preset=tiny", "val_batches=0", "precise_bn_batches=0"]
    assert main(["train-decoder", "--data", str(shards), "--out", str(out), *common,
                 "steps=2"]) == 0
    capsys.readouterr()
    assert main(["train-decoder", "--data", str(shards), "--out", str(out), "--resume",
                 "--no-progress", "steps=3", "seed=5", "loss.texture_weight=3",
                 "log_every=1"]) == 0
    err = capsys.readouterr().err
    assert "resuming with loss.texture_weight 3.0 (was 1.0), seed 5 (was 0): from step 2" \
        in err, err
    assert "log_every" not in err
    # the identity classifier is fitted once, at the start: a new L2 changes nothing
    assert main(["train-decoder", "--data", str(shards), "--out", str(out), "--resume",
                 "--no-progress", "steps=4", "classifier_l2=1"]) == 0
    err = capsys.readouterr().err
    assert "classifier_l2 1.0 (was 16.0) has no effect on a resumed run" in err, err
    assert "trains otherwise" not in err


def test_resuming_on_other_data_says_so_and_starts_its_epoch_afresh(shards, tmp_path, capsys):
    """``--resume`` with another ``--data`` went on silently from the old split's place in
    its epoch, and compared validation losses across the two validation splits."""
    import shutil

    from speech2face.cli import main
    from speech2face.data import prepare

    out = tmp_path / "run"
    common = ["--out", str(out), "--no-progress", "preset=tiny", "batch_size=4",
              "val_every=2", "checkpoint_every=1", "precise_bn_batches=0"]
    assert main(["train-decoder", "--data", str(shards), *common, "steps=2"]) == 0
    moved = tmp_path / "moved"  # the same shards elsewhere: the same data
    shutil.copytree(shards, moved)
    capsys.readouterr()
    assert main(["train-decoder", "--data", str(moved), "--resume", *common, "steps=3"]) == 0
    assert "--data" not in capsys.readouterr().err
    state = json.loads((out / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert (state["epoch"], state["epoch_step"]) == (0, 3)

    other = tmp_path / "other"  # the same corpus prepared again into other shards
    prepare("voxceleb1", shards.parent / "corpus", other, samples_per_shard=5, progress=False)
    assert main(["train-decoder", "--data", str(other), "--resume", *common, "steps=4"]) == 0
    err = capsys.readouterr().err
    assert ("speech2face: --data: its training split is not the one this run trained on "
            "(its shards differ): from step 3 it trains on this one, epoch 0, from its first "
            "batch (the checkpoint was 3 steps into it)") in err, err
    assert "its validation split is not the one this run validated on: the best validation " \
           "loss so far" in err and ", step 3) was on other data" in err, err
    state = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert (state["epoch"], state["epoch_step"]) == (0, 1)
    assert state["best_step"] == 4  # the first validation on the new split is its best
    # and from there the run goes on as on any data: nothing more is said
    assert main(["train-decoder", "--data", str(other), "--resume", *common, "steps=5"]) == 0
    assert "--data" not in capsys.readouterr().err


def test_a_run_folder_without_its_settings_file_resumes_with_its_checkpoints(shards, tmp_path,
                                                                             capsys):
    """With RUN/train_config.json lost, --resume took the paper preset's defaults (and
    refused, or announced the run's own settings as changes); the newest checkpoint
    records them too."""
    from speech2face.cli import main

    out = tmp_path / "run"
    common = ["--data", str(shards), "--out", str(out), "--no-progress"]
    assert main(["train-decoder", *common, "preset=tiny", "steps=2", "batch_size=4",
                 "lr=1e-4", "seed=3", "val_batches=0", "precise_bn_batches=0"]) == 0
    (out / "train_config.json").unlink()
    capsys.readouterr()
    assert main(["train-decoder", *common, "--resume", "steps=3"]) == 0
    err = capsys.readouterr().err
    assert "resuming with" not in err and "another model" not in err, err
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["preset"], saved["batch_size"], saved["lr"], saved["seed"], saved["steps"]) \
        == ("tiny", 4, 1e-4, 3, 3)
    # Neither the file nor a record in the checkpoint (an older run's): the paper's sizes
    # were taken and the optimizer state refused as a shape mismatch. Now it says so.
    (out / "train_config.json").unlink()
    state = out / "checkpoints" / "step-00000003" / "state.json"
    recorded = json.loads(state.read_text())
    del recorded["train_config"]
    state.write_text(json.dumps(recorded))
    capsys.readouterr()
    assert main(["train-decoder", *common, "--resume"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "train_config.json: is missing and " + str(state) + " records no settings: give the "
        "run's settings again (--config FILE or key=value, e.g. preset=tiny) to resume")


def test_a_setting_given_twice_on_the_command_line_is_refused(shards, tmp_path, capsys):
    from speech2face.cli import main

    out = tmp_path / "run"
    assert main(["train-decoder", "--data", str(shards), "--out", str(out), "preset=tiny",
                 "steps=2", "steps=3"]) == 2
    assert capsys.readouterr().err.strip() == (
        "speech2face train-decoder: error: <command line>: steps is given twice ('2' and '3')")
    assert not out.exists()


def test_command_line_errors_exit_2(shards, tmp_path, capsys):
    from speech2face.cli import main

    out = tmp_path / "run"
    assert main(["train-decoder", "--data", str(shards), "--out", str(out), "stepz=3"]) == 2
    assert "unknown setting 'stepz'" in capsys.readouterr().err
    assert main(["train", "--data", str(shards), "--decoder", str(tmp_path / "nothing"),
                 "--out", str(out), "preset=tiny"]) == 2
    assert "no such model bundle" in capsys.readouterr().err
    (out / "checkpoints" / "step-00000005").mkdir(parents=True)
    (out / "checkpoints" / "step-00000005" / "state.json").write_text("{}")
    assert main(["train-decoder", "--data", str(shards), "--out", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert not (out / "metrics.csv").exists()


def _without_val(shards: Path, folder: Path) -> Path:
    """A copy of ``shards`` with no ``val`` split, whose test shards cannot be read: each
    is replaced by a folder of the same name, so any attempt to open one raises."""
    import shutil

    copy = folder / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for shard in manifest["splits"].pop("val")["shards"]:
        (copy / shard["path"]).unlink()
    for shard in manifest["splits"]["test"]["shards"]:
        (copy / shard["path"]).unlink()
        (copy / shard["path"]).mkdir()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_validation_never_reads_the_test_split(shards, tmp_path, capsys):
    """Without a ``val`` split the run stops with one clear line before writing anything
    (it used to validate, and pick its best checkpoint, on test); with ``val_batches=0``
    it trains without validation and never opens a test shard."""
    from speech2face.cli import main

    data = _without_val(shards, tmp_path)
    out = tmp_path / "run"
    common = ["train-decoder", "--data", str(data), "--out", str(out), "--no-progress",
              "preset=tiny", "steps=2", "batch_size=4"]
    assert main(common) == 2
    err = capsys.readouterr().err
    assert "no 'val' split" in err and "val_batches=0" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main([*common, "val_batches=0"]) == 0
    assert latest_checkpoint(out).name == "step-00000002"
    assert not (out / "images").exists()  # no validation grid: nothing was validated


def test_amp_fp16_on_cpu_and_unknown_encoder_exit_2_writing_nothing(shards, tmp_path, capsys):
    from speech2face.cli import main

    out = tmp_path / "run"
    base = ["--data", str(shards), "--out", str(out)]
    assert main(["train-decoder", *base, "preset=tiny", "device=cpu", "amp=fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "amp: fp16 needs a CUDA GPU" in err and "\n" not in err
    assert main(["train", *base, "--decoder", str(tmp_path), "preset=tiny",
                 "encoder=whisper"]) == 2
    err = capsys.readouterr().err.strip()
    assert "encoder" in err and "'whisper'" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("device, words", [
    pytest.param("mps", "MPS is not available", marks=pytest.mark.skipif(
        torch.backends.mps.is_available(), reason="this machine has MPS")),
                                           ("xpu", "only cpu, cuda and mps"),
                                           ("meta", "only cpu, cuda and mps"),
                                           ("cuda:99", "cuda:99"),
                                           ("gpu0", "not a torch device")])
def test_a_device_this_machine_cannot_train_on_is_one_line(device, words, shards, tmp_path,
                                                           capsys):
    """device=mps/xpu/meta ended in a traceback from deep in the run."""
    from speech2face.cli import main

    out = tmp_path / "run"
    assert main(["train-decoder", "--data", str(shards), "--out", str(out), "--no-progress",
                 "preset=tiny", f"device={device}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("speech2face train-decoder: error: ") and "\n" not in err, err
    assert "device: " in err and words in err, err
    assert not out.exists()


def test_a_batch_bigger_than_the_training_split_is_refused_before_writing(shards, tmp_path,
                                                                           capsys):
    from speech2face.cli import main

    out = tmp_path / "run"
    samples = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["samples"]
    for command in (["train-decoder"], ["train", "--decoder", str(tmp_path)]):
        assert main([*command, "--data", str(shards), "--out", str(out), "preset=tiny",
                     f"batch_size={samples + 1}"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"has {samples} training samples" in err and f"batch_size={samples + 1}" in err
        assert "\n" not in err and not out.exists()


# ---------------------------------------------------------------------------- mixed precision


def _tiny_stages():
    """Both real stages with tiny models, and a batch for each (generated)."""
    from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig
    from speech2face.losses import LossConfig
    from speech2face.model import Speech2Face
    from speech2face.train import DecoderStage, VoiceStage
    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    mean = 60 + 100 * torch.rand(68, 2, generator=g)
    decoder = FaceDecoder(FaceDecoderConfig.tiny(), mean)
    classifier = torch.nn.Linear(128, 20)
    # The voice stage freezes its decoder: it gets its own.
    voice = Speech2Face(FaceDecoder(FaceDecoderConfig.tiny(), mean),
                        VoiceEncoder(VoiceEncoderConfig.tiny()), classifier, "dlib")
    face_batch = {"feature": torch.randn(4, 128, generator=g),
                  "face": torch.rand(4, 3, 224, 224, generator=g),
                  "landmarks": mean + 4 * torch.randn(4, 68, 2, generator=g)}
    voice_batch = {"feature": torch.randn(4, 128, generator=g),
                   "spectrogram": torch.randn(4, 2, 300, 257, generator=g)}
    return [(DecoderStage(Speech2Face(decoder), LossConfig()), face_batch),
            (VoiceStage(voice, LossConfig()), voice_batch)]


def test_decoder_stage_renders_the_image_only_for_the_perceptual_term(monkeypatch):
    """Cole et al.'s texture and landmark losses never see the rendered image: the stage
    leaves the warp out then (same loss and gradient as with it), and renders once per
    step when a differentiable face encoder adds the perceptual term."""
    from speech2face import face_decoder
    from speech2face.losses import decoder_loss

    (stage, batch), _ = _tiny_stages()
    decoder = stage.trainable
    target = stage._targets(batch)
    rendered = []
    real_render = face_decoder.render
    monkeypatch.setattr(face_decoder, "render",
                        lambda *a, **k: rendered.append(1) or real_render(*a, **k))

    def loss_and_grad(compute):
        decoder.zero_grad(set_to_none=True)
        total, _ = compute()
        total.backward()
        return total.detach(), [p.grad.clone() for p in decoder.parameters()]

    total, grads = loss_and_grad(lambda: stage.loss(decoder, batch))
    assert rendered == []
    ref_total, ref_grads = loss_and_grad(lambda: decoder_loss(
        decoder(batch["feature"]), target, batch["landmarks"], stage.loss_config))
    assert rendered == [1]  # the reference did render
    assert torch.equal(total, ref_total)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))

    class Encoder(torch.nn.Module):  # a differentiable stand-in: mean colour per channel
        differentiable = True

        def embed(self, image):
            return torch.cat([image.mean(dim=(2, 3)), torch.ones(len(image), 125)], dim=1)

    stage.face_encoder = Encoder()
    rendered.clear()
    _, terms = stage.loss(decoder, batch)
    assert rendered == [1] and float(terms["perceptual"]) != 0  # 0 without the encoder
    with pytest.raises(ValueError, match="rendered image"):
        decoder_loss(decoder(batch["feature"], render_image=False), target, batch["landmarks"],
                     stage.loss_config, encoder=Encoder(), features=batch["feature"])


def test_one_step_of_each_stage_under_bf16_autocast_tracks_float32():
    """The loss terms and the gradient of one step under CPU bf16 autocast against float32.

    Tolerance: bf16 keeps 8 significant bits, so each rounded activation or weight is off
    by up to 2^-9 = 0.2 % (relative); matmuls accumulate in float32, and about ten layers
    compound this to ~1 %: terms within 3 %, gradient norms within 5 %. The gradient's
    direction: within 8 degrees (cosine > 0.99) for the decoder; the voice stage's eq. 1
    starts with an L1 term whose gradient is the sign of each f_dec unit's error (and a
    ReLU gate), so every unit whose error is within bf16 rounding of 0 flips: cosine >
    0.9 (measured 0.94 on this batch).
    The warp and the decoder's outputs stay float32 (test_warp.py, test_face_decoder.py).
    """
    for stage, batch in _tiny_stages():
        results = []
        for dtype in (None, torch.bfloat16):
            stage.trainable.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                total, terms = stage.loss(stage.trainable, batch)
            total.backward()
            grad = torch.cat([p.grad.flatten() for p in stage.trainable.parameters()
                              if p.grad is not None])
            results.append(({"total": total.detach(), **terms}, grad))
        (exact, g32), (mixed, g16) = results
        for name, value in exact.items():
            assert mixed[name].dtype == torch.float32, (stage.name, name)
            assert float(mixed[name]) == pytest.approx(float(value), rel=3e-2, abs=1e-6), \
                (stage.name, name)
        cosine = torch.nn.functional.cosine_similarity(g32, g16, dim=0)
        assert cosine > (0.99 if stage.name == "decoder" else 0.9), (stage.name, float(cosine))
        assert float(g16.norm()) == pytest.approx(float(g32.norm()), rel=5e-2), stage.name


def test_fit_runs_bf16_autocast_on_cpu(toy, tmp_path):
    """amp=bf16 on CPU really autocasts in the loop (its losses differ from float32's in
    the last bits, not more) and logs on-device sums once per interval."""
    module, _ = toy
    exact = module.run(tmp_path / "fp32", steps=4, log_every=2, amp="none")
    mixed = module.run(tmp_path / "bf16", steps=4, log_every=2, amp="bf16")
    assert mixed.train_loss != exact.train_loss
    assert mixed.train_loss == pytest.approx(exact.train_loss, rel=3e-2)


def test_voice_encoder_predicts_in_the_training_features_coordinates():
    """With a standardising decoder, the voice encoder's output is ``mean + spread / sqrt(D)
    * y`` (numpy statistics), so a fresh encoder predicts near the training faces' mean,
    within about their spread, where an unscaled one starts far from every face."""
    from speech2face.face_decoder import FeatureCode
    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    rng = np.random.default_rng(0)
    train = (rng.normal(size=128) + 0.1 * rng.normal(size=(50, 128))).astype(np.float32)
    mean = train.mean(axis=0)
    spread = np.sqrt(((train - mean) ** 2).sum(axis=1).mean())
    f_dec = FeatureCode(128, 16, standardize=True)
    f_dec.set_standardization(torch.from_numpy(train))
    spec = torch.randn(8, 2, VoiceEncoderConfig.tiny().min_frames(), 257,
                       generator=torch.Generator().manual_seed(1))

    torch.manual_seed(0)
    voice = VoiceEncoder(VoiceEncoderConfig.tiny(128))
    with torch.no_grad():
        standardization, voice.output_standardization = voice.output_standardization, None
        raw = voice(spec)  # the network before the last step
        voice.output_standardization = standardization
        unscaled = voice(spec).numpy()  # statistics not set yet: the identity
        np.testing.assert_allclose(unscaled, raw.numpy(), rtol=1e-6, atol=1e-6)
        assert voice.output_standardization.copy_from(f_dec)
        out = voice(spec).numpy()
    np.testing.assert_allclose(out, mean + spread / np.sqrt(128) * raw.double().numpy(),
                               rtol=1e-5, atol=1e-6)
    started = np.linalg.norm(out - mean, axis=1)
    assert started.max() < 2 * spread < np.linalg.norm(unscaled - mean, axis=1).min()
    # a decoder without the statistics (an older bundle) leaves the output as it is
    fresh = VoiceEncoder(VoiceEncoderConfig.tiny(128)).output_standardization
    assert not fresh.copy_from(FeatureCode(128, 16))


def test_precise_batchnorm_matches_numpy_batch_statistics():
    """Running statistics re-estimated as the average of the first batches' own mean and
    unbiased variance (numpy), whatever the running averages held before."""
    from torch import nn

    from speech2face.train import Stage, precise_batchnorm

    class Norm(Stage):
        name = "norm"

        def __init__(self):
            self.model = self.trainable = nn.Sequential(nn.BatchNorm1d(4))

        def loss(self, forward, batch):
            out = forward(batch["x"])
            return out.pow(2).mean(), {}

    g = torch.Generator().manual_seed(0)
    x = 3 + 2 * torch.randn(64, 4, generator=g)
    data = InMemoryData({"x": x}, 8, shuffle=False)
    stage = Norm()
    bn = stage.trainable[0]
    bn.running_mean.fill_(100.0)  # stale averages
    bn.eval()
    assert precise_batchnorm(stage, data, batches=5, device=torch.device("cpu"))
    chunks = x.double().numpy()[:40].reshape(5, 8, 4)
    np.testing.assert_allclose(bn.running_mean.numpy(), chunks.mean(axis=1).mean(axis=0),
                               rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(),
                               chunks.var(axis=1, ddof=1).mean(axis=0), rtol=1e-5)
    assert bn.momentum == 0.1 and not bn.training  # restored
    assert not precise_batchnorm(stage, data, batches=0, device=torch.device("cpu"))


def _logged(run: Path, name: str) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f)
                if r["split"] == "train" and r["name"] == name}


def test_a_resumed_run_follows_its_new_optimiser_and_schedule_settings(toy, tmp_path, capfd):
    """Resumed with other lr, lr_decay, lr_decay_steps and eps: from the resumed step the
    rate is the new schedule's, lr * decay ** (step // decay_steps), as train_config.json
    records; the checkpoint's own settings (lr 0.03 halved every 4) no longer apply."""
    module, _ = toy
    run = tmp_path / "run"
    module.run(run, steps=10, log_every=1)
    capfd.readouterr()
    module.run(run, resume=True, steps=14, log_every=1, lr=0.01, lr_decay=0.25,
               lr_decay_steps=2, eps=1e-3)
    assert "resuming with lr 0.01 (was 0.03)" in capfd.readouterr().err
    lr = _logged(run, "lr")
    for step in range(1, 11):  # the lr used for step s, after s - 1 scheduler steps
        assert lr[step] == pytest.approx(0.03 * 0.5 ** ((step - 1) // 4))
    for step in range(11, 15):
        assert lr[step] == pytest.approx(0.01 * 0.25 ** ((step - 1) // 2))
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state["scheduler"]["base_lrs"] == [0.01] and state["scheduler"]["step_size"] == 2
    assert state["optimizer"]["param_groups"][0]["eps"] == 1e-3


def test_a_resumed_run_with_a_new_batch_size_goes_on_where_its_samples_end(toy, tmp_path):
    """The data position is the samples trained on this epoch: 4 steps of 4 are 2 of 8;
    3 steps of 4 (12 samples) cannot go on in batches of 8, and nothing is written."""
    module, _ = toy
    run = tmp_path / "run"
    module.run(run, steps=3, batch_size=4)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="batch_size 8 cannot continue this epoch: 12 "):
        module.run(run, resume=True, steps=5, batch_size=8)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    module.run(run, resume=True, steps=4, batch_size=4)
    module.run(run, resume=True, steps=6, batch_size=8)
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert (state["epoch"], state["epoch_step"]) == (0, 2 + 2)  # 16 samples, then 2 of 8


def test_a_resumed_run_with_other_loader_workers_says_the_order_changes(toy, tmp_path, capfd):
    module, _ = toy
    module.run(tmp_path / "run", steps=5)
    capfd.readouterr()
    module.run(tmp_path / "run", resume=True, steps=6, num_workers=2)
    assert "num_workers 0 -> 2: the shard loader's order changes" in capfd.readouterr().err


def _train_rows(run: Path) -> dict[tuple[str, str], float]:
    with open(run / "metrics.csv", newline="") as f:
        return {(r["step"], r["name"]): float(r["value"]) for r in csv.DictReader(f)
                if r["split"] == "train" and r["name"] != "samples_per_s"}


def test_a_resumed_runs_log_reads_as_the_unbroken_runs(toy, tmp_path):
    """Rows every 4 steps, checkpoints every 5, killed at 12 and resumed from 10: the
    logged means equal the unbroken run's (the row at 12 covered steps 11-12 only, and
    steps 9-10 were never logged, when a window could span a checkpoint)."""
    module, script = toy
    settings = {"log_every": 4, "checkpoint_every": 5, "val_every": 100}
    module.run(tmp_path / "straight", **settings)
    killed = _run_script(script, {"out": str(tmp_path / "killed"), "kill_at": 12, **settings})
    assert killed.returncode == -signal.SIGKILL
    resumed = _run_script(script, {"out": str(tmp_path / "killed"), "resume": True, **settings})
    assert resumed.returncode == 0, _failure(resumed)
    straight, split = _train_rows(tmp_path / "straight"), _train_rows(tmp_path / "killed")
    assert split.keys() == straight.keys()
    assert {step for step, _ in straight} >= {"5", "8", "10", "12"}
    for key, value in straight.items():
        assert split[key] == pytest.approx(value, rel=1e-6), key


def test_an_uncalibrated_identity_classifier_is_said(shards, capfd):
    """The 8-speaker corpus is too small for a clip to be held out: the run says the
    classifier is not calibrated (it said nothing); with clips held out, it prints the
    held-out figures."""
    from speech2face.data import load_manifest
    from speech2face.face_encoders import fit_identity_classifier
    from speech2face.train import _identity_classifier, training_features

    features, identities = training_features(shards, False)
    fit = fit_identity_classifier(features, identities, seed=0, progress=False)
    _identity_classifier(shards, load_manifest(shards), TrainConfig.tiny("voice"), False)
    err = capfd.readouterr().err
    assert f"identity classifier on {len(features)} clips" in err
    if fit.heldout_samples:
        assert "held-out accuracy" in err
    else:
        assert "no clip held out, so not calibrated (temperature 1)" in err


def test_face_encoder_weights_for_dlib_shards_are_refused_before_writing(shards, tmp_path,
                                                                          capsys):
    """dlib's features take no weights file: one given would be silently ignored."""
    from speech2face.cli import main

    out = tmp_path / "run"
    for command in (["train-decoder"], ["train", "--decoder", str(tmp_path)]):
        assert main([*command, "--data", str(shards), "--out", str(out), "preset=tiny",
                     "face_encoder_weights=/no/such/vgg_face_dag.pth"]) == 2
        err = capsys.readouterr().err.strip()
        assert "face_encoder_weights=/no/such/vgg_face_dag.pth" in err
        assert "dlib features" in err and "\n" not in err and not out.exists()


def test_more_processes_than_training_shards_are_refused_before_writing(shards):
    """Each process of a torchrun reads whole shards: with fewer shards than processes
    the run used to stop at its first step, its run folder begun (metrics.csv, ...)."""
    from speech2face.config import TrainConfig
    from speech2face.distributed import Placement
    from speech2face.errors import ConfigError
    from speech2face.train import _check_batch_fits

    count = len(json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"])
    config = TrainConfig.tiny("voice")
    _check_batch_fits(shards, config, Placement(rank=0, world_size=count))
    with pytest.raises(ConfigError, match=f"has {count} training shard.s. for {count + 1} "
                                          "processes"):
        _check_batch_fits(shards, config, Placement(rank=0, world_size=count + 1))


def test_a_tampered_checkpoint_setting_is_shown_cut_short():
    """A resumed run says what it changes against the checkpoint's settings, which are
    the checkpoint's own text: a 5,000-element list made a 14-kB "one line"."""
    from speech2face.train import _other_changes

    config = TrainConfig.tiny("decoder")
    saved = config.to_dict()
    saved["loss"] = {**saved["loss"], "lambda1": list(range(5000))}
    line = _other_changes(saved, config)
    assert line.startswith("loss.lambda1 0.025 (was [0, 1, 2") and len(line) < 120, line


def test_overrides_given_as_one_string_are_a_type_error():
    """load_config(None, "steps=5") read the string a character at a time: "expected
    key=value, got 's'"."""
    from speech2face.config import load_config

    with pytest.raises(TypeError, match="list of 'key=value' strings or a dict, not str"):
        load_config(None, "steps=5")
    assert load_config(None, ["steps=5"]).steps == 5
