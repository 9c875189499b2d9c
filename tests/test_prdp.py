"""PRDP: the loss against an independent hand computation, the two-pass gradient against autograd."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from rlft.algorithms.base import Rollout
from rlft.algorithms.prdp import PRDP, pairs_of, prdp_coefficients, prdp_loss
from rlft.errors import ConfigError
from rlft.sampling import DDIM
from tests.helpers import SGDContext


def _hand_loss(logp, old, ref, rewards, group, beta, eps, aggregation):
    """Plain-Python loops over prompts and pairs: mean over pairs with r_a > r_b, then over prompts."""
    B, T = len(logp), len(logp[0])
    agg = (lambda xs: sum(xs) / len(xs)) if aggregation == "mean" else sum
    rhat = [agg([logp[i][t] - ref[i][t] for t in range(T)]) for i in range(B)]
    rclip = []
    for i in range(B):
        vals = []
        for t in range(T):
            r_t, r_old = logp[i][t] - ref[i][t], old[i][t] - ref[i][t]
            vals.append(min(max(r_t, r_old - eps), r_old + eps))
        rclip.append(agg(vals))
    per_prompt = []
    for g in sorted(set(group)):
        members = [i for i in range(B) if group[i] == g]
        losses = []
        for a, b in itertools.permutations(members, 2):
            if rewards[a] - rewards[b] > 0:
                target = (rewards[a] - rewards[b]) / beta
                losses.append(max((rhat[a] - rhat[b] - target) ** 2, (rclip[a] - rclip[b] - target) ** 2))
        if losses:
            per_prompt.append(sum(losses) / len(losses))
    return sum(per_prompt) / len(per_prompt)


def _problem(seed=0, B=12, T=5, images=4):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(B, T, generator=g, dtype=torch.float64)
    old = ref + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
    logp = old + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.randint(0, 4, (B,), generator=g).double() * 1e-5  # ties inside prompts
    group = torch.arange(B // images).repeat_interleave(images)
    return logp, old, ref, rewards, group


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
def test_loss_matches_hand_computation_with_both_branches_and_ties(aggregation):
    logp, old, ref, rewards, group = _problem()
    beta, eps = 3e-5, 0.04
    moved = ((logp - old).abs() > eps).float().mean()
    assert 0.1 < moved < 0.9  # the clip is active on some steps and not on others
    assert any(
        rewards[i] == rewards[j] for i in range(12) for j in range(12) if i != j and group[i] == group[j]
    )  # ties present
    got = prdp_loss(logp, old, ref, rewards, group, beta, eps, aggregation)
    want = _hand_loss(
        logp.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), group.tolist(), beta, eps, aggregation
    )
    assert got.item() == pytest.approx(want, rel=1e-12)
    # both branches of the max are taken by some pair
    rhat = (logp - ref).mean(1) if aggregation == "mean" else (logp - ref).sum(1)
    clipped_t = torch.clamp(logp - ref, old - ref - eps, old - ref + eps)
    rclip = clipped_t.mean(1) if aggregation == "mean" else clipped_t.sum(1)
    a, b, _ = pairs_of(group, rewards)
    target = (rewards[a] - rewards[b]) / beta
    unclipped_wins = (rhat[a] - rhat[b] - target) ** 2 > (rclip[a] - rclip[b] - target) ** 2
    assert unclipped_wins.any() and (~unclipped_wins).any()


def test_pairs_drop_ties_and_weight_pairs_then_prompts():
    group = torch.tensor([0, 0, 0, 1, 1])
    rewards = torch.tensor([1.0, 2.0, 2.0, 5.0, 3.0])
    a, b, w = pairs_of(group, rewards)
    assert sorted(zip(a.tolist(), b.tolist())) == [(1, 0), (2, 0), (3, 4)]
    torch.testing.assert_close(w, torch.tensor([0.25, 0.25, 0.5])[torch.argsort(torch.argsort(a))])
    assert w.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
def test_coefficients_equal_autograd_of_the_loss(aggregation):
    logp, old, ref, rewards, group = _problem(seed=1)
    logp = logp.requires_grad_(True)
    prdp_loss(logp, old, ref, rewards, group, 3e-5, 0.04, aggregation).backward()
    w, diag = prdp_coefficients(logp.detach(), old, ref, rewards, group, 3e-5, 0.04, aggregation)
    torch.testing.assert_close(w, logp.grad, rtol=1e-10, atol=1e-12)
    assert 0 < diag["train/clipfrac"] < 1 and diag["train/prdp_pairs"] > 0


def test_loss_is_zero_exactly_when_rhat_differences_predict_reward_differences():
    # dyadic numbers keep every operation exact in float64
    g = torch.Generator().manual_seed(2)
    ref = torch.randint(-64, 64, (12, 5), generator=g).double() / 8
    rewards = torch.randint(0, 4, (12,), generator=g).double() / 1024
    group = torch.arange(3).repeat_interleave(4)
    beta = 1 / 1024
    # rhat_t = r / beta + c at every step, any constant c: every pair's error d_rhat - d_r / beta is 0
    for c in (0.0, 3.5):
        logp = ref + (rewards / beta + c)[:, None].expand_as(ref)
        for aggregation in ("mean", "sum"):
            if aggregation == "sum":  # the whole difference on the first step, none on the others
                logp = ref + torch.cat([(rewards / beta + c)[:, None], torch.zeros(12, 4, dtype=torch.float64)], 1)
            assert prdp_loss(logp, logp, ref, rewards, group, beta, 1e-3, aggregation) == 0
            w, _ = prdp_coefficients(logp, logp, ref, rewards, group, beta, 1e-3, aggregation)
            assert torch.count_nonzero(w) == 0
    # any other rhat leaves some pair mispredicted: the loss is positive
    shifted = logp.clone()
    shifted[0, 0] += 1 / 64
    assert prdp_loss(shifted, logp, ref, rewards, group, beta, 1e-3, "sum") > 0


def test_prdp_rejects_bad_values():
    with pytest.raises(ConfigError, match="algorithm.beta"):
        PRDP(beta=0)
    with pytest.raises(ConfigError, match="algorithm.aggregation"):
        PRDP(aggregation="median")
    with pytest.raises(ConfigError, match="whole prompts"):
        PRDP().check(samples_per_process=16, train_batch_size=2, gradient_accumulation_steps=1, images_per_prompt=4)


def test_the_runner_records_pi_ref_at_the_stochastic_steps_only(tiny_policy):
    """The runner's reference pass (PRDP's log pi_ref) runs pi_ref at the steps that draw noise and are
    trained on, and records 0 at the deterministic steps (sampler.stochastic_window), which PRDP never reads."""
    from rlft.runner import Runner

    torch.manual_seed(0)
    unet = copy.deepcopy(tiny_policy.unet).double().eval()
    reference = copy.deepcopy(unet).requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sampler = DDIM(4, eta=1.0, guidance_scale=5.0, stochastic_window=[1, 3]).setup(tiny_policy.scheduler_config)
    prompts = ["cat", "cat", "dog"]
    cond = tiny_policy.encode(prompts).to(dtype=torch.float64)
    algo = PRDP(beta=1e-2)
    with torch.no_grad():
        traj = sampler.sample(tiny_policy.with_unet(unet), cond, torch.Generator().manual_seed(1), algo.reduce_log_prob)
    rollout = Rollout(traj, prompts, torch.tensor([0, 0, 1]), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    assert rollout.trainable_steps.tolist() == [1, 2]
    ctx = SGDContext(tiny_policy, unet, sampler, algo, tbs=2, accum=1, lr=0.0)
    ctx.reference_policy = lambda: tiny_policy.with_unet(reference)
    got = Runner._reference_log_probs(None, ctx, rollout)
    with torch.no_grad():
        want = [
            algo.reduce_log_prob(
                sampler.step(
                    tiny_policy.with_unet(reference), traj.latents[:, j], t, cond, prev_sample=traj.latents[:, j + 1]
                ).log_prob
            )
            for j, t in enumerate(traj.timesteps)
        ]
    assert got.shape == traj.log_probs.shape
    for j in (1, 2):
        assert (got[:, j] - traj.log_probs[:, j]).abs().max() > 1e-6  # pi_ref is not pi_old
        torch.testing.assert_close(got[:, j], want[j], rtol=1e-10, atol=1e-10)
    assert not got[:, [0, 3]].any()


# --------------------------------------------------------------------------- two passes vs autograd
def test_two_pass_gradient_equals_full_autograd_on_a_tiny_model(family):
    """In float64 (denoiser, embeddings and every step), so that the two computations, which differ only in
    summation order, agree to float64 rounding: 1e-10 relative. On the UNet with DDIM and on SD3 with the
    flow SDE."""
    torch.manual_seed(0)
    policy, make_sampler = family
    unet = copy.deepcopy(policy.unet).double().train()
    reference = copy.deepcopy(policy.unet).double().eval().requires_grad_(False)
    with torch.no_grad():  # the reference is "pretrained": a different set of weights
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sampler = make_sampler(3)
    prompts = ["cat"] * 3 + ["dog"] * 3
    cond = policy.encode(prompts).to(dtype=torch.float64)
    algo = PRDP(beta=1e-2, clip_range=1.0, num_inner_epochs=1)
    traj = sampler.sample(policy.with_unet(unet), cond, torch.Generator().manual_seed(1), algo.reduce_log_prob)
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    rewards = torch.tensor([0.3, 0.1, 0.3, 0.5, 0.2, 0.9], dtype=torch.float64)  # a tie in the first prompt
    rollout = Rollout(traj, prompts, group, rewards)
    steps = rollout.trainable_steps
    with torch.no_grad():
        rollout.ref_log_probs = torch.stack(
            [
                algo.reduce_log_prob(
                    sampler.step(
                        policy.with_unet(reference), traj.latents[:, j], t, cond, prev_sample=traj.latents[:, j + 1]
                    ).log_prob
                )
                for j, t in enumerate(traj.timesteps)
            ],
            dim=1,
        )
    # a dry run of one step tells how far the values move, so that eps clips some steps and not others
    theta0 = copy.deepcopy(unet.state_dict())
    dry = SGDContext(policy, unet, sampler, algo, tbs=2, accum=3, lr=1e-4)
    algo.update(rollout, dry)
    with torch.no_grad():
        moved = (dry.log_probs(rollout, steps) - rollout.log_probs[:, steps]).abs()
    unet.load_state_dict(theta0)
    # halfway between the two middle values: no step sits on the clip boundary, where a last-bit
    # difference in summation order would flip it between clipped and not
    middle = moved.flatten().sort().values[len(moved.flatten()) // 2 - 1 :][:2]
    algo.clip_range = float(middle.mean())
    assert 0 < algo.clip_range < 1, algo.clip_range

    algo.num_inner_epochs = 2
    ctx = SGDContext(policy, unet, sampler, algo, tbs=2, accum=3, lr=1e-4)
    metrics = algo.update(rollout, ctx)
    assert metrics["train/optimizer_steps"] == 2 and 0 < metrics["train/clipfrac"] < 1
    params = [p for p in unet.parameters() if p.requires_grad]
    old, ref = rollout.log_probs[:, steps], rollout.ref_log_probs[:, steps]
    for k in range(2):  # at theta_0 (= theta_old) and at theta_1 (after one step, some steps clipped)
        with torch.no_grad():
            for p, v in zip(params, ctx.params_before[k]):
                p.copy_(v)
        loss = prdp_loss(ctx.log_probs(rollout, steps), old, ref, rewards, group, algo.beta, algo.clip_range)
        expected = torch.autograd.grad(loss, params)
        got = torch.cat([g.flatten() for g in ctx.grads[k]])
        want = torch.cat([g.flatten() for g in expected])
        assert got.dtype == torch.float64
        assert (got - want).norm() <= 1e-10 * want.norm(), ((got - want).norm(), want.norm())


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("kind", ["unet", "sd3", "flux"])
def test_reference_policy_stays_fixed_while_the_policy_moves(request, kind, finetune):
    """A pipeline loaded from a local directory (model.path): after optimizer steps, log pi_ref of a
    sampled trajectory is bit-identical (adapters off for LoRA, a frozen copy for full) and log pi is not.
    The tiny SD UNet with DDIM, and the tiny SD3 and FLUX with the flow SDE (LoRA on every one of
    Flow-GRPO's targets for each, only the adapters trainable)."""
    from rlft.flow_sampling import FlowSDE
    from rlft.flux import FLUX_LORA_TARGETS, FluxPolicy
    from rlft.models import DiffusionPolicy
    from rlft.sd3 import SD3_LORA_TARGETS, SD3Policy

    torch.manual_seed(0)
    if kind == "unet":
        policy = DiffusionPolicy.from_pretrained(str(request.getfixturevalue("tiny_path")), finetune=finetune)
        sampler = DDIM(3, eta=1.0, guidance_scale=5.0).setup(policy.scheduler_config)
    else:
        cls, targets, w = (SD3Policy, SD3_LORA_TARGETS, 4.5) if kind == "sd3" else (FluxPolicy, FLUX_LORA_TARGETS, 1.0)
        path = str(request.getfixturevalue(f"tiny_{kind}_path"))
        policy = cls.from_pretrained(
            path, finetune=finetune, lora_rank=4, lora_target_modules=list(targets), max_sequence_length=16
        )
        sampler = FlowSDE(3, guidance_scale=w).setup(policy.scheduler_config)
        if finetune == "lora":  # e.g. SD3's block 1 of 2 is context-pre-only: no to_add_out there, but in block 0
            names = [n for n, _ in policy.unet.named_modules() if n.endswith(".lora_A")]
            assert all(any(f".{target}.lora_A" in n for n in names) for target in targets), names
            assert all(p.requires_grad == ("lora_" in n) for n, p in policy.unet.named_parameters())
    policy.keep_reference()
    cond = policy.encode(["cat", "dog"])
    reduce = PRDP().reduce_log_prob
    traj = sampler.sample(policy, cond, torch.Generator().manual_seed(0), reduce)

    def log_probs(model):  # first step of both samples  [B]
        step = sampler.step(model, traj.latents[:, 0], traj.timesteps[0], cond, prev_sample=traj.latents[:, 1])
        return reduce(step.log_prob)

    with torch.no_grad():
        ref_before = log_probs(policy.reference_policy())
        policy_before = log_probs(policy)
    assert torch.allclose(policy_before, ref_before)  # before training, pi_theta = pi_ref
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        (-log_probs(policy).mean()).backward()
        optimizer.step()
    with torch.no_grad():
        ref_after = log_probs(policy.reference_policy())
        policy_after = log_probs(policy)
    assert torch.equal(ref_before, ref_after)
    assert (policy_after - policy_before).abs().max() > 1e-4, policy_after - policy_before  # float noise: 1e-7
