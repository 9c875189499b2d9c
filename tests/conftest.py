"""Shared fixtures: a tiny random SD pipeline built once per session, and a CLI runner.

Kernel and thread choices, to check that no result depends on them:
    RLFT_TEST_MKLDNN=0 make test   (or pytest --mkldnn=off): torch's oneDNN kernels off, here and in
                                   every process the tests start
    OMP_NUM_THREADS=1 make test    one thread (the default here too, as under `make test`: the
                                   learning tests' figures were measured with one thread per process)
    ATEN_CPU_CAPABILITY=avx2 make test   another CPU's vector kernels (avx512, avx2, default)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on now, for a test's `accelerate launch --main_process_port` (the
    default 29500 may be taken by another test file running beside it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_addoption(parser):
    parser.addoption(
        "--mkldnn",
        choices=["on", "off"],
        default="off" if os.environ.get("RLFT_TEST_MKLDNN") == "0" else "on",
        help="torch.backends.mkldnn.enabled in the tests and their subprocesses (env: RLFT_TEST_MKLDNN=0)",
    )


def pytest_configure(config):
    if config.getoption("--mkldnn") == "off":
        torch.backends.mkldnn.enabled = False
        os.environ["RLFT_TEST_MKLDNN"] = "0"  # for subprocesses: tests/site/sitecustomize.py


def pytest_report_header(config):
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN {config.getoption('--mkldnn')}"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = Path(os.environ.get("RLFT_CACHE") or tmp_path_factory.mktemp("rlft_cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_path(cache_dir) -> Path:
    from rlft.models import build_tiny_random, ensure_built

    return ensure_built(cache_dir / "tiny_random_v1", build_tiny_random)  # model=tiny_random's path


@pytest.fixture(scope="session")
def tiny_policy(tiny_path):
    from rlft.models import DiffusionPolicy

    torch.manual_seed(0)
    return DiffusionPolicy.from_pretrained(str(tiny_path), finetune="full")


@pytest.fixture(scope="session")
def tiny_sd3_path(cache_dir) -> Path:
    from rlft.models import ensure_built
    from rlft.sd3 import build_tiny_random_sd3

    return ensure_built(cache_dir / "tiny_random_sd3_v1", build_tiny_random_sd3)  # model=tiny_random_sd3's path


@pytest.fixture(scope="session")
def tiny_sd3_policy(tiny_sd3_path):
    from rlft.sd3 import SD3Policy

    torch.manual_seed(0)
    return SD3Policy.from_pretrained(str(tiny_sd3_path), finetune="full", max_sequence_length=16)


@pytest.fixture(scope="session")
def tiny_flux_path(cache_dir) -> Path:
    from rlft.flux import build_tiny_random_flux
    from rlft.models import ensure_built

    return ensure_built(cache_dir / "tiny_random_flux_v1", build_tiny_random_flux)  # model=tiny_random_flux's path


@pytest.fixture(scope="session")
def tiny_flux_policy(tiny_flux_path):
    from rlft.flux import FluxPolicy

    torch.manual_seed(0)
    return FluxPolicy.from_pretrained(str(tiny_flux_path), finetune="full", max_sequence_length=16, resolution=32)


@pytest.fixture(params=["unet", "sd3", "flux"])
def family(request):
    """(policy, sampler(num_steps)) of each model family: the tiny SD UNet with DDIM (eta 1), the tiny SD3
    with the flow SDE (a 0.7, CFG 4.5), the tiny FLUX with the flow SDE (its distilled guidance, no CFG
    batch); the algorithms' identities hold on all three."""
    from rlft.flow_sampling import FlowSDE
    from rlft.sampling import DDIM

    if request.param == "unet":
        policy = request.getfixturevalue("tiny_policy")
        return policy, lambda n: DDIM(n, eta=1.0, guidance_scale=5.0).setup(policy.scheduler_config)
    policy = request.getfixturevalue(f"tiny_{request.param}_policy")
    w = 4.5 if request.param == "sd3" else 1.0
    return policy, lambda n: FlowSDE(n, noise_level=0.7, guidance_scale=w).setup(policy.scheduler_config)


# Subprocess time limits scale with RLFT_TEST_TIMEOUT_SCALE (default 3: generous for a loaded 2-core
# machine); a test fails on wrong results, and on a slow machine only with a line that says so.
TIMEOUT_SCALE = float(os.environ.get("RLFT_TEST_TIMEOUT_SCALE", "3"))


def timeout_s(base: float) -> float:
    """``base`` seconds (the time the step takes on an idle 2-core machine, with room) x the scale."""
    return base * TIMEOUT_SCALE


def too_slow(cmd: list[str], limit: float):
    """Fail the test with one line: the subprocess outlived its limit (nothing was wrong with its result)."""
    shown = " ".join(c for c in cmd if not c.startswith("/"))[:120]
    pytest.fail(
        f"`{shown}` did not finish within {limit:.3g} s: this machine is too slow or too loaded for the "
        f"test's time limit; raise RLFT_TEST_TIMEOUT_SCALE (now {TIMEOUT_SCALE:g}) to allow more",
        pytrace=False,
    )


def subprocess_env(cache_dir: Path, env: dict | None = None) -> dict:
    """The environment of every process a test starts: offline, the test cache, and this repo (plus
    tests/site, whose sitecustomize applies the run's --mkldnn=off) on PYTHONPATH."""
    return {
        **os.environ,
        "RLFT_CACHE": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "site"), str(REPO)]),
        "HYDRA_FULL_ERROR": "0",
        **(env or {}),
    }


def run_cli(
    args: list[str], cache_dir: Path, timeout: float = 600, launcher: list[str] | None = None, env: dict | None = None
):
    """Run `python -m rlft <args>` in a subprocess (offline, no progress bars; ``env`` adds variables);
    ``timeout`` is scaled by RLFT_TEST_TIMEOUT_SCALE."""
    flags = [a for a in args if a.startswith("-") and not a.startswith("~")]  # e.g. -m (multirun) first
    overrides = [a for a in args if a not in flags]
    cmd = (launcher or [sys.executable]) + ["-m", "rlft", *flags, "trainer.progress_bar=false", *overrides]
    return run_process(cmd, cache_dir, timeout, env)


def run_process(cmd: list[str], cache_dir: Path, timeout: float = 600, env: dict | None = None):
    """``cmd`` in the test environment, with the scaled time limit and its one-line failure. A
    `python -m <module> ...` with no variables of its own runs in a child forked from this test
    process's warm start (tests/cli_server.py: rlft and its libraries imported once, ~5 s a process
    saved); anything else (a launcher, ``env``, ``python -c``) in a fresh subprocess."""
    limit = timeout_s(timeout)
    if not env and len(cmd) > 2 and cmd[:2] == [sys.executable, "-m"]:
        result = _warm_start(cache_dir).run(cmd, limit)
        if result is not None:
            return result
    else:
        try:
            return subprocess.run(
                cmd, cwd=REPO, env=subprocess_env(cache_dir, env), capture_output=True, text=True, timeout=limit
            )
        except subprocess.TimeoutExpired:
            pass
    too_slow(cmd, limit)  # outside the except block: one line, no chained traceback


class _WarmStart:
    """One tests/cli_server.py process over pipes: a case a line in, a result a line out."""

    def __init__(self, cache_dir: Path):
        self.env = subprocess_env(cache_dir)  # a later change of this process's environment starts a new one
        self.server = subprocess.Popen(
            [sys.executable, "-m", "tests.cli_server"],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._answer(timeout_s(120))  # {"ready": true} once the imports are done

    def _answer(self, limit: float) -> dict:
        import select

        ready, _, _ = select.select([self.server.stdout], [], [], limit)
        line = self.server.stdout.readline() if ready else ""
        if not line:
            self.server.kill()
            code = self.server.wait()
            raise RuntimeError(f"the tests' warm start (tests/cli_server.py) did not answer (exit status {code})")
        return json.loads(line)

    def run(self, cmd: list[str], limit: float) -> subprocess.CompletedProcess | None:
        """The result of ``cmd`` (`python -m <module> <args>`), or None when it outlived ``limit``."""
        self.server.stdin.write(json.dumps({"module": cmd[2], "args": cmd[3:], "limit": limit}) + "\n")
        self.server.stdin.flush()
        r = self._answer(limit + 60)
        return None if r["code"] == "timeout" else subprocess.CompletedProcess(cmd, r["code"], r["stdout"], r["stderr"])


_WARM: dict[Path, _WarmStart] = {}


def _warm_start(cache_dir: Path) -> _WarmStart:
    """This test process's warm start for ``cache_dir`` (made on first use; it ends with this process,
    when its stdin closes)."""
    warm = _WARM.get(cache_dir)
    if warm is None or warm.server.poll() is not None or warm.env != subprocess_env(cache_dir):
        if warm is not None:
            warm.server.kill()
            warm.server.wait()
        _WARM[cache_dir] = _WarmStart(cache_dir)
    return _WARM[cache_dir]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# the smallest real finetuning: tiny_random on JPEG compressibility, 4 prompts x 4 images, 10 DDIM steps
FAST = [
    "algorithm=ddpo",
    "model=tiny_random",
    "reward=jpeg_compressibility",
    "dataset=simple_animals",
    "~dataset@eval_datasets.unseen",  # evaluate on the training prompts only
    "sampler.num_steps=10",
    "trainer.prompts_per_epoch=4",
    "trainer.images_per_prompt=4",
    "trainer.train_batch_size=4",
    "trainer.gradient_accumulation_steps=1",
    "trainer.log_images=4",
    "model.finetune=full",
]


# Every algorithm for one epoch on a flow model (tests/test_sd3.py, tests/test_flux.py): DDPO with LoRA
# and full, PRDP, GRPO, and PXPO on toy_color's per-pixel map
EVERY_ALGORITHM = {
    "ddpo_lora": ["algorithm=ddpo", "model.finetune=lora", "model.lora_alpha=8"],
    "ddpo_full": ["algorithm=ddpo"],
    "prdp": ["algorithm=prdp"],
    "grpo": ["algorithm=grpo"],
    "pxpo": ["algorithm=pxpo", "reward=toy_color", "dataset=toy_small", "~eval_rewards.toy_alignment"],
}


# one quick epoch of a tiny flow model: 2 prompts x 4 images, 4 flow-SDE steps, the JPEG reward
FLOW_EPOCH = [
    "sampler=flow_sde", "sampler.num_steps=4", "reward=jpeg_compressibility", "dataset=simple_animals",
    "~dataset@eval_datasets.unseen", "trainer.epochs=1", "trainer.eval_every=1", "trainer.eval_num_prompts=2",
    "trainer.prompts_per_epoch=2", "trainer.images_per_prompt=4", "trainer.train_batch_size=4",
    "trainer.gradient_accumulation_steps=1", "trainer.log_images=0", "optimizer.lr=1e-2",
]  # fmt: skip


def train_every_algorithm(root: Path, model: list[str], cache_dir: Path) -> None:
    """Run EVERY_ALGORITHM through `python -m rlft` (``model``'s overrides, one FLOW_EPOCH) into
    ``root/<case>``; each must finish, take a finite step with a gradient and write its checkpoint."""
    runs = [[f"paths.output_root={root}", f"run_name={n}", *model, *FLOW_EPOCH, *a] for n, a in EVERY_ALGORITHM.items()]
    for name, r in zip(EVERY_ALGORITHM, (run_cli(args, cache_dir) for args in runs)):
        assert r.returncode == 0, (name, r.stderr[-3000:])
        train = next(row for row in read_metrics(root / name) if "train/loss" in row)
        assert train["train/grad_norm"] > 0 and math.isfinite(train["train/loss"]), (name, train)
        assert (root / name / "checkpoints" / "epoch_00001").is_dir()


def export_and_reload(
    run: Path, out: Path, cache_dir: Path, pipeline_class, base: Path, prompts, noise, guidance_scale
):
    """`python -m rlft.export <run> <out>` for a flow model's run, then (the policy and drawing settings as
    rlft.sample loads the run, the latents it draws by the Euler ODE from x_T = ``noise`` in 4 steps, the
    plain ``pipeline_class`` the export loads in: the adapter by load_lora_weights onto ``base``)."""
    from rlft.flow_sampling import FlowODE
    from rlft.sample import load_model

    done = run_process([sys.executable, "-m", "rlft.export", str(run), str(out)], cache_dir, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert pipeline_class.__name__ in done.stdout or "load_lora_weights" in done.stdout, done.stdout
    policy, settings = load_model(str(run))
    sampler = FlowODE(num_steps=4, guidance_scale=guidance_scale).setup(policy.scheduler_config)
    with torch.no_grad():
        x_T = noise[:, None].expand(-1, 5, -1, -1, -1)
        ours = sampler.sample(policy, policy.encode(prompts), x_T, lambda lp: lp.mean((1, 2, 3))).latents[:, -1]
    if policy.finetune == "lora":
        pipe = pipeline_class.from_pretrained(str(base))
        pipe.load_lora_weights(str(out))
    else:
        pipe = pipeline_class.from_pretrained(str(out))
    return policy, settings, ours, pipe
