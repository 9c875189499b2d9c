"""Every bad input ends in one line, and nothing already finished is lost.

Each case of the table below starts from its own copy of an earlier run (one complete checkpoint,
epoch_00001), asks `python -m rlft` to continue it to epoch 2 with one thing wrong, and must end with a
non-zero exit, no traceback, exactly one ``rlft: error:`` line naming the key or file at fault (Hydra's
own message for what Hydra composes: unknown options, keys and types), and the run directory's
checkpoints byte for byte as they were.

The read-only and full-disk cases mount small tmpfs file systems (root only); elsewhere they are
skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, run_cli
from tests.helpers import save_tiny_hps

RUN = "run"  # the run's name in every case's output root


def _overrides(*changes: str) -> list[str]:
    """FAST plus the base run's settings, with ``changes`` replacing the same keys (or groups)."""
    merged: dict[str, str] = {}
    for item in [
        *FAST,
        "sampler.num_steps=4",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=1",
        f"run_name={RUN}",
        "trainer.epochs=2",
        *changes,
    ]:
        key = item.split("=", 1)[0]
        merged.pop(key, None)
        merged[key] = item
    return list(merged.values())


class Workspace:
    """Files the cases read, made once: prompt files, damaged model directories, reward weights, maps."""

    def __init__(self, root: Path, tiny_path: Path | None, dry: bool = False):
        self.root, self.tiny_path, self.dry = root, tiny_path, dry  # dry: the paths only, no files
        self.marker = root / "PAYLOAD_RAN"  # what a payload would write if anything unpickled it

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / "files" / name
        if not self.dry:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def payload(self, name: str) -> Path:
        """A file that writes ``marker`` when unpickled (torch.save's format for .pt)."""
        marker, path = self.marker, self.root / "files" / name

        class Payload:
            def __reduce__(self):
                return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

        if not self.dry:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(Payload(), path) if name.endswith(".pt") else path.write_bytes(pickle.dumps(Payload()))
        return path

    def model(self, name: str, damage) -> Path:
        """A copy of the tiny model directory, damaged by ``damage(path)``."""
        path = self.root / "models" / name
        if not self.dry:
            shutil.copytree(self.tiny_path, path)
            damage(path)
        return path

    def hps_arch(self) -> Path:
        """A tiny open_clip architecture (ViT-H-14's layout) as a model-config file."""
        return self.root / "ViT-H-14-tiny.json" if self.dry else save_tiny_hps(self.root)[0]

    def other_state(self) -> Path:
        """A torch state dict of another model."""
        path = self.root / "files" / "other.pt"
        if not self.dry:
            torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, path)
        return path


def _truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _unet_weights(model: Path) -> Path:
    return next((model / "unet").glob("*.safetensors"))


def _cases(ws: Workspace) -> dict[str, tuple[list[str], str]]:
    """name -> (overrides, what the message must name)."""
    f = ws.file

    def prompts(path):
        return ["dataset=file", f"dataset.path={path}"]

    def model(name, damage):
        return [f"model.path={ws.model(name, damage)}", "model.builder=null"]

    def hps(path):
        return ["reward=hpsv2", f"reward.arch={ws.hps_arch()}", f"reward.path={path}"]

    def aesthetic(mlp):  # the CLIP directory exists (the pre-flight passes); the MLP is read first
        return ["reward=aesthetic", f"reward.mlp_path={mlp}", f"reward.clip_path={ws.tiny_path}"]

    def pxpo_map(path):
        row = json.dumps({"prompt": "cat", "feedback_map": str(path)})
        return ["algorithm=pxpo", "reward=feedback_map", *prompts(f(f"map_{path.name}.jsonl", row))]

    return {
        # config values: ranges, checked before anything loads
        "max_grad_norm negative": (["trainer.max_grad_norm=-1"], "trainer.max_grad_norm"),
        "max_grad_norm zero": (["trainer.max_grad_norm=0"], "trainer.max_grad_norm"),
        "sampler batch size zero": (["sampler.batch_size=0"], "sampler.batch_size"),
        "sampler batch size negative": (["sampler.batch_size=-4"], "sampler.batch_size"),
        "one ddpm step": (["sampler=ddpm", "sampler.num_steps=1"], "sampler.num_steps"),
        "negative lr": (["optimizer.lr=-1e-4"], "optimizer.lr"),
        "negative weight decay": (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay"),
        "zero adam eps": (["optimizer.eps=0"], "optimizer.eps"),
        "adam beta above one": (["optimizer.betas=[0.9,1.5]"], "optimizer.betas"),
        "negative seed": (["seed=-1"], "seed"),
        "negative eval_every": (["trainer.eval_every=-1"], "trainer.eval_every"),
        "keep no checkpoints": (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints"),
        "zero rows per call": (["trainer.rows_per_call=0"], "trainer.rows_per_call"),
        "eta under ddpm": (["sampler=ddpm", "+sampler.eta=0.5"], "sampler.eta"),
        "lora rank zero": (["model.finetune=lora", "model.lora_rank=0"], "model.lora_rank"),
        "adv clip zero": (["algorithm.adv_clip_max=0"], "algorithm.adv_clip_max"),
        "train batch does not divide": (["trainer.train_batch_size=3"], "trainer.train_batch_size"),
        "prdp with one image per prompt": (["algorithm=prdp", "trainer.images_per_prompt=1"], "images_per_prompt"),
        "misspelt key of a component": (["+model.lora_rnk=8"], "model.lora_rnk"),
        "unknown option (hydra)": (["algorithm=ddpoo"], "algorithm/ddpoo"),
        "unknown key (hydra)": (["trainer.epoks=3"], "epoks"),
        "wrong type (hydra)": (["trainer.epochs=many"], "trainer.epochs"),
        # prompt files
        "prompt file not set": (["dataset=file"], "dataset.path"),
        "prompt file missing": (prompts(ws.root / "nope.txt"), "nope.txt"),
        "prompt file empty": (prompts(f("empty.txt", "\n")), "empty.txt"),
        "prompt file not utf-8": (prompts(f("latin1.txt", b"caf\xe9")), "latin1.txt"),
        "jsonl line not json": (prompts(f("bad.jsonl", "{\n")), "bad.jsonl"),
        "json not a list": (prompts(f("obj.json", "{}")), "obj.json"),
        "csv without the column": (prompts(f("p.csv", "text\na cat\n")), "p.csv"),
        "unknown prompt file type": (prompts(f("p.xlsx", "a cat")), "dataset.path"),
        # model directories
        "model dir missing": ([f"model.path={ws.root / 'no_model'}", "model.builder=null"], "no_model"),
        "model_index.json garbage": (
            model("index", lambda p: (p / "model_index.json").write_text("{nope")),
            "model_index.json",
        ),
        "unet config garbage": (
            model("unet_cfg", lambda p: (p / "unet" / "config.json").write_text("[")),
            "config.json",
        ),
        "unet weights truncated": (model("unet_w", lambda p: _truncate(_unet_weights(p))), "unet"),
        "no unet folder": (model("no_unet", lambda p: shutil.rmtree(p / "unet")), "unet"),
        "pickled unet weights only": (model("pickle_unet", lambda p: _pickle_only(p, ws)), "unet"),
        # reward weights
        "hps checkpoint missing": (hps(ws.root / "no.pt"), "no.pt"),
        "hps checkpoint garbage": (hps(f("garbage.pt", b"not a torch file")), "garbage.pt"),
        "hps checkpoint of another model": (hps(ws.other_state()), "other.pt"),
        "hps checkpoint with a payload": (hps(ws.payload("payload_hps.pt")), "payload_hps.pt"),
        "aesthetic mlp garbage": (aesthetic(f("mlp.pth", b"junk")), "mlp.pth"),
        "aesthetic mlp with a payload": (aesthetic(ws.payload("mlp_p.pt")), "mlp_p.pt"),
        # feedback maps
        "map not an image": (pxpo_map(f("map.png", b"not a png")), "map.png"),
        "map missing": (pxpo_map(ws.root / "nomap.png"), "nomap.png"),
        "prompt without a map": (
            ["algorithm=pxpo", "reward=feedback_map", *prompts(f("nomap.jsonl", '{"prompt": "cat"}'))],
            "feedback_map",
        ),
        # checkpoints (damaged by _damage_run)
        "only checkpoint truncated": ([], "checkpoints"),
        "only checkpoint without optimizer": ([], "checkpoints"),
        "only checkpoint's run_state garbage": ([], "checkpoints"),
        "only checkpoint's run_state a pickle": ([], "checkpoints"),
        "resume a folder that is no checkpoint": ([f"resume={ws.root / 'files'}"], "resume"),
        "resume=never over checkpoints": (["resume=never"], "already holds checkpoints"),
        "resume with another config": (["sampler.num_steps=5"], "sampler.num_steps"),
        # the run directory (made by the batch fixture)
        "output root under a file": ([], "is a file, not a directory"),
        "output root read-only": ([], "paths.output_root"),
        "run directory read-only": ([], f"{RUN} is not writable"),
        "disk full": ([], "epoch_00001 is intact"),
    }


def _pickle_only(model: Path, ws: Workspace) -> None:
    """The UNet's weights as a pickled file only (a .bin that would run a payload if unpickled)."""
    _unet_weights(model).unlink()
    shutil.copy(ws.payload("unet.bin"), model / "unet" / "diffusion_pytorch_model.bin")


def _damage_run(name: str, run: Path) -> None:
    checkpoint = run / "checkpoints" / "epoch_00001"
    if name == "only checkpoint truncated":
        _truncate(checkpoint / "trainable.safetensors")
    elif name == "only checkpoint without optimizer":
        (checkpoint / "optimizer.safetensors").unlink()
    elif name == "only checkpoint's run_state garbage":
        (checkpoint / "run_state.json").write_text('{"format": 2, "epoch": ')
    elif name == "only checkpoint's run_state a pickle":
        (checkpoint / "run_state.json").write_bytes(pickle.dumps({"format": 2}))


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


def _fill(root: Path, leave: int) -> None:
    """Fill the file system of ``root`` until ``leave`` bytes remain."""
    free = shutil.disk_usage(root).free - leave
    with open(root / "filler", "wb") as out:
        while free > 0:
            chunk = min(free, 1 << 20)
            out.write(b"\0" * chunk)
            free -= chunk


def _fingerprint(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((run / "checkpoints").rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def batch(cache_dir, tiny_path, tmp_path_factory):
    """Every case run once, each on its own copy of the earlier run: the results, the fingerprints of
    each copy's checkpoints before and after, and the cases skipped here (with the reason)."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    earlier = tmp / "earlier"
    first = run_cli([f"paths.output_root={earlier}", *_overrides("trainer.epochs=1")], cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    ws = Workspace(tmp / "ws", tiny_path)
    ws.root.mkdir()
    cases = _cases(ws)
    mounts, skipped, roots = [], {}, {}
    try:  # the mounts come off whatever happens
        for i, name in enumerate(cases):
            root = tmp / f"case{i:02d}"
            if name == "output root under a file":
                root.mkdir()
                (root / "file").write_text("")
                shutil.copytree(earlier / RUN, root / RUN)
                roots[name] = (root, root / "file" / "runs")
                continue
            if name in ("output root read-only", "run directory read-only", "disk full"):
                mount_at = root if name != "run directory read-only" else root / RUN
                if not _mount_tmpfs(mount_at, "64m" if name != "disk full" else "16m"):
                    skipped[name] = "cannot mount a tmpfs here (needs root)"
                    continue
                mounts.append(mount_at)
                shutil.copytree(earlier / RUN, root / RUN, dirs_exist_ok=True)
                if name == "disk full":
                    _fill(root, leave=64 << 10)
                else:
                    subprocess.run(["mount", "-o", "remount,ro", str(mount_at)], check=True)
            else:
                shutil.copytree(earlier / RUN, root / RUN)
                _damage_run(name, root / RUN)
            roots[name] = (root, root)
        run_names = [n for n in cases if n not in skipped]
        before = {n: _fingerprint(roots[n][0] / RUN) for n in run_names}
        args = [[f"paths.output_root={roots[n][1]}", *_overrides(*cases[n][0])] for n in run_names]
        results = dict(zip(run_names, [run_cli(a, cache_dir) for a in args], strict=True))
        after = {n: _fingerprint(roots[n][0] / RUN) for n in run_names}
        leftovers = {n: sorted(p.name for p in (roots[n][0] / RUN / "checkpoints").glob("*.tmp")) for n in run_names}
        yield {
            "cases": cases,
            "skipped": skipped,
            "results": results,
            "before": before,
            "after": after,
            "leftovers": leftovers,
            "marker": ws.marker,
        }
    finally:
        for mount_at in reversed(mounts):
            subprocess.run(["umount", "-l", str(mount_at)])


CASE_NAMES = list(_cases(Workspace(Path("/nonexistent"), None, dry=True)))


def test_the_table_is_large_and_covers_every_kind_of_input():
    assert len(CASE_NAMES) >= 40 and len(set(CASE_NAMES)) == len(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_line_and_loses_nothing(batch, name):
    if name in batch["skipped"]:
        pytest.skip(batch["skipped"][name])
    result = batch["results"][name]
    _, needle = batch["cases"][name]
    err, out = result.stderr, result.stdout
    assert result.returncode not in (0, "timeout"), (result.returncode, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    if name.endswith("(hydra)"):  # Hydra's own message (it lists the available options)
        assert result.returncode == 1 and needle in err, err[-2000:]
    else:
        lines = [line for line in err.splitlines() if line.startswith("rlft: error:")]
        assert len(lines) == 1 and needle in lines[0], err[-2000:]
        assert err.strip().splitlines()[-1].strip() == lines[0].strip(), err[-2000:]  # nothing after it
    if name.startswith("only checkpoint"):  # skipped with a warning, then nothing else to resume from
        assert "skipping damaged checkpoint epoch_00001" in out and "no checkpoint in" in lines[0], out[-2000:]
    assert batch["after"][name] == batch["before"][name], "the earlier checkpoint changed"
    assert batch["leftovers"][name] == [], "a half-written checkpoint was left behind"
    assert not batch["marker"].exists(), "a payload ran"
