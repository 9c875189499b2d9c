"""Checkpoints hold only safetensors and JSON (rlft/checkpoint.py): nothing rlft reads can run code, and a
damaged latest checkpoint is skipped for the previous complete one, which resumes exactly."""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rlft.checkpoint import optimizer_from_files, optimizer_to_files
from tests.conftest import FAST, REPO, read_metrics, run_cli, subprocess_env, timeout_s, too_slow


class _Payload:
    """Unpickling this writes ``path``: what a checkpoint handed over by someone else could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


def plant(directory, marker) -> list[str]:
    """Replace every file under ``directory`` with a payload (torch.save's format where torch would read
    the file, plain pickle elsewhere) and add the files accelerate's loader would unpickle."""
    names = []
    for path in [p for p in directory.rglob("*") if p.is_file()]:
        if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            torch.save(_Payload(marker), path)
        else:
            path.write_bytes(pickle.dumps(_Payload(marker)))
        names.append(path.name)
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "pytorch_model.bin"):
        torch.save(_Payload(marker), directory / name)
    return names


def test_optimizer_state_round_trips_through_tensors_and_json():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    for _ in range(2):
        sum((p**2).sum() for p in params).backward()
        opt.step()
    tensors, plain = optimizer_to_files(opt.state_dict())
    json.dumps(plain)  # plain JSON values only
    back = optimizer_from_files(tensors, json.loads(json.dumps(plain)))
    want = opt.state_dict()
    assert back["param_groups"] == want["param_groups"]
    for i, state in want["state"].items():
        assert state.keys() == back["state"][i].keys()
        assert all(torch.equal(state[k], back["state"][i][k]) for k in state)


def test_damaged_or_planted_checkpoint_is_skipped_and_the_run_resumes_exactly(cache_dir, tmp_path):
    """A run saved at epochs 2 and 4; then every file of epoch 4 is replaced with a pickle payload,
    pickles that accelerate would load are added to epoch 2, and metrics.jsonl ends in half a line.
    Resumed to epoch 6, the run skips epoch 4 with one warning, continues from epoch 2 and ends
    bit-identical to an uninterrupted run; the payload never runs, and checkpoints hold only
    safetensors and JSON."""
    marker = tmp_path / "payload_ran"
    common = [f"paths.output_root={tmp_path}", *FAST, "trainer.checkpoint_every=2", "trainer.eval_every=0"]
    common += ["trainer.keep_checkpoints=3", "sampler.num_steps=4"]
    straight = run_cli([*common, "run_name=straight", "trainer.epochs=6"], cache_dir)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli([*common, "run_name=planted", "trainer.epochs=4"], cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "planted" / "checkpoints"
    assert {p.name for p in (checkpoints / "epoch_00004").iterdir()} == {
        "trainable.safetensors",
        "optimizer.safetensors",
        "run_state.json",
    }
    planted = plant(checkpoints / "epoch_00004", marker)
    assert "run_state.json" in planted
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        torch.save(_Payload(marker), checkpoints / "epoch_00002" / name)
    with open(tmp_path / "planted" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 5, "rewa')  # a line that a kill cut short

    resumed = run_cli([*common, "run_name=planted", "trainer.epochs=6"], cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not marker.exists()
    warnings = [line for line in resumed.stdout.splitlines() if "skipping damaged checkpoint" in line]
    assert len(warnings) == 1 and "epoch_00004" in warnings[0], resumed.stdout
    assert "resumed from" in resumed.stdout and "epoch_00002 (epoch 2)" in resumed.stdout
    a = load_file(tmp_path / "straight" / "checkpoints" / "epoch_00006" / "trainable.safetensors")
    b = load_file(checkpoints / "epoch_00006" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "straight")) == strip(read_metrics(tmp_path / "planted"))


def test_a_model_directory_with_a_planted_file_loads_or_fails_without_running_it(tiny_path, tmp_path):
    """Each file of a model directory in turn replaced with a payload: loading either fails or ignores
    the file, and the payload never runs (diffusers and transformers read safetensors, JSON and text;
    trust_remote_code stays off)."""
    from rlft.models import DiffusionPolicy

    marker = tmp_path / "payload_ran"
    files = sorted(p.relative_to(tiny_path) for p in tiny_path.rglob("*") if p.is_file())
    assert len(files) >= 8
    for relative in files:
        model = tmp_path / "model"
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(tiny_path, model)
        target = model / relative
        target.write_bytes(pickle.dumps(_Payload(marker)))
        torch.save(_Payload(marker), target.with_name("diffusion_pytorch_model.bin"))
        try:
            DiffusionPolicy.from_pretrained(str(model), finetune="full")
        except Exception:  # noqa: BLE001 - any failure is fine; running the payload is not
            pass
        assert not marker.exists(), relative


def _start(args, cache_dir):
    """``python -m rlft`` in the background (stdout, stderr to pipes)."""
    cmd = [sys.executable, "-m", "rlft", "trainer.progress_bar=false", *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env=subprocess_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(path, proc, limit):
    deadline = time.time() + limit
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not path.exists():
        proc.kill()
        if time.time() >= deadline:
            too_slow(proc.args, limit)
        raise AssertionError(f"{path} never appeared: {proc.communicate()[1][-2000:]}")


def test_a_signal_inside_a_library_that_catches_exception_reaches_the_runner_untouched(monkeypatch):
    """The handler raises wherever the main thread is. Inside OmegaConf's attribute access (its
    `except Exception` re-makes what it catches from the message) it must arrive as itself."""
    from omegaconf import DictConfig, OmegaConf

    from rlft.errors import Interrupted

    cfg = OmegaConf.create({"seed": 0})

    def interrupted_here(*args, **kwargs):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(DictConfig, "_get_impl", interrupted_here)
    with pytest.raises(Interrupted) as caught:
        _ = cfg.seed
    assert caught.value.signum == signal.SIGTERM and str(caught.value) == "SIGTERM"


def test_a_signal_swallowed_where_it_landed_ends_the_run_at_the_next_denoiser_call(monkeypatch, tiny_policy):
    """A handler's exception raised inside a finalizer is printed ("Exception ignored in ...") and
    dropped by CPython; the next safe point (every denoiser call) raises it again."""
    from rlft import errors
    from rlft.errors import Interrupted
    from rlft.sampling import DDIM

    monkeypatch.setattr(errors, "_received", [])

    class Finalized:
        def __del__(self):
            errors.raise_interrupted(signal.SIGTERM)

    Finalized()  # the exception is swallowed here
    sampler = DDIM(2, eta=1.0).setup(tiny_policy.scheduler_config)
    with pytest.raises(Interrupted) as caught:
        sampler.sample(tiny_policy, tiny_policy.encode(["cat"]), torch.Generator().manual_seed(0), "mean")
    assert caught.value.signum == signal.SIGTERM


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_in_one_line_naming_the_last_checkpoint(cache_dir, tmp_path, signum):
    args = [f"paths.output_root={tmp_path}", *FAST, "sampler.num_steps=4", "trainer.epochs=50"]
    args += ["trainer.eval_every=0", "trainer.checkpoint_every=1", "run_name=run"]
    proc = _start(args, cache_dir)
    _wait_for(tmp_path / "run" / "checkpoints" / "epoch_00001" / "run_state.json", proc, timeout_s(300))
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=timeout_s(120))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{signal.Signals(signum).name} did not end the run")
    assert proc.returncode == 128 + signum, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    name = signal.Signals(signum).name
    assert lines[-1].startswith(f"rlft: stopped by {name}; the last checkpoint is {tmp_path / 'run' / 'checkpoints'}")
    again = run_cli([*args, "trainer.epochs=2"], cache_dir)  # the same run, continued
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]


def test_a_second_process_on_one_run_directory_is_refused_and_a_killed_one_leaves_no_lock(cache_dir, tmp_path):
    args = [f"paths.output_root={tmp_path}", *FAST, "sampler.num_steps=4", "trainer.epochs=50"]
    args += ["trainer.eval_every=0", "trainer.checkpoint_every=1", "run_name=run"]
    first = _start(args, cache_dir)
    try:
        _wait_for(tmp_path / "run" / "checkpoints" / "epoch_00001" / "run_state.json", first, timeout_s(300))
        second = run_cli(args, cache_dir)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert f"{tmp_path / 'run'} is in use by rlft pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first one runs on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run_cli([*args, "trainer.epochs=2"], cache_dir)
    assert third.returncode == 0 and "resumed from" in third.stdout, third.stderr[-2000:]


def test_a_run_moved_to_another_directory_resumes(cache_dir, tmp_path):
    """Where outputs live is not what the run is: the run directory moved under another output root
    (as a requeue on another node, or a moved checkout, sees it) resumes, and ends as an unmoved run."""
    common = [*FAST, "sampler.num_steps=4", "trainer.eval_every=0", "trainer.checkpoint_every=2", "run_name=run"]
    straight = run_cli([f"paths.output_root={tmp_path / 'straight'}", *common, "trainer.epochs=4"], cache_dir)
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = run_cli([f"paths.output_root={tmp_path / 'a'}", *common, "trainer.epochs=2"], cache_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp_path / "b").mkdir()
    shutil.move(tmp_path / "a" / "run", tmp_path / "b" / "run")
    moved = run_cli([f"paths.output_root={tmp_path / 'b'}", *common, "trainer.epochs=4"], cache_dir)
    assert moved.returncode == 0 and "resumed from" in moved.stdout, moved.stderr[-2000:]
    a = load_file(tmp_path / "straight" / "run" / "checkpoints" / "epoch_00004" / "trainable.safetensors")
    b = load_file(tmp_path / "b" / "run" / "checkpoints" / "epoch_00004" / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
