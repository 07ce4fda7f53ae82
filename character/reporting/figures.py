"""Figures of the report (matplotlib, Agg, no pyplot state), as functions of plain dicts and lists so they
can be tested without a run directory; `png_data_uri` embeds one in a page. Used by the report stage."""
from __future__ import annotations

import base64
import io
import math

SPLITS = ("held_out", "adversarial")
TIME_KEYS = ("time_generation", "time_scoring", "time_training", "time_sync")


def _num(v) -> float:
    """A finite-or-NaN float from anything (None and non-numbers become NaN)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def fmt(v) -> str:
    """Numbers as printed everywhere in the report: exactly 4 decimals; missing ones as n/a."""
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a"


def dig(d: dict | None, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _figure(w: float, h: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _width(n: int) -> float:
    return min(24.0, max(6.0, 0.55 * n + 2.5))


def _traits(groups: dict) -> list[str]:
    return sorted({g.get("trait", k.split("/")[0]) for k, g in groups.items()})


def _by_split(groups: dict, split: str) -> dict[str, dict]:
    return {g.get("trait", k.split("/")[0]): g for k, g in groups.items() if g.get("split", k.split("/")[-1]) == split}


def _err(stats: list[dict | None], key: str = "mean") -> tuple[list[float], list[list[float]]]:
    """Means and asymmetric error bars (NaN-safe) from {mean, lo, hi} dicts."""
    means = [_num((s or {}).get(key)) for s in stats]
    half = [[_num((s or {}).get("lo")), _num((s or {}).get("hi"))] for s in stats]

    def ok(x: float) -> float:
        return x if math.isfinite(x) and x > 0 else 0.0
    return means, [[ok(m - h[0]) for m, h in zip(means, half)], [ok(h[1] - m) for m, h in zip(means, half)]]


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _split_panels(groups: dict, height: float, draw):
    """One panel per split over the same trait axis; draw(ax, traits, {trait: group}) fills it."""
    traits = _traits(groups)
    fig, axes = _figure(_width(len(traits)), height * len(SPLITS), nrows=len(SPLITS))
    for ax, split in zip(axes, SPLITS):
        by = _by_split(groups, split)
        if not by:
            _no_data(ax, f"{split}: no data")
            continue
        draw(ax, traits, by)
        ax.set_xticks(range(len(traits)), traits, rotation=30, ha="right")
        ax.set_title(split)
        ax.legend(fontsize=8)
    return fig


def paired_bars_figure(groups: dict, field_a: str, field_b: str, ylabel: str, labels=("base", "trained")):
    """Per-trait bars of two fields (e.g. pm_base / pm_trained) with CI error bars, one panel per split."""
    def draw(ax, traits, by):
        for off, field, label, color in ((-0.2, field_a, labels[0], "#8c8c8c"), (0.2, field_b, labels[1], "#1f77b4")):
            means, err = _err([by.get(t, {}).get(field) for t in traits])
            ax.bar([x + off for x in range(len(traits))], means, 0.4, yerr=err, capsize=3, label=label, color=color)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_ylabel(ylabel)
    return _split_panels(groups, 3.6, draw)


def win_rate_figure(groups: dict):
    """Per-trait soft win rate of trained over base with CI and a 0.5 reference line, one panel per split."""
    def draw(ax, traits, by):
        means, err = _err([by.get(t, {}).get("win_rate") for t in traits])
        ax.bar(range(len(traits)), means, 0.6, yerr=err, capsize=3, color="#2ca02c")
        ax.axhline(0.5, color="red", ls="--", lw=1, label="0.5 (no preference)")
        ax.set_ylim(0, 1)
        ax.set_ylabel("P(trained better)")
    return _split_panels(groups, 3.4, draw)


PPO_PANELS = ("reward", "kl", "entropy", "response_length")


def _draw_ppo_curves(axes, records: list[dict], label: str | None = None, color: str | None = None) -> None:
    """One run's PPO curves on the four PPO_PANELS axes; `label`/`color` name the run when several share them."""
    it = [r for r in records if "reward" in r]
    ev = [r for r in records if r.get("eval_reward") is not None]
    for ax, key in zip(axes, PPO_PANELS):
        ax.plot([r["iteration"] for r in it], [_num(r.get(key)) for r in it], marker=".", color=color,
                label=label or key)
        if key == "reward" and ev:
            ax.plot([r["iteration"] for r in ev], [_num(r["eval_reward"]) for r in ev], "o", color=color or "C3",
                    mfc="none" if label else None, label=f"{label}: eval_reward" if label else "eval_reward")
        for r in records:
            if r.get("resumed_from") is not None:
                ax.axvline(r["resumed_from"], color=color or "grey", ls=":", lw=1)


def _ppo_axes(fig_axes) -> None:
    for ax, key in zip(fig_axes, PPO_PANELS):
        ax.set_xlabel("iteration")
        ax.set_title(key)
        ax.legend(fontsize=8)


def ppo_curves_figure(records: list[dict]):
    """reward / kl / entropy / response_length vs iteration; eval_reward points on the reward panel."""
    fig, axes = _figure(11, 6.5, ncols=2, nrows=2)
    _draw_ppo_curves(axes, records)
    _ppo_axes(axes)
    return fig


def ppo_curves_overlay_figure(runs: dict[str, list[dict]]):
    """The PPO curves of several runs overlaid, one colour per run (`character compare`)."""
    fig, axes = _figure(11, 6.5, ncols=2, nrows=2)
    for i, (label, records) in enumerate(runs.items()):
        _draw_ppo_curves(axes, records, label, f"C{i}")
    _ppo_axes(axes)
    return fig


def win_rate_comparison_figure(runs: dict[str, dict]):
    """Per-trait soft win rates with CIs of several runs side by side (runs: label -> eval summary groups), one
    panel per split."""
    traits = sorted({t for groups in runs.values() for t in _traits(groups)})
    fig, axes = _figure(_width(len(traits) * max(1, len(runs)) // 2 + 1), 3.4 * len(SPLITS), nrows=len(SPLITS))
    width = 0.8 / max(1, len(runs))
    for ax, split in zip(axes, SPLITS):
        for i, (label, groups) in enumerate(runs.items()):
            by = _by_split(groups, split)
            means, err = _err([by.get(t, {}).get("win_rate") for t in traits])
            ax.bar([x - 0.4 + width * (i + 0.5) for x in range(len(traits))], means, width, yerr=err, capsize=2,
                   color=f"C{i}", label=label)
        ax.axhline(0.5, color="red", ls="--", lw=1)
        ax.set_ylim(0, 1)
        ax.set_xticks(range(len(traits)), traits, rotation=30, ha="right", fontsize=8)
        ax.set_title(split)
        ax.set_ylabel("P(trained better)")
        ax.legend(fontsize=8)
    return fig


def ppo_time_figure(records: list[dict]):
    """Stacked seconds per iteration of the trainers: waiting for rollouts / scoring / training / weight sync.
    The wait is `trainer_idle_s` where logged: with ppo.async generation overlaps training, so its own seconds
    (time_generation) are not part of the iteration's; without it the wait is generation. Older runs: generation."""
    it = [r for r in records if any(k in r for k in TIME_KEYS)]
    fig, (ax,) = _figure(_width(len(it)), 3.6)
    xs = [r["iteration"] for r in it]
    bottom = [0.0] * len(it)
    waits = any("trainer_idle_s" in r for r in it)
    for key in (("trainer_idle_s", *TIME_KEYS[1:]) if waits else TIME_KEYS):
        vals = [v if math.isfinite(v) else 0.0 for v in (_num(r.get(key)) for r in it)]
        label = "waiting for rollouts" if key == "trainer_idle_s" else key.removeprefix("time_")
        ax.bar(xs, vals, 0.8, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("iteration")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    return fig


def pm_calibration_figure(metrics: dict):
    """Accuracy per confidence bucket (diagonal = perfectly calibrated) and per-trait accuracy."""
    fig, (a1, a2) = _figure(11, 3.8, ncols=2)
    buckets = [b for b in metrics.get("calibration") or [] if b.get("n")]
    if buckets:
        centres = [(b["lo"] + b["hi"]) / 2 for b in buckets]
        a1.bar(centres, [_num(b.get("accuracy")) for b in buckets], [b["hi"] - b["lo"] for b in buckets],
               edgecolor="white", color="#9467bd")
        for c, b in zip(centres, buckets):
            a1.annotate(f"n={b['n']}", (c, 0.02), ha="center", fontsize=7, rotation=90)
        a1.plot([0.5, 1], [0.5, 1], "k--", lw=1, label="calibrated")
        a1.set_xlim(0.5, 1)
        a1.set_ylim(0, 1)
        a1.legend(fontsize=8)
    else:
        _no_data(a1)
    a1.set_xlabel("confidence sigma(|r_chosen - r_rejected|)")
    a1.set_ylabel("held-out accuracy")
    a1.set_title("calibration")
    per = metrics.get("per_trait_accuracy") or {}
    if per:
        a2.bar(range(len(per)), [_num(v) for v in per.values()], color="#9467bd")
        a2.set_xticks(range(len(per)), list(per), rotation=30, ha="right")
        a2.axhline(0.5, color="red", ls="--", lw=1)
        a2.set_ylim(0, 1)
    else:
        _no_data(a2)
    a2.set_title("held-out accuracy per trait")
    return fig


def ranking_figure(stats: dict):
    """Histogram of soft labels P(chosen better)."""
    hist = stats.get("label_histogram") or {}
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    fig, (ax,) = _figure(6.5, 3.4)
    if counts and len(edges) == len(counts) + 1:
        ax.bar(edges[:-1], counts, [b - a for a, b in zip(edges, edges[1:])], align="edge", edgecolor="white")
        ax.set_xlabel("soft label")
        ax.set_ylabel("pairs")
    else:
        _no_data(ax)
    ax.set_title("label histogram")
    return fig


def funnel_figure(messages: dict | None, responses: dict | None, preferences: dict | None):
    """Rows surviving each step (left) and the reasons rows were set aside (right)."""
    steps, drops = [], []
    if messages:
        steps += [("messages requested", messages.get("requested")), ("messages generated", messages.get("rows_in")),
                  ("messages kept", messages.get("rows_out"))]
        drops += [(f"messages: {k}", v) for k, v in (messages.get("drops") or {}).items()]
    if responses:
        steps += [("responses in", responses.get("rows_in")), ("responses kept", responses.get("rows_out"))]
        drops += [(f"responses: {k}", v) for k, v in (responses.get("drops") or {}).items()]
    if preferences:
        steps.append(("preference pairs", sum((preferences.get("pairs_per_trait") or {}).values())))
        drops += [(f"preferences: {k}", v) for k, v in (preferences.get("drops") or {}).items()]
    steps = [(k, v) for k, v in steps if isinstance(v, (int, float))]
    fig, (a1, a2) = _figure(12, max(3.0, 0.35 * max(len(steps), len(drops)) + 1.2), ncols=2)
    for ax, items, title, color in ((a1, steps, "funnel", "#1f77b4"), (a2, drops, "set aside", "#d62728")):
        if items:
            ax.barh(range(len(items)), [v for _, v in items], color=color)
            ax.set_yticks(range(len(items)), [k for k, _ in items], fontsize=8)
            ax.invert_yaxis()
            for y, (_, v) in enumerate(items):
                ax.annotate(str(v), (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        else:
            _no_data(ax, "nothing set aside" if ax is a2 else "no data")
        ax.set_title(title)
    return fig


def interference_figure(matrix: dict[str, dict[str, dict]]):
    """Heat-map of the trait-score shift of each trait (rows) on each trait's held-out messages (columns),
    trained minus base; each cell shows the mean, and a star where its interval excludes zero."""
    measured = sorted(matrix)
    columns = sorted({j for row in matrix.values() for j in row})
    values = [[_num(dig(matrix, f"{i}.{j}.mean")) for j in columns] for i in measured]
    fig, (ax,) = _figure(max(4.5, 1.1 * len(columns) + 2.5), max(3.2, 0.7 * len(measured) + 1.6))
    finite = [abs(v) for row in values for v in row if not math.isnan(v)]
    span = max(finite) if finite and max(finite) > 0 else 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")
    for a, i in enumerate(measured):
        for b, j in enumerate(columns):
            stat = matrix[i].get(j) or {}
            lo, hi = _num(stat.get("lo")), _num(stat.get("hi"))
            star = "*" if (lo > 0 or hi < 0) else ""
            ax.text(b, a, "n/a" if math.isnan(values[a][b]) else f"{values[a][b]:+.3f}{star}", ha="center",
                    va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(measured)), measured, fontsize=8)
    ax.set_xlabel("messages of trait")
    ax.set_ylabel("trait score measured")
    fig.colorbar(image, ax=ax, label="trait-score shift (* interval excludes 0)")
    return fig
