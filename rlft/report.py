"""`python -m rlft.report <multirun dir>`: compare methods from the runs' local files, no W&B account.

Reads every run under the directory (a folder holding ``metrics.jsonl`` and Hydra's
``.hydra/overrides.yaml``), groups the runs by the overrides in which they differ, seeds aside
(one group per method, e.g. ``algorithm=prdp``), and writes next to them:

* ``report.md``: per group, seeds, sampled images, each evaluation set's reward at the first and
  the last evaluation and the training reward over the last third of the epochs, each as the mean
  over seeds ± the half-width of its 95% t confidence interval (rlft/stats.py: mean ± t_{S-1,0.975}
  std / sqrt(S)); then the *paired* differences to the baseline group (``--baseline``, default the
  first): for every seed both groups ran, d_s = last_s(group) - last_s(baseline), and mean_s d_s ±
  its 95% CI. A difference whose interval holds 0 is inside the noise, and the table says so.
* ``report.json``: the same numbers, machine-readable.
* held-out rewards (``eval_rewards``), drift and diversity (rlft/evaluation.py): per group and set,
  each held-out reward's gain from the first to the last evaluation and the last drift and
  diversity, over seeds with their 95% CI; and the *flagged* runs, whose training reward rose on a
  set (paired gain > 0) while a held-out reward fell by more than its 95% interval over prompts
  (gain < -1.96 SE): a run that may be hacking its reward.
* ``report.png``: per evaluation set, the reward against epochs; the training reward against
  sampled images; loss, approx KL, clip fraction and gradient norm against epochs; each
  evaluation sub-score the reward reports; and the "hacking frontier": the training reward on each
  set against each held-out reward and against drift, one point per evaluation. Each group's mean
  over seeds is a line, its 95% CI shaded (error bars on the frontier).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from rlft.stats import t_interval

IGNORED = ("seed=", "run_name=", "resume=", "logger=", "paths.", "trainer.progress_bar=")
TRAIN_PANELS = ("train/loss", "train/approx_kl", "train/clipfrac", "train/grad_norm")


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


def seed_of(run: Path, default: int) -> int:
    return int((hydra_file(run, "config") or {}).get("seed", default))


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


def sub_scores(rows: list[dict]) -> list[str]:
    """Names of the evaluation sub-scores in a run's metrics (eval/<set>/reward/<part>/mean)."""
    parts = []
    for r in rows:
        for key in r:
            bits = key.split("/")
            if len(bits) == 5 and bits[0] == "eval" and bits[2] == "reward" and bits[4] == "mean":
                if bits[3] not in parts:
                    parts.append(bits[3])
    return parts


def held_out_rewards(rows: list[dict]) -> list[str]:
    """Names of the held-out rewards in a run's metrics (eval/<set>/<name>/mean)."""
    names = []
    for r in rows:
        for key in r:
            bits = key.split("/")
            if len(bits) == 4 and bits[0] == "eval" and bits[3] == "mean" and bits[2] != "reward":
                if bits[2] not in names:
                    names.append(bits[2])
    return names


# a reward "rose" (or "fell") when its paired gain over prompts is above +Z95 (below -Z95) standard errors
Z95 = 1.959964


def hacking_flags(label: str, seed: int, rows: list[dict]) -> list[dict]:
    """The sets on which this run's training reward rose (paired gain since the first evaluation above
    its 95% interval) while a held-out reward fell by more than its 95% interval, at the run's last
    evaluation. A gain inside the noise flags nothing: neither a rise nor a fall is shown."""
    flags = []
    for s in eval_sets(rows):
        last = next((r for r in reversed(rows) if f"eval/{s}/reward/gain" in r), None)
        if last is None:
            continue
        rose, rose_se = last[f"eval/{s}/reward/gain"], last.get(f"eval/{s}/reward/gain_se", math.nan)
        if not rose > Z95 * rose_se:  # a missing or NaN standard error flags nothing
            continue
        for h in held_out_rewards(rows):
            gain, se = last.get(f"eval/{s}/{h}/gain"), last.get(f"eval/{s}/{h}/gain_se")
            if gain is not None and se is not None and gain < -Z95 * se:
                flags.append(
                    {
                        "group": label,
                        "seed": seed,
                        "set": s,
                        "epoch": last.get("epoch"),
                        "reward_gain": last[f"eval/{s}/reward/gain"],
                        "reward_gain_se": rose_se,
                        "held_out": h,
                        "held_out_gain": gain,
                        "held_out_gain_se": se,
                    }
                )
    return flags


def series(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if key in r and r[key] is not None]


def last_third(rows: list[dict], key: str = "reward/mean") -> float:
    values = series(rows, key)
    if not values:
        return math.nan
    tail = values[-max(1, len(values) // 3) :]
    return sum(tail) / len(tail)


def _ci(values: list[float]) -> dict:
    mean, half, n = t_interval(values)
    return {"mean": mean, "ci95": half, "n": n}


def _cell(stat: dict) -> str:
    if stat["n"] == 0:
        return "-"
    if math.isnan(stat["ci95"]):
        return f"{stat['mean']:.4f} (1 seed)"
    return f"{stat['mean']:.4f} ± {stat['ci95']:.4f}"


Run = tuple[int, list[dict]]  # (seed, metrics rows)


def summarise(groups: dict[str, list[Run]], images: dict[str, float], baseline: str) -> dict:
    """Every number of the report (see the module docstring)."""
    sets = sorted({s for runs in groups.values() for _, rows in runs for s in eval_sets(rows)})
    out: dict = {"sets": sets, "baseline": baseline, "groups": {}, "differences": {}}
    for label, runs in groups.items():
        g = {"seeds": sorted(seed for seed, _ in runs), "images": images[label]}
        for s in sets:
            key = f"eval/{s}/reward/mean"
            evals = [series(rows, key) for _, rows in runs]
            g[f"{s}/first"] = _ci([e[0] for e in evals if e])
            g[f"{s}/last"] = _ci([e[-1] for e in evals if e])
            g[f"{s}/gain"] = _ci([e[-1] - e[0] for e in evals if len(e) > 1])
        g["train/last_third"] = _ci([v for _, rows in runs if not math.isnan(v := last_third(rows))])
        held = list(dict.fromkeys(h for _, rows in runs for h in held_out_rewards(rows)))
        g["held_out"] = held
        for s in sets:
            for h in held:
                evals = [series(rows, f"eval/{s}/{h}/mean") for _, rows in runs]
                g[f"{s}/{h}/gain"] = _ci([e[-1] - e[0] for e in evals if len(e) > 1])
            for what in ("drift/rmse", "drift/clip", "diversity/rmse", "diversity/clip"):
                values = [series(rows, f"eval/{s}/{what}/mean") for _, rows in runs]
                if any(values):
                    g[f"{s}/{what}"] = _ci([v[-1] for v in values if v])
        out["groups"][label] = g
    out["flags"] = [
        f for label, runs in groups.items() for seed, rows in runs for f in hacking_flags(label, seed, rows)
    ]
    base = {seed: rows for seed, rows in groups.get(baseline, [])}
    for label, runs in groups.items():
        if label == baseline:
            continue
        diff = {}
        for s in sets:
            key = f"eval/{s}/reward/mean"
            pairs = [(series(rows, key), series(base.get(seed, []), key)) for seed, rows in runs]
            d = [mine[-1] - theirs[-1] for mine, theirs in pairs if mine and theirs]  # a set both evaluated
            diff[s] = {**_ci(d), "per_seed": d}
        out["differences"][label] = diff
    return out


def markdown(summary: dict) -> str:
    sets, lines = summary["sets"], []
    head = ["method", "seeds", "images"]
    for s in sets:
        head += [f"{s}: first", f"{s}: last", f"{s}: gain"]
    head.append("train reward, last third")
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, g in summary["groups"].items():
        cells = [label, str(len(g["seeds"])), f"{g['images']:.0f}"]
        for s in sets:
            cells += [_cell(g[f"{s}/first"]), _cell(g[f"{s}/last"]), _cell(g[f"{s}/gain"])]
        cells.append(_cell(g["train/last_third"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nMean over seeds ± half-width of the 95% t confidence interval.")
    if summary["differences"]:
        lines += [
            f"\n## Paired differences to `{summary['baseline']}` (last evaluation, per seed)\n",
            "| method | " + " | ".join(f"{s}: difference" for s in sets) + " |",
            "|" + " --- |" * (len(sets) + 1),
        ]
        for label, diff in summary["differences"].items():
            cells = [label]
            for s in sets:
                d = diff[s]
                verdict = ""
                if d["n"] >= 2 and not math.isnan(d["ci95"]):
                    verdict = " (inside the noise)" if abs(d["mean"]) <= d["ci95"] else " (resolved)"
                cells.append(_cell(d) + (f", {d['n']} seeds" if d["n"] > 1 else "") + verdict)
            lines.append("| " + " | ".join(cells) + " |")
    lines += _hacking_markdown(summary)
    return "\n".join(lines) + "\n"


def _hacking_markdown(summary: dict) -> list[str]:
    groups = summary["groups"]
    held = list(dict.fromkeys(h for g in groups.values() for h in g.get("held_out", [])))
    measures = [
        w
        for w in ("drift/rmse", "drift/clip", "diversity/rmse", "diversity/clip")
        if any(f"{s}/{w}" in g for g in groups.values() for s in summary["sets"])
    ]
    if not held and not measures:
        return []
    lines = ["\n## Held-out rewards, drift and diversity\n"]
    head = ["method", "set", "reward: gain"] + [f"{h}: gain" for h in held] + [f"{w} (last)" for w in measures]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    empty = {"mean": math.nan, "ci95": math.nan, "n": 0}
    for label, g in groups.items():
        for s in summary["sets"]:
            cells = [label, s, _cell(g[f"{s}/gain"])]
            cells += [_cell(g.get(f"{s}/{h}/gain", empty)) for h in held]
            cells += [_cell(g.get(f"{s}/{w}", empty)) for w in measures]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "\nGains from the first to the last evaluation; drift: distance from the first evaluation's images "
        "(same prompts and noise); diversity: mean distance between a prompt's images (rlft/evaluation.py)."
    )
    flags = summary.get("flags", [])
    if flags:
        lines.append(
            "\n**Flagged runs** (training reward rose and a held-out reward fell, each beyond its 95% interval):\n"
        )
        for f in flags:
            lines.append(
                f"- `{f['group']}` seed {f['seed']}, {f['set']} at epoch {f['epoch']}: reward "
                f"{f['reward_gain']:+.4f} ± {f['reward_gain_se']:.4f} SE, {f['held_out']} "
                f"{f['held_out_gain']:+.4f} ± {f['held_out_gain_se']:.4f} SE (paired over prompts)"
            )
    elif held:
        lines.append("\nNo run raised its training reward while a held-out reward fell beyond its 95% interval.")
    return lines


def _band(ax, xs_per_run: list[list[float]], ys_per_run: list[list[float]], label: str, style: str = "-") -> None:
    ys_per_run = [y for y in ys_per_run if y]
    if not ys_per_run:
        return
    n = min(len(y) for y in ys_per_run)
    xs = [x for x in xs_per_run if x][0][:n]
    stats = [t_interval(list(column)) for column in zip(*[y[:n] for y in ys_per_run])]
    mean = [m for m, _, _ in stats]
    line = ax.plot(xs, mean, style, marker="o", markersize=3, label=label)[0]
    if len(ys_per_run) > 1:
        lo = [m - h for m, h, _ in stats]
        hi = [m + h for m, h, _ in stats]
        ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())


def _frontier(ax, runs_rows: list[list[dict]], x_key: str, y_key: str, label: str) -> None:
    """One point per evaluation: the mean over seeds of the training reward (x) and of ``y_key`` (y),
    each with its 95% CI as an error bar; the line runs from the first evaluation to the last."""
    pairs = [
        [(r[x_key], r[y_key]) for r in rows if r.get(x_key) is not None and r.get(y_key) is not None]
        for rows in runs_rows
    ]
    pairs = [p for p in pairs if p]
    if not pairs:
        return
    n = min(len(p) for p in pairs)
    xs = [t_interval([p[i][0] for p in pairs]) for i in range(n)]
    ys = [t_interval([p[i][1] for p in pairs]) for i in range(n)]
    bars = lambda stats: [0.0 if math.isnan(h) else h for _, h, _ in stats]  # noqa: E731
    ax.errorbar(
        [m for m, _, _ in xs],
        [m for m, _, _ in ys],
        xerr=bars(xs),
        yerr=bars(ys),
        marker="o",
        markersize=3,
        capsize=2,
        label=label,
    )


FRONTIER_FILE = "frontier.png"


def run_frontier(run: Path) -> Path | None:
    """One run's hacking frontier, ``<run>/frontier.png``: per evaluation set, the training reward
    against each held-out reward and against drift, one point per evaluation (epochs marked).
    None when the run has neither."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(run)
    sets, held = eval_sets(rows), held_out_rewards(rows)
    panels = [(s, f"eval/{s}/{h}/mean") for s in sets for h in held]
    panels += [(s, f"eval/{s}/drift/rmse/mean") for s in sets if series(rows, f"eval/{s}/drift/rmse/mean")]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (s, y_key) in zip(axes.flat, panels):
        x_key = f"eval/{s}/reward/mean"
        _frontier(ax, [rows], x_key, y_key, run.name)
        for r in rows:
            if r.get(x_key) is not None and r.get(y_key) is not None:
                ax.annotate(
                    str(r["epoch"]), (r[x_key], r[y_key]), fontsize=6, xytext=(2, 2), textcoords="offset points"
                )
        ax.set_title(f"{s}: {y_key.split('/', 2)[2].removesuffix('/mean')}", fontsize=9)
        ax.set_xlabel("training reward")
    fig.suptitle("hacking frontier: each point one evaluation (epoch marked)", fontsize=9)
    fig.tight_layout()
    out = run / FRONTIER_FILE
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot(groups: dict[str, list[Run]], samples_per_epoch: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows = [rows for runs in groups.values() for _, rows in runs]
    sets = sorted({s for rows in all_rows for s in eval_sets(rows)})
    parts = list(dict.fromkeys(p for rows in all_rows for p in sub_scores(rows)))
    train = [k for k in TRAIN_PANELS if any(series(rows, k) for rows in all_rows)]
    panels = [("eval", s) for s in sets] + [("train_reward", None)] + [("train", k) for k in train]
    first_part = len(panels)
    panels += [("part", p) for p in parts]
    held = list(dict.fromkeys(h for rows in all_rows for h in held_out_rewards(rows)))
    panels += [("frontier", (s, f"eval/{s}/{h}/mean")) for s in sets for h in held]
    panels += [
        ("frontier", (s, f"eval/{s}/drift/rmse/mean"))
        for s in sets
        if any(series(rows, f"eval/{s}/drift/rmse/mean") for rows in all_rows)
    ]
    cols = min(4, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.4 * rows_n), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (kind, what) in zip(axes.flat, panels):
        for label, runs in groups.items():
            runs_rows = [rows for _, rows in runs]
            if kind == "frontier":
                _frontier(ax, runs_rows, f"eval/{what[0]}/reward/mean", what[1], label)
                continue
            if kind == "train_reward":
                per = samples_per_epoch[label]
                xs = [[r["epoch"] * per for r in rows if "reward/mean" in r] for rows in runs_rows]
                _band(ax, xs, [series(rows, "reward/mean") for rows in runs_rows], label)
                continue
            keys = {"eval": [f"eval/{what}/reward/mean"], "train": [what]}.get(kind)
            if kind == "part":
                keys = [f"eval/{s}/reward/{what}/mean" for s in sets]
            for key, style in zip(keys, styles):
                xs = [[r["epoch"] for r in rows if key in r and r[key] is not None] for rows in runs_rows]
                name = f"{label} [{key.split('/')[1]}]" if kind == "part" else label
                _band(ax, xs, [series(rows, key) for rows in runs_rows], name, style)
        if kind == "frontier":
            ax.set_title(f"frontier on {what[0]}: {what[1].split('/', 2)[2].removesuffix('/mean')}", fontsize=9)
            ax.set_xlabel(f"eval/{what[0]}: training reward")
            continue
        title = {"eval": f"eval/{what}: reward", "train_reward": "training reward", "train": what}.get(kind)
        ax.set_title(title or f"eval sub-score: {what}", fontsize=9)
        ax.set_xlabel("sampled images" if kind == "train_reward" else "epoch")
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    if parts:
        axes.flat[first_part].legend(fontsize=6)
    fig.suptitle("mean over seeds, 95% confidence interval shaded", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def samples_per_epoch_of(run: Path) -> float:
    """Global images per epoch, from the run's resolved config."""
    t = (hydra_file(run, "config") or {}).get("trainer", {})
    return float(t.get("prompts_per_epoch", 0) * t.get("images_per_prompt", 0))


def report(root: Path, baseline: str | None = None) -> tuple[Path, Path]:
    runs = find_runs(root)
    if not runs:
        raise SystemExit(f"rlft.report: error: no run (a folder with metrics.jsonl) under {root}")
    overrides = {run: overrides_of(run) for run in runs}
    common = set.intersection(*(set(o) for o in overrides.values()))  # shared by every run: not a method
    groups: dict[str, list[Run]] = defaultdict(list)
    samples: dict[str, float] = {}
    for i, run in enumerate(runs):
        label = " ".join(o for o in overrides[run] if o not in common) or "defaults"
        groups[label].append((seed_of(run, i), read_rows(run)))
        samples[label] = samples_per_epoch_of(run)
    groups = dict(sorted(groups.items()))
    if baseline is None:
        baseline = next(iter(groups))
    elif baseline not in groups:
        matches = [g for g in groups if baseline in g]
        if len(matches) != 1:
            raise SystemExit(f"rlft.report: error: --baseline '{baseline}' names none of {sorted(groups)} uniquely")
        baseline = matches[0]
    images = {k: v * _epochs(groups[k]) for k, v in samples.items()}
    summary = summarise(groups, images, baseline)
    md, png = root / "report.md", root / "report.png"
    shared = " ".join(o for o in next(iter(overrides.values())) if o in common) or "(none)"
    md.write_text(
        f"# Comparison of {len(runs)} runs in {root.name}\n\nShared overrides: `{shared}`\n\n"
        f"![reward curves](report.png)\n\n{markdown(summary)}"
    )
    (root / "report.json").write_text(json.dumps(_no_nan(summary), indent=1) + "\n")
    plot(groups, samples, png)
    return md, png


def _no_nan(value):
    """JSON has no NaN: an interval of one seed is written as null."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _epochs(runs: list[Run]) -> int:
    return max((r.get("epoch", 0) for _, rows in runs for r in rows), default=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="a multirun directory (or any folder of runs)")
    parser.add_argument("--baseline", help="the group the others are compared with (default: the first)")
    args = parser.parse_args(argv)
    md, png = report(args.directory, args.baseline)
    sys.stdout.write(md.read_text())
    print(f"\nwrote {md}, {md.with_suffix('.json')} and {png}")


if __name__ == "__main__":
    main()
