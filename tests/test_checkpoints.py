"""Checkpoints hold only safetensors and JSON (rlft/checkpoint.py): nothing rlft reads can run code, and a
damaged latest checkpoint is skipped for the previous complete one, which resumes exactly."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rlft.checkpoint import optimizer_from_files, optimizer_to_files
from tests.conftest import FAST, read_metrics, run_cli


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


@pytest.mark.parametrize("damage", ["truncated weights", "no optimizer file", "garbage run_state.json"])
def test_every_checkpoint_damaged_stops_with_one_line(cache_dir, tmp_path, damage):
    common = [f"paths.output_root={tmp_path}", *FAST, "trainer.checkpoint_every=1", "trainer.eval_every=0"]
    common += ["sampler.num_steps=4", "run_name=run"]
    assert run_cli([*common, "trainer.epochs=1"], cache_dir).returncode == 0
    latest = tmp_path / "run" / "checkpoints" / "epoch_00001"
    if damage == "truncated weights":
        path = latest / "trainable.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "no optimizer file":
        (latest / "optimizer.safetensors").unlink()
    else:
        (latest / "run_state.json").write_text("{not json")
    again = run_cli([*common, "trainer.epochs=2"], cache_dir)
    assert again.returncode != 0
    assert "Traceback" not in again.stderr and "no checkpoint in" in again.stderr, again.stderr[-2000:]
    assert "skipping damaged checkpoint epoch_00001" in again.stdout
    assert latest.exists()  # nothing deleted
