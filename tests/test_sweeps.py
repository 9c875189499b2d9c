"""Hydra sweep presets (grid, Optuna), the SLURM launcher preset, and W&B run grouping."""

from __future__ import annotations

import os

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from rlft.config import register_configs
from tests.conftest import FAST, REPO, read_metrics, run_cli

SWEEPS = sorted(p.stem for p in (REPO / "sweeps" / "hydra").glob("*.yaml"))


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_hydra_sweep_preset_composes_with_every_experiment(name):
    experiments = [None, *sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))]
    for experiment in experiments:
        cfg = _compose([f"sweep={name}", *([f"experiment={experiment}"] if experiment else [])])
        params = cfg.hydra.sweeper.params
        assert params, name
        if name.startswith("optuna"):
            assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
            for key in params:  # every searched key exists in the composed config
                assert OmegaConf.select(cfg, key) is not None, (name, key)


def test_slurm_launcher_preset_runs_one_task_per_gpu():
    cfg = _compose(["hydra/launcher=slurm", "sweep=methods"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8 and launcher.max_num_timeout > 0


def test_slurm_tasks_become_the_torch_distributed_variables(monkeypatch):
    """Task 3 of a 2-node x 2-GPU job: RANK 3, LOCAL_RANK 1, WORLD_SIZE 4, master = first node."""
    from rlft.__main__ import distributed_env_from_slurm

    # a private copy of the environment: nothing exported here may leak into later subprocesses
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NTASKS_PER_NODE": "2",
    }  # fmt: skip
    os.environ.update(slurm)
    distributed_env_from_slurm()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("3", "1", "4")
    assert os.environ["MASTER_ADDR"] == "gpu07" and int(os.environ["MASTER_PORT"]) > 0
    os.environ["RANK"] = "0"  # a launcher already set it: left alone
    distributed_env_from_slurm()
    assert os.environ["RANK"] == "0"


def test_optuna_objective_is_each_jobs_final_evaluation_reward(cache_dir, tmp_path):
    args = [
        "-m", "sweep=optuna_ddpo", "hydra.sweeper.n_trials=3", *FAST, "sampler.num_steps=4", "trainer.epochs=1",
        "trainer.eval_every=1", "trainer.eval_num_prompts=2", "trainer.log_images=0", "trainer.checkpoint_every=0",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    result = run_cli(args, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    study = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    finals = [
        [r["eval/reward/mean"] for r in read_metrics(job) if "eval/reward/mean" in r][-1]
        for job in (tmp_path / "sweep").iterdir()
        if job.is_dir() and (job / "metrics.jsonl").exists()
    ]
    assert len(finals) == 3
    assert study["best_value"] == pytest.approx(max(finals), abs=1e-6)
    assert set(study["best_params"]) == {"optimizer.lr", "algorithm.clip_range", "algorithm.adv_clip_max"}


def test_a_multirun_runs_past_an_invalid_job_and_lists_it(cache_dir, tmp_path):
    """Three jobs, the middle one with a value that cannot work: the other two run to the end, and the
    multirun exits 1 with the failed job and its one-line reason."""
    args = [
        "-m", *FAST, "sampler.num_steps=4", "trainer.epochs=1", "trainer.eval_every=0", "trainer.log_images=0",
        "trainer.max_grad_norm=1.0,-1,0.5", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    result = run_cli(args, cache_dir)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    done = [j.name for j in jobs if (j / "checkpoints" / "epoch_00001" / "run_state.json").exists()]
    assert [d.split("-")[0] for d in done] == ["0", "2"], [j.name for j in jobs]
    assert "rlft: 1 job(s) of the multirun" in result.stderr
    listed = [line for line in result.stderr.splitlines() if line.startswith("  1-")]
    assert len(listed) == 1 and "trainer.max_grad_norm: must be a finite number > 0" in listed[0], result.stderr


def test_wandb_group_is_one_configuration_across_seeds_and_tags_are_the_choices(monkeypatch, tmp_path):
    import wandb

    from rlft.loggers import WandbLogger

    seen = {}

    class _Run:
        dir = str(tmp_path)

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or _Run())
    for seed in (0, 1):
        HydraConfig.instance().set_config(_compose(["experiment=toy_small", "algorithm=pxpo", f"seed={seed}"]))
        logger = WandbLogger(mode="offline", tags=["mine"])
        logger.start(tmp_path / f"run{seed}", {"seed": seed}, None)
        assert seen["group"] == "toy_small/pxpo-toy_alignment-toy-toy_small"
        assert seen["tags"] == ["mine", "pxpo", "toy_alignment", "toy", "toy_small"]
    HydraConfig.instance().set_config(_compose(["algorithm=ddpo"]))
    WandbLogger(mode="offline", group="mine").start(tmp_path / "run2", {}, None)
    assert seen["group"] == "mine"
