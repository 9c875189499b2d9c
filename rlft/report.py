"""`python -m rlft.report <multirun dir>`: compare methods from the runs' local files, no W&B account.

Reads every run under the directory (a folder holding ``metrics.jsonl`` and Hydra's
``.hydra/overrides.yaml``), groups the runs by the overrides in which they differ, seeds aside
(one group per method, e.g. ``algorithm=prdp``), and writes next to them:

* ``report.png``: per evaluation set, the reward against epochs; and the training reward against
  sampled images; each group's mean over seeds as a line, its spread (min to max) shaded;
* ``report.md``: one row per group: seeds, sampled images, and each evaluation set's reward at
  the first and last evaluation (mean ± std over seeds), and the training reward over the last
  third of the epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

IGNORED = ("seed=", "run_name=", "resume=", "logger=", "paths.", "trainer.progress_bar=")


def find_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("metrics.jsonl"))


def hydra_file(run: Path, name: str):
    """The run's ``.hydra/<name>.yaml`` (overrides, config), or None where the run has none."""
    path = run / ".hydra" / f"{name}.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def overrides_of(run: Path) -> list[str]:
    """The run's overrides that are not seeds or bookkeeping."""
    overrides = hydra_file(run, "overrides")
    if overrides is None:
        return [run.name]
    return [o for o in overrides if not o.lstrip("+~").startswith(IGNORED)]


def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def eval_sets(rows: list[dict]) -> list[str]:
    names = []
    for r in rows:
        for key in r:
            if key.startswith("eval/") and key.endswith("/reward/mean") and key.count("/") == 3:
                name = key.split("/")[1]
                if name not in names:
                    names.append(name)
    return names


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def summarise(groups: dict[str, list[list[dict]]], samples_per_epoch: dict[str, float]) -> str:
    sets = sorted({s for runs in groups.values() for rows in runs for s in eval_sets(rows)})
    head = ["method", "seeds", "images"]
    for s in sets:
        head += [f"{s}: first", f"{s}: last"]
    head.append("train reward, last third")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, runs in groups.items():
        cells = [label, str(len(runs)), f"{samples_per_epoch[label]:.0f}"]
        for s in sets:
            key = f"eval/{s}/reward/mean"
            evals = [[r[key] for r in rows if key in r] for rows in runs]
            cells.append(_mean_std([e[0] for e in evals if e]))
            cells.append(_mean_std([e[-1] for e in evals if e]))
        thirds = []
        for rows in runs:
            train = [r["reward/mean"] for r in rows if "reward/mean" in r]
            if train:
                tail = train[-max(1, len(train) // 3) :]
                thirds.append(sum(tail) / len(tail))
        cells.append(_mean_std(thirds))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _band(ax, xs_per_run: list[list[float]], ys_per_run: list[list[float]], label: str) -> None:
    n = min(len(y) for y in ys_per_run)
    if n == 0:
        return
    xs = xs_per_run[0][:n]
    columns = list(zip(*[y[:n] for y in ys_per_run]))
    mean = [statistics.fmean(c) for c in columns]
    line = ax.plot(xs, mean, marker="o", markersize=3, label=label)[0]
    if len(ys_per_run) > 1:
        ax.fill_between(xs, [min(c) for c in columns], [max(c) for c in columns], alpha=0.2, color=line.get_color())


def plot(groups: dict[str, list[list[dict]]], samples_per_epoch: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({s for runs in groups.values() for rows in runs for s in eval_sets(rows)})
    panels = len(sets) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6), squeeze=False)
    for ax, s in zip(axes[0], sets):
        key = f"eval/{s}/reward/mean"
        for label, runs in groups.items():
            xs = [[r["epoch"] for r in rows if key in r] for rows in runs]
            ys = [[r[key] for r in rows if key in r] for rows in runs]
            _band(ax, xs, ys, label)
        ax.set_title(f"eval/{s}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("reward")
    ax = axes[0][-1]
    for label, runs in groups.items():
        per = samples_per_epoch[label]
        xs = [[r["epoch"] * per for r in rows if "reward/mean" in r] for rows in runs]
        ys = [[r["reward/mean"] for r in rows if "reward/mean" in r] for rows in runs]
        _band(ax, xs, ys, label)
    ax.set_title("training reward")
    ax.set_xlabel("sampled images")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def samples_per_epoch_of(run: Path) -> float:
    """Global images per epoch, from the run's resolved config."""
    t = (hydra_file(run, "config") or {}).get("trainer", {})
    return float(t.get("prompts_per_epoch", 0) * t.get("images_per_prompt", 0))


def report(root: Path) -> tuple[Path, Path]:
    runs = find_runs(root)
    if not runs:
        raise SystemExit(f"rlft.report: error: no run (a folder with metrics.jsonl) under {root}")
    overrides = {run: overrides_of(run) for run in runs}
    common = set.intersection(*(set(o) for o in overrides.values()))  # shared by every run: not a method
    groups: dict[str, list[list[dict]]] = defaultdict(list)
    samples: dict[str, float] = {}
    for run in runs:
        label = " ".join(o for o in overrides[run] if o not in common) or "defaults"
        groups[label].append(read_rows(run))
        samples[label] = samples_per_epoch_of(run)
    groups = dict(sorted(groups.items()))
    table = summarise(groups, {k: v * _epochs(groups[k]) for k, v in samples.items()})
    md, png = root / "report.md", root / "report.png"
    shared = " ".join(o for o in next(iter(overrides.values())) if o in common) or "(none)"
    md.write_text(
        f"# Comparison of {len(runs)} runs in {root.name}\n\nShared overrides: `{shared}`\n\n"
        f"![reward curves](report.png)\n\n{table}"
    )
    plot(groups, samples, png)
    return md, png


def _epochs(runs: list[list[dict]]) -> int:
    return max((r.get("epoch", 0) for rows in runs for r in rows), default=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="a multirun directory (or any folder of runs)")
    args = parser.parse_args(argv)
    md, png = report(args.directory)
    sys.stdout.write(md.read_text())
    print(f"\nwrote {md} and {png}")


if __name__ == "__main__":
    main()
