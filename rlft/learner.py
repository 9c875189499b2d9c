"""The training context of an update (``rlft.algorithms.base.TrainContext``): whole steps, in row batches.

An algorithm asks for the policy's step at (sample, step) pairs, *rows*: for each
row the sampler step x_j -> x_{j+1} of the rollout is recomputed under the
current weights (or pi_ref), giving the reduced log-prob, the step's mean and
its std (rlft/sampling.py ``StepOutput``). However many rows an algorithm asks
for, they go through the denoiser in calls of at most ``trainer.rows_per_call``
rows (x2 with classifier-free guidance): a small model runs faster in few large
calls, Stable Diffusion on a GPU keeps its memory in small ones. With gradients
(:meth:`Learner.backward_rows`), each call's loss is backpropagated before the
next call, so only one call's activations are alive; the gradient of the summed
loss is the same for any row budget, up to the order of floating-point sums.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from rlft.errors import check_interrupted
from rlft.policy import Policy
from rlft.sampling import Sampler, StepOutput


@dataclass
class Rows:
    """(sample, step) pairs of a rollout: ``index`` [n] and ``step`` [n] (sampler step j: x_j -> x_{j+1})."""

    index: Tensor
    step: Tensor

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, part) -> Rows:
        return Rows(self.index[part], self.step[part])

    @staticmethod
    def of(index: Tensor, steps: Tensor) -> Rows:
        """Samples ``index`` [b] at their steps ``steps`` [b, k] (row i of ``steps`` is sample i's), step-major:
        the first b rows are every sample's first step, so a budget of b rows is one step per call."""
        b, k = steps.shape
        return Rows(index.repeat(k), steps.T.flatten())

    @staticmethod
    def unflatten(values: Tensor, b: int) -> Tensor:
        """Per-row values of :meth:`of`'s rows back to [b, k, ...]."""
        return values.view(-1, b, *values.shape[1:]).transpose(0, 1)


def _cat(outputs: list[StepOutput]) -> StepOutput:
    fields = ("prev_sample", "log_prob", "mean", "std")
    return StepOutput(*(torch.cat([getattr(o, f) for o in outputs]) for f in fields))


class Learner:
    """A TrainContext over a policy and its sampler; ``backward`` and ``optimizer_step`` are the caller's
    (accelerate's in the runner, plain torch in tests)."""

    def __init__(
        self,
        policy: Policy,
        sampler: Sampler,
        reduce: Callable[[Tensor], Tensor],
        *,
        train_batch_size: int,
        gradient_accumulation_steps: int,
        rows_per_call: int | None,
        generator: torch.Generator,
        sample_generator: Callable[..., torch.Generator],
        backward: Callable[[Tensor, bool], None],
        optimizer_step: Callable[[], float],
        autocast=None,
    ):
        self.policy, self.sampler, self.reduce = policy, sampler, reduce
        self.train_batch_size = train_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.rows_per_call = rows_per_call or train_batch_size  # default: one step of a micro-batch per call
        self.generator = generator
        self._sample_generator = sample_generator
        self._backward, self._optimizer_step = backward, optimizer_step
        self.autocast = autocast or nullcontext
        self._reference = None

    def sample_generator(self, *key: int) -> torch.Generator:
        return self._sample_generator(*key)

    def _calls(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.rows_per_call, n)) for i in range(0, n, self.rows_per_call)]

    def _step(self, policy: Policy, rollout, rows: Rows) -> StepOutput:
        check_interrupted()
        traj = rollout.trajectory
        device = traj.latents.device
        with self.autocast():
            out = self.sampler.step(
                policy,
                traj.latents[rows.index, rows.step],
                traj.timesteps[rows.step].to(device),
                traj.cond[rows.index.to(traj.cond.device)],
                prev_sample=traj.latents[rows.index, rows.step + 1],
            )
        return StepOutput(out.prev_sample, self.reduce(out.log_prob), out.mean, out.std)

    def reference_policy(self) -> Policy:
        if self._reference is None:
            self._reference = self.policy.reference_policy()
        return self._reference

    @torch.no_grad()
    def steps(self, rollout, rows: Rows, reference: bool = False) -> StepOutput:
        """The step at each row under the current weights (or pi_ref), without gradients  [n, ...]."""
        policy = self.reference_policy() if reference else self.policy
        return _cat([self._step(policy, rollout, rows[part]) for part in self._calls(len(rows))])

    def backward_rows(self, rollout, rows: Rows, loss: Callable[[StepOutput, slice], Tensor], sync: bool = True):
        """For each call of rows: the step with gradients, ``loss(step, part)`` (``part`` the call's slice of
        ``rows``), its backward; returns every row's step, detached  [n, ...]. ``sync=False`` skips the
        cross-process gradient reduction (accumulating)."""
        outputs, parts = [], self._calls(len(rows))
        for c, part in enumerate(parts):
            out = self._step(self.policy, rollout, rows[part])
            self.backward(loss(out, part), sync=sync and c == len(parts) - 1)
            outputs.append(StepOutput(*(v.detach() for v in (out.prev_sample, out.log_prob, out.mean, out.std))))
        return _cat(outputs)

    def backward(self, loss: Tensor, sync: bool = True) -> None:
        self._backward(loss, sync)

    def step(self) -> float:
        """Clip the gradient norm, optimizer.step(), zero_grad(); returns the pre-clip norm."""
        return self._optimizer_step()
