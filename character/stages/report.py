"""Stage `report`: one self-contained HTML page (report/index.html) that a researcher opens after a run.

Figures (character/reporting/figures.py, matplotlib) are embedded as base64 PNGs; there is no external CSS or JS.
Sections: the headline (per trait: trait score, probe and win-rate shifts with verdicts; capability, identical
answers, KL), the trait score before and after, the trait-interference heat-map, the PM (or DPO implicit reward)
score shift, win rate and response length per trait (held-out and adversarial), PPO curves and time per phase, PM
calibration, label quality of the self-ranking, the data funnel with the synthesis keep rate and examples of kept
and dropped messages, sample transcripts and a table of eval/summary.json. The eval stage is required; every
other input is optional and a missing one renders a "not available" note. The figure and table
builders take plain dicts and lists so they can be tested without a run directory.
"""
from __future__ import annotations

import html
import time

from character.core.config import Config
from character.core.store import StageOutput
from character.execution.registry import spec_of
from character.execution.runtime import StageResult
from character.execution.stage_run import run_stage
from character.reporting.figures import (dig, fmt, funnel_figure, interference_figure, paired_bars_figure,
                                         pm_calibration_figure, png_data_uri, ppo_curves_figure, ppo_time_figure,
                                         ranking_figure, win_rate_figure)
from character.reporting.headline import headline_html
from character.reporting.run_files import read_json, read_ppo_metrics, read_text

SPEC = spec_of(__name__)
TABLE_FIELDS = ("trait_score_base.mean", "trait_score_trained.mean", "trait_score_delta.mean", "trait_score_delta.lo",
                "trait_score_delta.hi", "probe_delta.mean", "identical_share.share", "kl.mean", "pm_base.mean",
                "pm_trained.mean", "pm_delta.mean", "pm_delta.lo", "pm_delta.hi",
                "win_rate.mean", "win_rate.lo", "win_rate.hi", "length_base.mean", "length_trained.mean",
                "length_change.mean")


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
        if isinstance(v, str):
            return html.escape(v)
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
    method = (f'<p id="interval-method">Intervals ([lo, hi] in the figures): {html.escape(summary["interval"])}.</p>'
              if summary.get("interval") else "")
    return (f'{method}<table id="summary-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            f'</table>')


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
            for name in ("base", "sft", "trained") if "sft" in models else ("base", "trained"):
                r = models.get(name)
                if r is None:
                    cols.append(f"<div class='resp'><h4>{name}</h4><p class='na'>missing</p></div>")
                    continue
                extra = f", win prob {fmt(r.get('win_prob'))}" if name != "base" else ""
                cols.append(f"<div class='resp'><h4>{name} (PM reward {fmt(r.get('reward'))}{extra})</h4>"
                            f"<pre>{esc(str(r.get('response', '')))}</pre></div>")
            parts.append(f"<div class='transcript'><div class='prompt'><h4>prompt</h4>"
                         f"<pre>{esc(str(any_row.get('prompt', '')))}</pre></div>"
                         f"<div class='pair'>{''.join(cols)}</div></div>")
    return "".join(parts)


def sft_html(sft: dict, summary: dict) -> str:
    """train-sft's held-out NLL before and after, per trait, and what each stage added on evaluation's messages:
    the SFT model against the base, then the final model (SFT then RL) against the base."""
    esc = html.escape
    numbers = numbers_html([(k, sft.get(k)) for k in ("source", "system_prompt", "train_examples", "eval_examples",
                                                      "eval_nll_before", "eval_nll", "steps")])
    before = sft.get("per_trait_nll_before") or {}
    traits = "".join(f"<tr><th>{esc(t)}</th><td>{fmt(before.get(t))}</td><td>{fmt(v)}</td></tr>"
                     for t, v in sorted((sft.get("per_trait_nll") or {}).items()))
    rows = []
    for label, block in (("SFT vs base", (summary.get("sft") or {}).get("overall") or {}),
                         ("final vs base", summary.get("overall") or {})):
        for split, g in sorted(block.items()):
            cells = "".join(f'<td data-key="{esc(f"{label}.{split}.{k}")}">{fmt(dig(g, k))}</td>'
                            for k in ("pm_delta.mean", "pm_delta.lo", "pm_delta.hi", "win_rate.mean",
                                      "length_change.mean"))
            rows.append(f"<tr><th>{esc(label)}</th><th>{esc(split)}</th>{cells}</tr>")
    stages = ("<table id='stage-gains'><thead><tr><th>models</th><th>split</th><th>score shift</th><th>lo</th>"
              "<th>hi</th><th>win rate</th><th>length change</th></tr></thead><tbody>" + "".join(rows)
              + "</tbody></table>") if rows else ""
    return (numbers + "<h3>Held-out NLL per answer token, per trait</h3><table id='sft-nll'><thead><tr><th>trait</th>"
            f"<th>before</th><th>after</th></tr></thead><tbody>{traits}</tbody></table>"
            + ("<h3>What each stage added</h3>" + stages if stages else ""))


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1300px;padding:0 1em;color:#222}
section{margin:2em 0;border-top:1px solid #ddd}img{max-width:100%}nav a{margin-right:1em}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
.na{color:#888;font-style:italic}dl.nums{display:grid;grid-template-columns:max-content max-content;gap:2px 12px}
dd{margin:0;font-family:monospace}.pair{display:grid;grid-auto-columns:1fr;grid-auto-flow:column;gap:1em}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em;margin:0}.transcript{margin:1em 0}h4{margin:.3em 0}
td.text{text-align:left}td.v-moved{background:#e3f4e3}td.v-moved-the-wrong-way{background:#f8dede}"""


def _evaluation_sections(section, summary: dict) -> None:
    """The headline, trait scores, interference, and the PM score, win rate and length per trait."""
    groups = summary.get("groups") or {}
    no_groups = None if groups else "eval/summary.json has no groups"
    section("headline", "What changed (held out)", None, None, headline_html(summary))
    section("trait-score", "Trait score before vs after (the base model's per-token trait contrast)",
            "fig-trait-score", lambda: paired_bars_figure(groups, "trait_score_base", "trait_score_trained",
                                                          "trait score"), missing=no_groups)
    section("interference", "Trait interference: each trait's score shift on every trait's messages",
            "fig-interference", lambda: interference_figure(summary["interference"]),
            missing=None if summary.get("interference") else "eval/summary.json has no interference matrix")
    score = summary.get("score", "preference model")  # or the DPO implicit reward (policy.method dpo)
    section("score-shift", f"Score before vs after ({score})", "fig-score-shift",
            lambda: paired_bars_figure(groups, "pm_base", "pm_trained", score), missing=no_groups)
    section("win-rate", "Win rate of trained over base", "fig-win-rate", lambda: win_rate_figure(groups),
            missing=no_groups)
    section("length", "Response length (words)", "fig-length",
            lambda: paired_bars_figure(groups, "length_base", "length_trained", "words"), missing=no_groups)


def build_html(inputs: dict, n: int = 2) -> tuple[str, int]:
    """inputs: summary, eval_rows, ppo (list|None), pm (dict|None), dpo (dict|None), sft (dict|None), preferences,
    messages, responses
    (dict|None). Returns the page and the number of figures in it."""
    summary = inputs["summary"]
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

    _evaluation_sections(section, summary)
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
    dpo = inputs.get("dpo")
    if dpo:
        section("dpo", "DPO (held-out pairs, implicit rewards)", "fig-dpo-calibration",
                lambda: pm_calibration_figure(dpo),
                numbers_html([(k, dpo.get(k)) for k in ("eval_accuracy", "eval_loss", "eval_mean_margin",
                                                        "eval_reward_chosen", "eval_reward_rejected", "eval_pairs",
                                                        "beta", "steps", "reference")]))
    sft = inputs.get("sft")
    if sft:
        section("sft", "Supervised fine-tuning (train-sft)", None, None, sft_html(sft, summary))
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


def run(config: Config, force: bool = False, n: int = 2) -> StageResult:
    return run_stage(config, SPEC, force, lambda out, result, _: _report(config, out, result, n))


def _report(config: Config, out: StageOutput, result: StageResult, n: int) -> None:
    import pyarrow.compute as pc

    output_dir = config.run.output_dir
    evaluation = StageOutput(output_dir, "eval")
    table = evaluation.read()
    result.rows_in = table.num_rows
    if "sample" in table.column_names:
        table = table.filter(pc.equal(table.column("sample"), 0))
    inputs = {
        "summary": evaluation.read_json("summary.json"),
        "eval_rows": table.to_pylist(),
        "ppo": read_ppo_metrics(read_text(output_dir, "policy", "metrics.jsonl")),
        "pm": read_json(output_dir, "pm", "metrics.json"),
        "dpo": read_json(output_dir, "dpo", "metrics.json"),
        "sft": read_json(output_dir, "sft", "metrics.json"),
        "preferences": read_json(output_dir, "preferences", "stats.json"),
        "messages": read_json(output_dir, "messages", "stats.json"),
        "responses": read_json(output_dir, "responses", "stats.json"),
    }
    page, result.rows_out = build_html(inputs, n)
    out.write_text("index.html", page)
    path = out.path("index.html")
    result.extra = {"figures": result.rows_out, "report": path}
    print(f"[report] {result.rows_out} figures -> {path}", flush=True)
