"""README "Extend rlft", run exactly as written: its files (each block's first line names the file)
and its commands, in a fresh directory outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO, read_metrics, subprocess_env, timeout_s, too_slow


def _section_blocks() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Extend rlft\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def test_the_readme_extension_example_runs_as_written(cache_dir, tmp_path):
    blocks = _section_blocks()
    commands = []
    for lang, body in blocks:
        if lang == "bash":
            commands += [line for line in body.splitlines() if line.strip() and not line.startswith("#")]
            continue
        name, _, content = body.partition("\n")
        path = tmp_path / name.removeprefix("# ").strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "my_prompts.txt",
        "my_rlft.py",
        "redness.yaml",
    ]
    assert len(commands) == 2
    env = subprocess_env(cache_dir, {"PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"})
    for command in commands:
        try:
            result = subprocess.run(
                ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout_s(300)
            )
        except subprocess.TimeoutExpired:
            too_slow(["bash", "-c", command], timeout_s(300))
        assert result.returncode == 0, (command, result.stderr[-3000:])
        assert "results: metrics" in result.stdout
    by_class = read_metrics(tmp_path / "outputs" / "prdp-custom-toy-seed0")
    by_option = read_metrics(tmp_path / "outputs" / "custom-redness-toy-seed0")
    assert [r["epoch"] for r in by_class] == [1, 2] and [r["epoch"] for r in by_option] == [1, 2]
    assert all("reward/mean" in r and "train/loss" in r for r in by_class + by_option)
    # the sampler of my_rlft.py ran: its eta falls to 0 at the last of its 10 steps, so 9 were trained
    assert all(r["train/trained_steps"] == 9 for r in by_option)
