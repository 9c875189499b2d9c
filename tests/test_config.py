"""Every option of every group composes and validates; bad input gets one clear line, no stack trace."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlft.config import compose_run, register_configs, validate
from rlft.errors import ConfigError
from rlft.presets import follow_the_reward
from tests.conftest import REPO, run_cli

CONF = REPO / "conf"
GROUPS = ["model", "reward", "algorithm", "dataset", "sampler", "trainer", "optimizer", "logger"]


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


FLOW_MODELS = ("sd35_medium", "tiny_random_sd3", "toy_flow", "flux_dev", "tiny_random_flux")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_validates(group, tmp_path):
    """Each option as the command line composes it (rlft/presets.py: a natural-image reward brings its
    paper setting), on a model of its world (Stable Diffusion with a reward that judges any image)."""
    (tmp_path / "p.txt").write_text("a cat\n")
    for option in _options(group):
        overrides = [f"{group}={option}"]
        if group == "dataset" and option == "file":
            overrides.append(f"dataset.path={tmp_path / 'p.txt'}")
        if group == "dataset" and option in ("toy_rephrased", "toy_swapped"):  # rewordings of the training set
            overrides = [f"+dataset@eval_datasets.check={option}"]  # evaluation only (BAD_INPUTS)
        if group == "model" and option in ("sd14", "sd15", "sd35_medium", "flux_dev"):
            overrides.append("reward=jpeg_compressibility")
        if group == "model" and option in (
            "sd35_medium",
            "tiny_random_sd3",
            "toy_flow",
            "flux_dev",
            "tiny_random_flux",
        ):
            overrides.append("sampler=flow_sde")  # a flow model takes a flow sampler
        if group == "sampler" and option == "flow_sde":
            overrides.append("model=tiny_random_sd3")
        if option == "flow_ode":  # evaluation and export only: refused for training (BAD_INPUTS)
            continue
        if option == "custom":  # a class of your own (README "Extend rlft"): here one of rlft's
            overrides.append(
                f"{group}._target_="
                + {"reward": "rlft.rewards.jpeg.JpegCompressibility", "algorithm": "rlft.algorithms.ddpo.DDPO"}[group]
            )
        overrides, _ = follow_the_reward(overrides)
        cfg = _compose(overrides)
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(cfg)
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        validate(cfg)


def test_every_experiment_composes(tmp_path):
    """Every preset composes and passes the start-up checks (its keys and values, e.g. a flow model's
    sampler options), except the feedback preset, which needs the user's prompt file."""
    for exp in sorted(p.stem for p in (REPO / "experiments").glob("*.yaml")):
        cfg = _compose([f"experiment={exp}"])
        assert cfg.trainer.epochs >= 1
        if exp != "pxpo_feedback":
            validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    sd35 = _compose(["experiment=grpo_sd35_pickscore"])
    assert sd35.model._target_ == "rlft.sd3.SD3Policy.from_pretrained" and sd35.sampler.num_steps == 10
    assert sd35.model.lora_rank == 32 and sd35.model.lora_alpha == 64 and sd35.model.resolution == 512


def test_root_config_and_batch_comment():
    cfg = _compose([])
    assert cfg.trainer.prompts_per_epoch * cfg.trainer.images_per_prompt == 32  # as the comment says
    assert cfg.algorithm._target_ == "rlft.algorithms.prdp.PRDP"  # the default demo is PRDP
    assert cfg.model.path.endswith("rlft/toy/weights") and cfg.eval_datasets.unseen.split == "unseen"
    assert cfg.eval_datasets.seen == cfg.dataset  # the training prompts, evaluated as PRDP's "seen" set
    assert cfg.algorithm.beta == 0.3  # conf/tuning/toy_prdp.yaml applies, then the recipe of the demo's prompts:
    assert cfg.optimizer.lr == 1e-4 and list(cfg.sampler.stochastic_window) == [
        0,
        3,
    ]  # recipe/toy_toy_relations_prdp.yaml
    assert _compose(["experiment=toy_small"]).optimizer.lr == 3e-5  # no recipe for toy_small: the tuning's lr
    assert _compose(["algorithm=ddpo"]).optimizer.lr == 1e-4  # conf/tuning/toy_ddpo.yaml
    assert _compose(["model=sd14"]).optimizer.lr == 3e-4  # no tuning file: the algorithm's paper default


def test_validate_names_unknown_and_mistyped_keys():
    cfg = _compose(["algorithm=ddpo", "+algorithm.clip_rnage=0.1"])
    with pytest.raises(ConfigError, match=r"algorithm.clip_rnage: unknown key .*known keys: estimator, clip_range"):
        validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    cfg = _compose(["algorithm=ddpo", "algorithm.num_inner_epochs=two"])
    with pytest.raises(ConfigError, match="algorithm.num_inner_epochs"):
        validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    cfg = _compose(["algorithm=ddpo", "algorithm.estimator=ppo2"])
    with pytest.raises(ConfigError, match=r"algorithm.estimator: 'ppo2' is not one of \['ppo', 'sf'\]"):
        validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))


BAD_VALUES = [  # (override, the key the message names): ranges, checked before anything loads
    ("trainer.max_grad_norm=-1", "trainer.max_grad_norm"),
    ("trainer.max_grad_norm=0", "trainer.max_grad_norm"),
    ("sampler.batch_size=0", "sampler.batch_size"),
    ("sampler.batch_size=-4", "sampler.batch_size"),
    ("sampler.num_steps=1", "sampler.num_steps"),
    ("optimizer.lr=-1e-4", "optimizer.lr"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
    ("optimizer.eps=0", "optimizer.eps"),
    ("optimizer.betas=[0.9,1.5]", "optimizer.betas"),
    ("seed=-1", "seed"),
    ("trainer.eval_every=-1", "trainer.eval_every"),
    ("trainer.checkpoint_every=-2", "trainer.checkpoint_every"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints"),
    ("trainer.eval_num_prompts=0", "trainer.eval_num_prompts"),
    ("trainer.eval_images_per_prompt=0", "trainer.eval_images_per_prompt"),
    ("trainer.log_images=-1", "trainer.log_images"),
    ("trainer.rows_per_call=0", "trainer.rows_per_call"),
    ("sampler.eta=1.5", "sampler.eta"),
    ("sampler.guidance_scale=0.5", "sampler.guidance_scale"),
]


@pytest.mark.parametrize("override,key", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_out_of_range_values_name_their_key(override, key):
    cfg = _compose([override])
    with pytest.raises(ConfigError) as info:
        validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    assert info.value.key == key, str(info.value)


def test_lora_values_name_their_key():
    for sd_override in (
        ["model=sd14", "model.finetune=lora", "model.lora_rank=0"],
        ["model=sd14", "model.lora_alpha=0"],
    ):
        cfg = _compose(sd_override)
        with pytest.raises(ConfigError, match=r"model\.lora_"):
            validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))


def test_algorithm_values_name_their_own_key():
    from rlft.algorithms.ddpo import DDPO

    for kwargs, key in (({"adv_clip_max": 0}, "adv_clip_max"), ({"clip_range": -1}, "clip_range")):
        with pytest.raises(ConfigError, match=f"algorithm.{key}: must be > 0"):
            DDPO(**kwargs)
    with pytest.raises(ConfigError, match="algorithm.stat_min_count"):
        DDPO(stat_min_count=0)


def _assert_clean_error(result, *needles: str, code: int = 2):
    err = result.stderr
    assert result.returncode == code, (result.returncode, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in result.stdout, err[-3000:]
    for needle in needles:
        assert needle in err, err[-2000:]


BAD_INPUTS = [
    # (overrides, expected fragments, exit code)
    (["algorithm=ddpoo"], ["Could not find 'algorithm/ddpoo'", "ddpo_sf"], 1),
    (["trainer.epochs=many"], ["trainer.epochs", "many"], 1),
    (["trainer.epoks=3"], ["epoks"], 1),
    (["+model.lora_rnk=8"], ["model.lora_rnk: unknown key", "lora_rank"], 2),
    (["optimizer.lr=fast"], ["rlft: error:"], 2),
    (["trainer.train_batch_size=3"], ["trainer.train_batch_size: 3 does not divide the 32 samples"], 2),
    (["sampler.eta=0"], ["sampler.eta"], 2),
    (["sampler=ddpm", "+sampler.eta=0.5"], ["sampler.eta: is not an option of rlft.sampling.DDPM", "sampler=ddim"], 2),
    (["sampler=flow_ode"], ["sampler: FlowODE is for evaluation and export only", "train with sampler=flow_sde"], 2),
    (["sampler=flow_sde", "sampler.kind=ode"], ["sampler.kind: 'ode' is not one of ['sde', 'cps']"], 2),
    (
        ["sampler=flow_sde"],  # the toy model is a diffusion model (DDIM scheduler)
        ["sampler: FlowSDE samples flow models; the model is a diffusion model", "use sampler=ddim or sampler=ddpm"],
        2,
    ),
    (
        ["model=toy_flow", "sampler=flow_sde", "model.path=/nonexistent/rlft/toy/flow_weights"],  # not written yet
        [
            "model.path: diffusion pipeline",
            "flow_weights' does not exist (write it with python -m rlft.toy.pretrain_flow",
        ],
        2,
    ),
    (["model=tiny_random_sd3"], ["sampler: DDIM samples diffusion models; the model is a flow model", "flow_sde"], 2),
    (["trainer.max_grad_norm=-1"], ["trainer.max_grad_norm: must be a finite number > 0", "reverse"], 2),
    (
        ["model.path=/nonexistent/sd", "model.builder=null"],
        ["1 of the files this run needs are missing: model.path: diffusion pipeline '/nonexistent/sd' does not exist"],
        2,
    ),
    (["eval_datasets=toy_small"], ["eval_datasets: is the plain value 'toy_small'", "@eval_datasets.unseen="], 2),
    (["eval_datasets.unseen=toy_small"], ["eval_datasets.unseen: is the plain value", "@eval_datasets.unseen="], 2),
    (["dataset=simple_animals"], ["dataset: reward=toy_alignment cannot read the prompt", "toy_small"], 2),
    (
        ["dataset.template=single"],
        ["eval_datasets.rephrased.of: toy_train_single_8 has no two-object", "~dataset@eval_datasets.swapped"],
        2,
    ),
    (["eval_datasets.swapped.per_prompt=40"], ["eval_datasets.swapped.per_prompt: must be at most 36"], 2),
    (["dataset=toy_rephrased"], ["dataset: rlft.toy.ToyRephrased rewords the training prompts", "=toy_rephrased"], 2),
    (
        ["eval_rewards=toy_color"],
        ["eval_rewards: is the plain value 'toy_color'", "+reward@eval_rewards.pickscore="],
        2,
    ),
    (["+reward@eval_rewards.reward=toy_color"], ["eval_rewards.reward: 'reward' names the training reward's"], 2),
    (["+reward@eval_rewards.pick=pickscore"], ["eval_rewards.pick: the held-out reward PickScore judges natural"], 2),
    (
        ["reward=toy_color", "dataset=simple_animals"],
        ["eval_rewards.toy_alignment: cannot judge eval_datasets.seen", "drop it: ~eval_rewards.toy_alignment"],
        2,
    ),
    (["trainer.ema_decay=1.5"], ["trainer.ema_decay: must be in (0, 1) or null, got 1.5"], 2),
    (["algorithm=prdp", "trainer.images_per_prompt=1"], ["PRDP compares images of the same prompt"], 2),
    (["algorithm=pxpo", "reward=jpeg_compressibility"], ["PXPO needs per-pixel reward maps", "broadcast_scalar"], 2),
    (["experiment=pxpo_feedback"], ["dataset.path: is required but not set"], 2),
    # offline with an empty cache (the tests' HF_HUB_OFFLINE=1): every missing file in one line (rlft/preflight.py)
    (
        ["reward=pickscore"],
        [
            "3 of the files this run needs are missing (HF_HUB_OFFLINE=1): model.path: diffusion pipeline "
            "'CompVis/stable-diffusion-v1-4' is not in the Hugging Face cache; reward.path: PickScore model",
            "reward.processor_path: CLIP processor and tokenizer 'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'",
            "reported moved to 'pickapic-anonymous/PickScore_v1': set reward.path=pickapic-anonymous/PickScore_v1",
        ],
        2,
    ),
    (["reward=aesthetic"], ["reward.mlp_path: aesthetic predictor weights", "reward.clip_path: CLIP ViT-L/14"], 2),
    (["reward=hpsv2"], ["reward.path: HPS checkpoint 'xswu/HPSv2' is not in the Hugging Face cache"], 2),
    (
        ["reward=multi_reward"],  # PRDP's multi-reward preset: the Pick-a-Pic v1 training prompts
        [
            "dataset.path: prompt files 'yuvalkirstain/pickapic_v1_no_images' is not in the Hugging Face cache",
            "reported moved to 'pickapic-anonymous/pickapic_v1': set dataset.repo=pickapic-anonymous/pickapic_v1",
            "reward.rewards.pickscore.path",
            "reward.rewards.hpsv2.path",
            "reward.rewards.aesthetic.mlp_path",
        ],
        2,
    ),
    (["reward=hpsv2", "model=toy"], ["model: HPSv2 scores natural images", "drop model=toy"], 2),
    (["model=sd14"], ["reward: ToyAlignment judges the toy world's scenes", "use model=toy"], 2),
    (["algorithm=ddpo", "dataset=parti"], ["dataset.path: prompt files 'nateraw/parti-prompts' is not in the"], 2),
    (["+dataset@eval_datasets.drawbench=drawbench"], ["eval_datasets.drawbench.path: prompt files"], 2),
    (["reward=hpsv2_1"], ["reward.path: HPS checkpoint 'xswu/HPSv2'", "HF_HUB_OFFLINE=1"], 2),
]


@pytest.fixture(scope="module")
def bad_input_results(cache_dir, tmp_path_factory):
    """Every BAD_INPUTS command line run once."""
    root = tmp_path_factory.mktemp("bad_inputs_default")
    results = [run_cli([f"paths.output_root={root}", *b[0]], cache_dir) for b in BAD_INPUTS]
    return {" ".join(b[0]): r for b, r in zip(BAD_INPUTS, results, strict=True)}


@pytest.mark.parametrize("overrides,needles,code", BAD_INPUTS, ids=[" ".join(b[0]) for b in BAD_INPUTS])
def test_bad_input_one_clear_message(overrides, needles, code, bad_input_results):
    _assert_clean_error(bad_input_results[" ".join(overrides)], *needles, code=code)


SWEEP_KEYS = {"program", "method", "metric", "parameters", "command"}


def _sample_value(spec: dict):
    """One value a W&B agent could draw for a parameter spec."""
    if "values" in spec:
        return spec["values"][0]
    if "value" in spec:
        return spec["value"]
    assert {"min", "max"} <= set(spec), spec
    return spec["min"]


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_wandb_sweep_files_are_valid_and_their_commands_compose(path):
    """Each W&B sweep: the keys an agent needs, a metric the runner logs, and a command line that composes
    (the agent passes parameters as key=value, ${args_no_hyphens})."""
    import yaml

    sweep = yaml.safe_load(path.read_text())
    assert SWEEP_KEYS <= set(sweep), SWEEP_KEYS - set(sweep)
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["goal"] in ("maximize", "minimize")
    assert sweep["metric"]["name"] in ("eval/reward/mean", "reward/mean") or sweep["metric"]["name"].startswith("eval/")
    command = sweep["command"]
    assert command[:4] == ["${env}", "python", "-m", "rlft"] and command[-1] == "${args_no_hyphens}"
    fixed = command[4:-1]
    drawn = [f"{key}={_sample_value(spec)}" for key, spec in sweep["parameters"].items()]
    cfg = _compose([*fixed, *drawn])
    validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    for key, spec in sweep["parameters"].items():
        if key in ("algorithm", "model", "reward", "dataset"):
            continue  # group choices, checked by composing
        assert OmegaConf.select(cfg, key) == _sample_value(spec), key


def _paper_config(*overrides: str):
    args, note = follow_the_reward(list(overrides))
    cfg = _compose(args)
    return cfg, note


def test_the_headline_command_is_prdps_paper_setting_on_sd14():
    """`python -m rlft algorithm=prdp reward=hpsv2` is PRDP's small-scale setting (Deng et al. 2024,
    Table 4): SD v1.4 full UNet, DDPM 50, CFG 5, 45 animals, E 100, N 32, B 16, K 10, beta 3e-5,
    eps 1e-6, AdamW lr 1e-5, weight decay 1e-4."""
    cfg, note = _paper_config("algorithm=prdp", "reward=hpsv2")
    assert note == "reward=hpsv2 scores natural images: running experiment=prdp_small_hpsv2 (set model=... to choose)"
    assert cfg.model.path == "CompVis/stable-diffusion-v1-4" and cfg.model.finetune == "full"
    assert cfg.reward._target_ == "rlft.rewards.hps.HPSv2" and cfg.algorithm._target_ == "rlft.algorithms.prdp.PRDP"
    a, t = cfg.algorithm, cfg.trainer
    assert (a.beta, a.clip_range, a.num_inner_epochs) == (3e-5, 1e-6, 10)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (1e-5, 1e-4)
    assert (cfg.sampler._target_, cfg.sampler.num_steps, cfg.sampler.guidance_scale) == ("rlft.sampling.DDPM", 50, 5.0)
    assert (t.epochs, t.prompts_per_epoch, t.images_per_prompt) == (100, 32, 16)
    assert cfg.dataset.name == "simple_animals" and cfg.dataset.template == "A painting of a {}"
    # the default algorithm is PRDP, so the reward alone means the same
    assert _paper_config("reward=hpsv2")[0].algorithm.beta == 3e-5
    # DDPO's own preset where one exists; Stable Diffusion with the animal prompts where none does
    assert _paper_config("algorithm=ddpo", "reward=aesthetic")[1].endswith(
        "experiment=ddpo_aesthetic (set model=... to choose)"
    )
    cfg, note = _paper_config("algorithm=ddpo", "reward=hpsv2")
    assert "model=sd14 dataset=animals45" in note and cfg.model.path == "CompVis/stable-diffusion-v1-4"
    # what the user names is kept: a model, an experiment, a toy or any-image reward
    for given in (["reward=hpsv2", "model=toy"], ["experiment=prdp_large_hpsv2"], ["reward=jpeg_compressibility"], []):
        assert follow_the_reward(given) == (given, None)


def test_pickscore_presets_use_prdps_scale():
    for preset in ("prdp_small_pickscore", "prdp_large_pickscore"):
        assert _compose([f"experiment={preset}"]).reward.scale == "cosine"
    multi = _compose(["experiment=prdp_multi_reward"])
    assert multi.reward.rewards.pickscore.scale == "cosine" and multi.dataset.name == "pickapic"
    assert _compose(["reward=pickscore", "model=sd14"]).reward.scale == "logit"  # PickScore's own, by default
    ddpo = _compose(["experiment=ddpo_compressibility"])
    assert ddpo.model.path == "CompVis/stable-diffusion-v1-4" and ddpo.trainer.gradient_accumulation_steps == 2


def test_bench_cases_compose():
    """Every `make bench` case is a valid run config; the GPU case is one GPU's share of Flow-GRPO's
    PickScore epoch (experiment=grpo_sd35_pickscore) with LoRA at 512 px and the JPEG reward."""
    from rlft.bench import MODELS
    from rlft.config import compose_run

    for name, (_, groups) in MODELS.items():
        compose_run([*groups, "algorithm=grpo" if "sd3" in name else "algorithm=ddpo"])
    cfg = compose_run([*MODELS["sd35_medium_random"][1], "model.resolution=512"])
    t, s, a = cfg.trainer, cfg.sampler, cfg.algorithm
    assert cfg.model.finetune == "lora" and (cfg.model.lora_rank, cfg.model.lora_alpha) == (32, 64.0)
    assert (t.prompts_per_epoch * t.images_per_prompt, t.images_per_prompt, t.train_batch_size) == (36, 9, 9)
    assert (s.num_steps, s.guidance_scale, s.noise_level, t.mixed_precision) == (10, 4.5, 0.7, "bf16")
    assert (a.clip_range, a._target_) == (1e-4, "rlft.algorithms.grpo.GRPO")
    assert cfg.reward._target_ == "rlft.rewards.jpeg.JpegCompressibility"


@pytest.mark.parametrize(
    "exp, processes, accumulation",
    [("grpo_sd35_pickscore", 16, None), ("grpo_sd35_pickscore", 8, 8), ("grpo_sd35_pickscore", 1, 64),
     ("grpo_flux_pickscore", 16, None), ("grpo_flux_pickscore", 8, 24), ("grpo_flux_pickscore", 48, 4)],
)  # fmt: skip
def test_flow_grpo_presets_keep_two_optimizer_steps_on_the_documented_process_counts(exp, processes, accumulation):
    """Flow-GRPO's epoch (48 prompts x 24 images, 2 optimizer steps) on each launch the preset's header
    names; the 32 processes Flow-GRPO used do not hold whole groups, and are refused with the reason."""
    from hydra.utils import instantiate

    from rlft.runner import BatchPlan

    overrides = [f"experiment={exp}"] + (
        [f"trainer.gradient_accumulation_steps={accumulation}"] if accumulation else []
    )
    cfg = compose_run(overrides)
    plan = BatchPlan.derive(cfg, processes, instantiate(cfg.algorithm))
    micro_batches = plan.samples_per_process // plan.train_batch_size
    assert plan.samples_per_process * processes == 1152 and micro_batches % plan.gradient_accumulation_steps == 0
    assert micro_batches // plan.gradient_accumulation_steps == 2
    with pytest.raises(ConfigError, match="48 prompts do not split over 32 processes"):
        BatchPlan.derive(cfg, 32, instantiate(cfg.algorithm))
