"""Stage `report`: one self-contained HTML page (report/index.html) that a researcher opens after a run.

Figures are drawn with matplotlib (Agg, no pyplot state) and embedded as base64 PNGs; there is no
external CSS or JS. Sections: PM score shift, win rate and response length per trait (held-out and
adversarial), PPO curves and time per phase, PM calibration, label quality of the self-ranking, the
data funnel, sample transcripts and a table of eval/summary.json. The eval stage is required; every
other input is optional and a missing one renders a "not available" note. The figure and table
builders take plain dicts and lists so they can be tested without a run directory.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import posixpath
import time
import uuid

import pyarrow.fs as pafs

from character.config import Config
from character.runtime import StageResult, Timer, skip_or_reset
from character.store import StageOutput, require_complete

STAGE = "report"
SPLITS = ("held_out", "adversarial")
TABLE_FIELDS = ("pm_base.mean", "pm_trained.mean", "pm_delta.mean", "pm_delta.lo", "pm_delta.hi",
                "win_rate.mean", "win_rate.lo", "win_rate.hi", "length_base.mean", "length_trained.mean",
                "length_change.mean")
TIME_KEYS = ("time_generation", "time_scoring", "time_training", "time_sync")
log = logging.getLogger("character")


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


def ppo_curves_figure(records: list[dict]):
    """reward / kl / entropy / response_length vs iteration; eval_reward points on the reward panel."""
    it = [r for r in records if "reward" in r]
    ev = [r for r in records if r.get("eval_reward") is not None]
    fig, axes = _figure(11, 6.5, ncols=2, nrows=2)
    for ax, key in zip(axes, ("reward", "kl", "entropy", "response_length")):
        ax.plot([r["iteration"] for r in it], [_num(r.get(key)) for r in it], marker=".", label=key)
        if key == "reward" and ev:
            ax.plot([r["iteration"] for r in ev], [_num(r["eval_reward"]) for r in ev], "o", color="C3",
                    label="eval_reward")
        for r in records:
            if r.get("resumed_from") is not None:
                ax.axvline(r["resumed_from"], color="grey", ls=":", lw=1)
        ax.set_xlabel("iteration")
        ax.set_title(key)
        ax.legend(fontsize=8)
    return fig


def ppo_time_figure(records: list[dict]):
    """Stacked seconds per iteration: generation / scoring / training / weight sync."""
    it = [r for r in records if any(k in r for k in TIME_KEYS)]
    fig, (ax,) = _figure(_width(len(it)), 3.6)
    xs = [r["iteration"] for r in it]
    bottom = [0.0] * len(it)
    for key in TIME_KEYS:
        vals = [v if math.isfinite(v) else 0.0 for v in (_num(r.get(key)) for r in it)]
        ax.bar(xs, vals, 0.8, bottom=bottom, label=key.removeprefix("time_"))
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


def message_examples_html(stats: dict | None) -> str:
    """The synthesis keep rate and examples of kept messages (per trait) and dropped ones (per reason, with
    the model's whole reply), from messages/stats.json."""
    if not stats or "examples_kept" not in stats:
        return ""
    esc = html.escape
    kept = "".join(f"<tr><td>{esc(trait)}</td><td>{esc(x['kind'])}</td><td class='text'>{esc(x['text'])}</td></tr>"
                   for trait, xs in sorted(stats["examples_kept"].items()) for x in xs)
    dropped = "".join(f"<tr><td>{esc(reason)}</td><td>{esc(x['trait'])}</td><td class='text'>{esc(x.get('reply') or x['text'])}"
                      f"</td></tr>" for reason, xs in sorted(stats.get("examples_dropped", {}).items()) for x in xs)
    rate = stats.get("keep_rate")
    return (f"<p id='keep-rate'>Synthesised messages kept: {stats.get('generated_kept')} of {stats.get('generated')} "
            f"(keep rate {fmt(rate)}).</p>"
            f"<h3>Kept (examples)</h3><table id='kept-examples'><tr><th>trait</th><th>kind</th><th>message</th></tr>"
            f"{kept}</table><h3>Set aside (examples, the model's whole reply)</h3><table id='dropped-examples'>"
            f"<tr><th>reason</th><th>trait</th><th>reply</th></tr>{dropped}</table>")


def numbers_html(pairs: list[tuple[str, object]]) -> str:
    def show(v) -> str:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else fmt(v)

    return "<dl class='nums'>" + "".join(
        f"<dt>{html.escape(k)}</dt><dd data-metric='{html.escape(k)}'>{show(v)}</dd>" for k, v in pairs) + "</dl>"


def summary_table_html(summary: dict) -> str:
    """One row per group (then the overall rows), cells `data-key="<group>.<field>"` with 4 decimals."""
    rows = [(k, g) for k, g in sorted((summary.get("groups") or {}).items())]
    rows += [(f"overall/{s}", g) for s, g in sorted((summary.get("overall") or {}).items())]
    head = "".join(f"<th>{html.escape(f)}</th>" for f in ("group", "n_messages", *TABLE_FIELDS))
    body = []
    for key, g in rows:
        cells = "".join(f'<td data-key="{html.escape(f"{key}.{f}")}">{fmt(dig(g, f))}</td>' for f in TABLE_FIELDS)
        body.append(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(g.get('n_messages', '')))}</td>{cells}</tr>")
    return f'<table id="summary-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def transcripts_html(rows: list[dict], n: int = 2) -> str:
    """Up to n messages per (trait, split): prompt, then base and trained sample 0 side by side."""
    by_msg: dict[tuple, dict] = {}
    for r in rows:
        if r.get("sample", 0) == 0:
            by_msg.setdefault((r["trait"], r["split"], r["message_id"]), {})[r["model"]] = r
    chosen: dict[tuple, list] = {}
    for (trait, split, mid), models in sorted(by_msg.items()):
        if len(chosen.setdefault((trait, split), [])) < n:
            chosen[(trait, split)].append(models)
    if not chosen:
        return "<p class='na'>No transcripts available.</p>"
    esc = html.escape
    parts = []
    for (trait, split), msgs in sorted(chosen.items()):
        parts.append(f"<h3>{esc(trait)} / {esc(split)}</h3>")
        for models in msgs:
            any_row = next(iter(models.values()))
            cols = []
            for name in ("base", "trained"):
                r = models.get(name)
                if r is None:
                    cols.append(f"<div class='resp'><h4>{name}</h4><p class='na'>missing</p></div>")
                    continue
                extra = f", win prob {fmt(r.get('win_prob'))}" if name == "trained" else ""
                cols.append(f"<div class='resp'><h4>{name} (PM reward {fmt(r.get('reward'))}{extra})</h4>"
                            f"<pre>{esc(str(r.get('response', '')))}</pre></div>")
            parts.append(f"<div class='transcript'><div class='prompt'><h4>prompt</h4>"
                         f"<pre>{esc(str(any_row.get('prompt', '')))}</pre></div>"
                         f"<div class='pair'>{''.join(cols)}</div></div>")
    return "".join(parts)


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1300px;padding:0 1em;color:#222}
section{margin:2em 0;border-top:1px solid #ddd}img{max-width:100%}nav a{margin-right:1em}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
.na{color:#888;font-style:italic}dl.nums{display:grid;grid-template-columns:max-content max-content;gap:2px 12px}
dd{margin:0;font-family:monospace}.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em;margin:0}.transcript{margin:1em 0}h4{margin:.3em 0}
td.text{text-align:left}"""


def build_html(inputs: dict, n: int = 2) -> tuple[str, int]:
    """inputs: summary, eval_rows, ppo (list|None), pm (dict|None), preferences, messages, responses
    (dict|None). Returns the page and the number of figures in it."""
    summary, groups = inputs["summary"], (inputs["summary"].get("groups") or {})
    sections, figures = [], 0

    def section(sid: str, title: str, fig_id: str | None, make, extra: str = "", missing: str | None = None):
        nonlocal figures
        body = ""
        if missing:
            body = f"<p class='na'>{html.escape(title)}: not available ({html.escape(missing)}).</p>"
        else:
            if fig_id:
                fig = make()
                body = f'<img id="{fig_id}" alt="{html.escape(title)}" src="{png_data_uri(fig)}">'
                figures += 1
            body += extra
        sections.append((sid, title, f'<section id="{sid}"><h2>{html.escape(title)}</h2>{body}</section>'))

    no_groups = None if groups else "eval/summary.json has no groups"
    section("score-shift", "PM score before vs after", "fig-score-shift",
            lambda: paired_bars_figure(groups, "pm_base", "pm_trained", "PM reward"), missing=no_groups)
    section("win-rate", "Win rate of trained over base", "fig-win-rate", lambda: win_rate_figure(groups),
            missing=no_groups)
    section("length", "Response length (words)", "fig-length",
            lambda: paired_bars_figure(groups, "length_base", "length_trained", "words"), missing=no_groups)
    ppo = inputs.get("ppo")
    has_it = bool(ppo) and any("reward" in r for r in ppo)
    section("ppo-curves", "PPO curves", "fig-ppo-curves", lambda: ppo_curves_figure(ppo),
            missing=None if has_it else "no policy/metrics.jsonl")
    section("ppo-time", "PPO time per iteration", "fig-ppo-time", lambda: ppo_time_figure(ppo),
            missing=None if has_it else "no policy/metrics.jsonl")
    pm = inputs.get("pm")
    section("pm-calibration", "Preference model (held out)", "fig-pm-calibration", lambda: pm_calibration_figure(pm),
            numbers_html([(k, (pm or {}).get(k)) for k in ("eval_accuracy", "eval_loss", "eval_mean_margin",
                                                            "eval_pairs")]),
            missing=None if pm else "no pm/metrics.json")
    pref = inputs.get("preferences")
    judge = str((pref or {}).get("judge", ""))
    note = ("<p>The judge is a contrast judge (log p(answer | trait) &minus; log p(answer | no trait)): it scores "
            "each answer once, so order consistency is 1 and position bias 0.5 by construction.</p>"
            if judge.startswith("contrast:") else "")
    section("ranking", "Self-ranking label quality", "fig-ranking", lambda: ranking_figure(pref),
            f"<p>judge: <code>{html.escape(judge)}</code></p>" + note +
            numbers_html([(k, (pref or {}).get(k)) for k in ("order_consistency", "position_bias_mean_p_first",
                                                              "comparisons")]),
            missing=None if pref else "no preferences/stats.json")
    stats = (inputs.get("messages"), inputs.get("responses"), pref)
    section("funnel", "Data funnel", "fig-funnel", lambda: funnel_figure(*stats),
            message_examples_html(inputs.get("messages")),
            missing=None if any(stats) else "no messages/responses/preferences stats.json")
    section("transcripts", "Sample transcripts", None, None, transcripts_html(inputs.get("eval_rows") or [], n))
    section("summary", "Numbers (eval/summary.json)", None, None, summary_table_html(summary))

    esc = html.escape
    meta = "<p>" + " &middot; ".join(
        f"{k}: <code>{esc(str(summary.get(k)))}</code>" for k in ("base_model", "trained_model", "judge", "samples")
    ) + f" &middot; generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"
    nav = "<nav>" + "".join(f"<a href='#{sid}'>{esc(title)}</a>" for sid, title, _ in sections) + "</nav>"
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>character report</title>"
            f"<style>{CSS}</style></head><body><h1>Character training report</h1>{meta}{nav}"
            + "".join(s for _, _, s in sections) + "</body></html>")
    return page, figures


def _read_text(output_dir: str, stage: str, name: str) -> str | None:
    out = StageOutput(output_dir, stage)
    fs, root = out._fs()
    try:
        with fs.open_input_stream(posixpath.join(root, name)) as f:
            return f.read().decode("utf-8")
    except (FileNotFoundError, OSError):
        return None


def _read_json(output_dir: str, stage: str, name: str) -> dict | None:
    try:
        return json.loads(_read_text(output_dir, stage, name) or "null")
    except ValueError:
        log.warning("[report] %s/%s is not valid JSON: section left out", stage, name)
        return None


def read_ppo_metrics(text: str | None) -> list[dict] | None:
    """Parse metrics.jsonl (skipping a torn last line); one record per iteration, the last one wins."""
    if not text:
        return None
    by_it: dict[int, dict] = {}
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "iteration" in rec:
            by_it[int(rec["iteration"])] = rec
    return [by_it[k] for k in sorted(by_it)] or None


def _write_atomic(out: StageOutput, name: str, text: str) -> str:
    fs, root = out._fs()
    out.ensure()
    tmp, final = posixpath.join(root, f".tmp-{uuid.uuid4().hex}-{name}"), posixpath.join(root, name)
    if isinstance(fs, pafs.LocalFileSystem):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, final)
    else:
        with fs.open_output_stream(tmp) as sink:
            sink.write(text.encode("utf-8"))
        fs.move(tmp, final)
    return final


def run(config: Config, force: bool = False, n: int = 2) -> StageResult:
    import pyarrow.compute as pc

    output_dir = config.run.output_dir
    out = StageOutput(output_dir, STAGE)
    if (skipped := skip_or_reset(out, force)) is not None:
        return skipped
    evaluation = StageOutput(output_dir, "eval")
    require_complete(evaluation, STAGE)
    result = StageResult(STAGE, out.uri)
    with Timer() as timer:
        table = evaluation.read()
        result.rows_in = table.num_rows
        if "sample" in table.column_names:
            table = table.filter(pc.equal(table.column("sample"), 0))
        inputs = {
            "summary": evaluation.read_json("summary.json"),
            "eval_rows": table.to_pylist(),
            "ppo": read_ppo_metrics(_read_text(output_dir, "policy", "metrics.jsonl")),
            "pm": _read_json(output_dir, "pm", "metrics.json"),
            "preferences": _read_json(output_dir, "preferences", "stats.json"),
            "messages": _read_json(output_dir, "messages", "stats.json"),
            "responses": _read_json(output_dir, "responses", "stats.json"),
        }
        page, result.rows_out = build_html(inputs, n)
        path = _write_atomic(out, "index.html", page)
    result.seconds = timer.seconds
    result.extra = {"figures": result.rows_out, "report": path}
    out.mark_success(result.summary())
    print(f"[report] {result.rows_out} figures -> {path}", flush=True)
    return result
