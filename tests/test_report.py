"""A tiny multirun over the three algorithms, then `python -m rlft.report` on its directory."""

from __future__ import annotations

import sys

from tests.conftest import run_cli, run_process

TINY_TOY = [
    "trainer.epochs=2",
    "trainer.eval_every=2",
    "sampler.num_steps=4",
    "sampler.batch_size=4",
    "trainer.prompts_per_epoch=2",
    "trainer.images_per_prompt=2",
    "trainer.train_batch_size=2",
    "trainer.eval_num_prompts=2",
    "trainer.eval_images_per_prompt=1",
    "trainer.checkpoint_every=0",
    "trainer.log_images=0",
]


def test_multirun_over_three_algorithms_and_the_report(cache_dir, tmp_path):
    sweep = tmp_path / "multi"
    result = run_cli(["-m", "algorithm=ddpo,prdp,pxpo", "seed=0,1", f"hydra.sweep.dir={sweep}", *TINY_TOY], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    done = run_process([sys.executable, "-m", "rlft.report", str(sweep)], cache_dir, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (sweep / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| algorithm=")]
    assert [r.split(" | ")[0] for r in rows] == ["| algorithm=ddpo", "| algorithm=prdp", "| algorithm=pxpo"]
    assert all(r.split(" | ")[1] == "2" for r in rows)  # two seeds each
    assert "seen: last" in table and "unseen: last" in table
    png = (sweep / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_on_a_folder_without_runs_says_so(cache_dir, tmp_path):
    done = run_process([sys.executable, "-m", "rlft.report", str(tmp_path)], cache_dir, timeout=120)
    assert done.returncode != 0 and "no run (a folder with metrics.jsonl)" in done.stderr
