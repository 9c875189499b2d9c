"""A tiny multirun over the three algorithms, then `python -m rlft.report` on its directory."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

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
    methods = table.split("## Paired differences")[0]
    rows = [line for line in methods.splitlines() if line.startswith("| algorithm=")]
    assert [r.split(" | ")[0] for r in rows] == ["| algorithm=ddpo", "| algorithm=prdp", "| algorithm=pxpo"]
    assert all(r.split(" | ")[1] == "2" for r in rows)  # two seeds each
    assert "seen: last" in table and "unseen: last" in table
    png = (sweep / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the numbers, by hand from the runs' own metrics: 95% t intervals over the 2 seeds (t_{1, 0.975})
    last, held, drift = {}, {}, {}
    for run in sweep.glob("*/metrics.jsonl"):
        overrides = yaml.safe_load((run.parent / ".hydra" / "overrides.yaml").read_text())
        algorithm = next(o.split("=")[1] for o in overrides if o.startswith("algorithm="))
        seed = int(next(o.split("=")[1] for o in overrides if o.startswith("seed=")))
        rows = [json.loads(line) for line in run.read_text().splitlines()]
        last[algorithm, seed] = [r["eval/seen/reward/mean"] for r in rows if "eval/seen/reward/mean" in r][-1]
        # the held-out reward (toy_color, which the default toy run holds out) and the drift
        color = [r["eval/seen/toy_color/mean"] for r in rows if "eval/seen/toy_color/mean" in r]
        held[algorithm, seed] = color[-1] - color[0]
        drift[algorithm, seed] = [r["eval/seen/drift/rmse/mean"] for r in rows if "eval/seen/drift/rmse/mean" in r][-1]
    t = 12.706204736
    summary = json.loads((sweep / "report.json").read_text())
    for algorithm in ("ddpo", "prdp", "pxpo"):
        a, b = last[algorithm, 0], last[algorithm, 1]
        cell = summary["groups"][f"algorithm={algorithm}"]["seen/last"]
        assert cell["n"] == 2 and cell["mean"] == pytest.approx((a + b) / 2, abs=1e-12)
        assert cell["ci95"] == pytest.approx(t * abs(a - b) / 2, rel=1e-6)
        assert f"{(a + b) / 2:.4f} ± {t * abs(a - b) / 2:.4f}" in rows_of(methods, algorithm)
        for key, values in (("seen/toy_color/gain", held), ("seen/drift/rmse", drift)):
            a, b = values[algorithm, 0], values[algorithm, 1]
            cell = summary["groups"][f"algorithm={algorithm}"][key]
            assert cell["n"] == 2 and cell["mean"] == pytest.approx((a + b) / 2, abs=1e-12), key
            assert cell["ci95"] == pytest.approx(t * abs(a - b) / 2, rel=1e-6), key
    assert summary["baseline"] == "algorithm=ddpo"
    for algorithm in ("prdp", "pxpo"):
        d = [last[algorithm, s] - last["ddpo", s] for s in (0, 1)]
        diff = summary["differences"][f"algorithm={algorithm}"]["seen"]
        assert diff["per_seed"] == pytest.approx(d, abs=1e-12) and diff["n"] == 2
        assert diff["mean"] == pytest.approx(sum(d) / 2) and diff["ci95"] == pytest.approx(t * abs(d[0] - d[1]) / 2)
    assert "## Paired differences to `algorithm=ddpo`" in table
    # DDPO's and PRDP's toy recipes add the rewording sets, which PXPO does not evaluate: no pair, no difference
    assert summary["groups"]["algorithm=prdp"]["rephrased/last"]["n"] == 2
    assert summary["differences"]["algorithm=prdp"]["rephrased"]["n"] == 2
    assert summary["groups"]["algorithm=pxpo"]["rephrased/last"]["n"] == 0
    unpaired = summary["differences"]["algorithm=pxpo"]["rephrased"]
    assert unpaired["n"] == 0 and unpaired["per_seed"] == [] and unpaired["mean"] is None  # NaN in JSON


def rows_of(table: str, algorithm: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"| algorithm={algorithm} |"))


def test_report_on_a_folder_without_runs_says_so(cache_dir, tmp_path):
    done = run_process([sys.executable, "-m", "rlft.report", str(tmp_path)], cache_dir, timeout=120)
    assert done.returncode != 0 and "no run (a folder with metrics.jsonl)" in done.stderr


def test_hacking_flags_need_a_rise_and_a_fall_beyond_their_intervals():
    from rlft.report import hacking_flags

    def rows(gain, se, held, held_se):
        first = {"epoch": 0, "eval/seen/reward/mean": 0.5, "eval/seen/hpsv2/mean": 0.3}
        last = {"epoch": 8, "eval/seen/reward/mean": 0.5 + gain, "eval/seen/reward/gain": gain}
        last |= {"eval/seen/reward/gain_se": se, "eval/seen/hpsv2/mean": 0.3 + held}
        last |= {"eval/seen/hpsv2/gain": held, "eval/seen/hpsv2/gain_se": held_se}
        return [first, last]

    # rose by 4 SE, held-out fell by 3 SE: flagged, with the figures
    (flag,) = hacking_flags("algorithm=ddpo", 0, rows(0.04, 0.01, -0.03, 0.01))
    assert flag == {
        "group": "algorithm=ddpo",
        "seed": 0,
        "set": "seen",
        "epoch": 8,
        "reward_gain": 0.04,
        "reward_gain_se": 0.01,
        "held_out": "hpsv2",
        "held_out_gain": -0.03,
        "held_out_gain_se": 0.01,
    }
    # a fall inside its interval (1.9 SE), a rise inside its interval (1.9 SE) or no rise: no flag
    assert hacking_flags("g", 0, rows(0.04, 0.01, -0.019, 0.01)) == []
    assert hacking_flags("g", 0, rows(0.019, 0.01, -0.03, 0.01)) == []
    assert hacking_flags("g", 0, rows(-0.04, 0.01, -0.03, 0.01)) == []
