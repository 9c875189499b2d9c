"""`make bench`: speed and memory of the rollout and the update on this machine.

Prints, per case (model x algorithm; default tiny_random:ddpo, toy:ddpo, toy_flow:ddpo (the flow toy
beside the UNet toy, same batch and algorithm), toy:prdp, toy:pxpo,
tiny_random_sd3:grpo; full UNet or transformer finetuning, 20 DDIM steps with CFG 5, or 20 flow-SDE
steps with CFG 4.5 on the flow models, sampling batch 16), each in its own process:
  * sampling images/s, and our rollout against a bare diffusers loop making the same
    UNet calls (``scheduler.step``, no log-probs): the overhead of recording a trajectory;
  * one epoch of the runner's default batch (8 prompts x 4 images) split into the keys of
    KEYS below (sampling, reward, reference log-probs, training: PRDP's no-gradient values
    pass and its backward pass), training images/s (every step of every sample), and one
    evaluation (the run's evaluation sets, as configured);
  * peak memory of the case (resident set on CPU, allocated on CUDA).

``--efficiency EPOCHS`` adds PXPO's sample-efficiency claim on the toy world: experiment=pxpo_color
with PXPO against DDPO-SF at the same lr, seed, batch and number of sampled images, printing the
training reward (mean over blocks of epochs) and the evaluation reward on seen and unseen prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

KEYS = {  # what each printed figure is
    "sample_images_per_s": "our rollout with log-probs, images per second",
    "bare_diffusers_images_per_s": "a bare diffusers loop making the same denoiser calls (scheduler.step)",
    "rollout_overhead_pct": "how much slower our rollout is than the bare loop (negative: faster)",
    "epoch_samples": "images sampled in one epoch",
    "epoch_s": "one training epoch, all of it",
    "epoch_sample_s": "  sampling: denoising and decoding (the reward's time taken out)",
    "epoch_reward_s": "  reward: inside the reward model (inline on CPU; overlapping sampling on GPU)",
    "epoch_reward_wait_s": "  waiting for the last batch's reward after sampling",
    "epoch_reference_s": "  reference log-probs of every step (PRDP)",
    "epoch_train_s": "  training: the algorithm's update",
    "epoch_train_values_s": "    PRDP's no-gradient pass over the steps (values of log pi_theta)",
    "epoch_train_backward_s": "    PRDP's backward pass through sum w log pi_theta",
    "train_images_per_s": "images per second through the update (every step of every sample)",
    "eval_s": "one evaluation: every evaluation set's images, rewards and sub-scores",
    "eval_held_out_s": "  of which held-out rewards, image features, drift and diversity",
    "peak_memory_mb": "peak memory of the case (resident set on CPU, allocated on CUDA)",
}


def _timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# per model: a prompt it can draw, and the config groups of its world (the root defaults are the toy world)
MODELS = {
    "tiny_random": (
        "a cat",
        [
            "model=tiny_random",
            "reward=jpeg_compressibility",
            "dataset=simple_animals",
            "~dataset@eval_datasets.unseen",  # evaluate on the training prompts only
            "+reward@eval_rewards.jpeg_incompressibility=jpeg_incompressibility",  # a held-out reward
        ],
    ),
    "toy": ("a red circle left of a blue square", ["model=toy"]),  # held out: toy_color (conf/held_out/)
    # the flow family (rlft/sd3.py) through the same runner: SD3's architecture, the flow SDE
    "tiny_random_sd3": (
        "a cat",
        [
            "model=tiny_random_sd3",
            "sampler=flow_sde",
            "reward=jpeg_compressibility",
            "dataset=simple_animals",
            "~dataset@eval_datasets.unseen",
            "+reward@eval_rewards.jpeg_incompressibility=jpeg_incompressibility",
        ],
    ),
    "toy_flow": ("a red circle left of a blue square", ["model=toy_flow", "sampler=flow_sde"]),
    # GPU: SD3.5 Medium's published transformer and VAE, random weights (rlft/sd3.py
    # build_random_sd35_medium), LoRA, bf16, 512 px, and one GPU's share of Flow-GRPO's PickScore
    # epoch (experiment=grpo_sd35_pickscore: Flow-GRPO's 1,152 images over its 32 GPUs = 36 per GPU,
    # 4 groups of 9, sampled and trained 9 at a time, 2 optimizer steps) with a reward that needs no
    # download
    "sd35_medium_random": (
        "a cat",
        [
            "experiment=grpo_sd35_pickscore",
            "reward=jpeg_compressibility",
            "dataset=simple_animals",
            "~dataset@eval_datasets.unseen",
            "trainer.prompts_per_epoch=4",
            "trainer.images_per_prompt=9",
            "trainer.gradient_accumulation_steps=2",
            "trainer.eval_num_prompts=4",
            "trainer.eval_images_per_prompt=2",
        ],
    ),
}
FLOW_MODELS = ("tiny_random_sd3", "toy_flow", "sd35_medium_random")


def bench_rollout(policy, prompt: str, steps: int, batch: int, repeat: int, flow: bool = False) -> dict[str, float]:
    """Our rollout (DDIM eta 1, CFG 5; flow models: the flow SDE, CFG 4.5) against a bare loop of the same
    denoiser calls with the scheduler's own step (DDIM's; FlowMatchEuler's Euler step)."""
    from rlft.flow_sampling import FlowSDE
    from rlft.sampling import DDIM

    device = policy.unet.device
    sampler = FlowSDE(steps, guidance_scale=4.5) if flow else DDIM(steps, eta=1.0, guidance_scale=5.0)
    sampler.setup(policy.scheduler_config)
    cond = policy.encode([prompt] * batch)
    policy.unet.eval()

    def ours():
        sampler.sample(policy, cond, torch.Generator().manual_seed(0), lambda lp: lp.mean(dim=(1, 2, 3)))

    scheduler = sampler.make_scheduler(policy.scheduler_config)
    w, step_args = sampler.guidance_scale, {} if flow else {"eta": 1.0}

    @torch.no_grad()
    def bare():
        scheduler.set_timesteps(steps)  # a flow scheduler counts its steps: start again
        g = torch.Generator().manual_seed(0)
        x = torch.randn((batch, *policy.latent_shape), generator=g).to(device, cond.dtype)  # as predict casts it
        guided = cond.guided()
        for t in scheduler.timesteps:
            u, c = policy.denoise(torch.cat([x, x]), t.expand(2 * batch).to(device), guided).chunk(2)
            x = scheduler.step(u + w * (c - u), t, x, generator=g, **step_args).prev_sample
        policy.decode(x)

    t_ours, t_bare = _timeit(ours, repeat), _timeit(bare, repeat)
    return {
        "sample_images_per_s": batch / t_ours,
        "bare_diffusers_images_per_s": batch / t_bare,
        "rollout_overhead_pct": 100 * (t_ours / t_bare - 1),
    }


def bench_epoch(cache: Path, steps: int, out: Path, groups: list[str]) -> dict[str, float]:
    from rlft.config import compose_run
    from rlft.runner import Runner

    overrides = [
        *groups,
        f"paths.output_root={out}",
        f"paths.cache_dir={cache}",
        f"sampler.num_steps={steps}",
        "trainer.progress_bar=false",
        "trainer.log_images=0",
        "resume=never",
        "run_name=bench",
    ]
    cfg = compose_run(overrides)
    runner = Runner(cfg, out / "bench")
    runner.logger.start(runner.run_dir, {}, None)
    runner.train_epoch()  # warm-up
    m = runner.train_epoch()
    n = runner.plan.samples_per_process * runner.plan.world_size
    out = {
        "epoch_samples": n,
        "epoch_s": m["perf/epoch_s"],
        "epoch_sample_s": m["perf/sample_s"],
        "epoch_reward_s": m["perf/reward_s"],
        "epoch_reward_wait_s": m["perf/reward_wait_s"],
        "epoch_reference_s": m["perf/reference_s"],
        "epoch_train_s": m["perf/train_s"],
        "train_images_per_s": n / m["perf/train_s"],
    }
    for key in ("perf/prdp_values_s", "perf/prdp_backward_s"):
        if key in m:
            out["epoch_train_" + key.split("_", 1)[1]] = m[key]
    if runner.eval_datasets:
        m = runner.evaluate()
        out["eval_s"], out["eval_held_out_s"] = m["perf/eval_s"], m["perf/eval_held_out_s"]
    return out


def run_case(model: str, algorithm: str, args) -> dict[str, float]:
    """One (model, algorithm) case: rollout speed and one epoch through the runner, in this process."""
    import diffusers

    from rlft.models import DiffusionPolicy, build_tiny_random, ensure_built
    from rlft.sd3 import SD3Policy, build_tiny_random_sd3
    from rlft.toy import WEIGHTS

    diffusers.utils.logging.disable_progress_bar()
    cache = Path(os.environ.get("RLFT_CACHE", Path.home() / ".cache" / "rlft"))
    prompt, groups = MODELS[model]
    family, options = SD3Policy if model in FLOW_MODELS else DiffusionPolicy, {}
    finetune, dtype = "full", torch.float32
    if model in ("tiny_random", "tiny_random_sd3"):
        path = ensure_built(
            cache / f"{model}_v1", build_tiny_random if model == "tiny_random" else build_tiny_random_sd3
        )
        options = {"max_sequence_length": 16} if model == "tiny_random_sd3" else {}
    elif model == "sd35_medium_random":
        from functools import partial

        from rlft.sd3 import build_random_sd35_medium

        half = "bfloat16" if torch.cuda.is_available() else "float32"
        path = ensure_built(cache / f"{model}_v1", partial(build_random_sd35_medium, dtype=half))
        finetune, dtype, options = "lora", getattr(torch, half), {"resolution": args.resolution}
        groups = [*groups, f"model.path={path}", f"model.resolution={args.resolution}"]
    elif model == "toy_flow":
        path, options = WEIGHTS.parent / "flow_weights", {"max_sequence_length": 1}
    else:
        path = WEIGHTS
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = family.from_pretrained(str(path), finetune=finetune, **options).to(device, dtype)
    results = bench_rollout(policy, prompt, args.steps, args.batch, args.repeat, flow=model in FLOW_MODELS)
    del policy
    with tempfile.TemporaryDirectory() as tmp:
        results.update(bench_epoch(cache, args.steps, Path(tmp), [*groups, f"algorithm={algorithm}"]))
    results["peak_memory_mb"] = _peak_memory_mb()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=512, help="image side of sd35_medium_random (px)")
    parser.add_argument(
        "--cases",
        default="tiny_random:ddpo,toy:ddpo,toy_flow:ddpo,toy:prdp,toy:pxpo,tiny_random_sd3:grpo",
        help="comma-separated model:algorithm pairs; models: " + ", ".join(MODELS),
    )
    parser.add_argument("--efficiency", type=int, default=0, metavar="EPOCHS", help="PXPO vs DDPO-SF on toy_color")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.case:
        print(json.dumps(run_case(*args.case.split(":"), args)))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, {args.steps} DDIM steps, batch {args.batch}")
    print("each case runs in its own process, so that its peak memory is its own")
    for case in args.cases.split(","):
        cmd = [sys.executable, "-m", "rlft.bench", "--case", case, f"--steps={args.steps}", f"--batch={args.batch}"]
        cmd += [f"--repeat={args.repeat}", f"--resolution={args.resolution}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"\n{case}: failed\n{done.stderr[-2000:]}")
            continue
        results = json.loads(done.stdout.strip().splitlines()[-1])
        model, algorithm = case.split(":")
        denoiser = "transformer" if model in FLOW_MODELS else "UNet"
        kind = (
            "LoRA on the transformer, bf16 on GPU" if model == "sd35_medium_random" else f"full {denoiser} finetuning"
        )
        print(f"\nmodel={model} algorithm={algorithm} ({kind})")
        width = max(len(k) for k in results)
        for key, value in results.items():
            print(f"  {key:<{width}}  {value:10.3f}   {KEYS.get(key, '')}")
    if args.efficiency:
        efficiency(args.efficiency, args.seed)


# PXPO's claim, same budget: the per-pixel map (PXPO, eq. 9) against one score per image (DDPO-SF)
EFFICIENCY = {
    "pxpo": ["experiment=pxpo_color"],
    "ddpo_sf": ["experiment=pxpo_color", "algorithm=ddpo_sf", "optimizer.lr=3e-5"],
}


def efficiency(epochs: int, seed: int) -> None:
    """Run each EFFICIENCY case through the CLI and print its reward per block of epochs."""
    every = max(1, epochs // 3)
    print(f"\nsample efficiency on toy_color (experiment=pxpo_color), {epochs} epochs x 32 images, seed {seed}")
    for name, overrides in EFFICIENCY.items():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "rlft", *overrides, f"seed={seed}", f"trainer.epochs={epochs}"]
            cmd += [f"trainer.eval_every={every}", f"paths.output_root={tmp}", "run_name=eff", "resume=never"]
            cmd += ["trainer.progress_bar=false", "trainer.log_images=0", "trainer.checkpoint_every=0"]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"  {name}: failed\n{done.stderr[-2000:]}")
                continue
            rows = [json.loads(line) for line in (Path(tmp) / "eff" / "metrics.jsonl").read_text().splitlines()]
        train = [r["reward/mean"] for r in rows if "reward/mean" in r]
        blocks = [sum(train[i : i + every]) / len(train[i : i + every]) for i in range(0, len(train), every)]
        evals = [r for r in rows if "eval/reward/mean" in r]
        print(f"  {name:<8} ({time.perf_counter() - t0:.0f} s)")
        print(f"    train reward per block of {every} epochs: " + " -> ".join(f"{b:.3f}" for b in blocks))
        for key in ("seen", "unseen"):
            values = " -> ".join(f"{r[f'eval/{key}/reward/mean']:.3f} (epoch {r['epoch']})" for r in evals)
            print(f"    eval/{key}: {values}")


if __name__ == "__main__":
    main()
