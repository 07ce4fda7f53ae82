"""The report's headline (pure: eval/summary.json in, HTML out): per trait on held-out messages, the shift of the
trait score, the probe rate and the win rate, each with its interval and a plain verdict — "moved" (the interval
lies on the trait's side of no change), "moved the wrong way" (on the other side) or "not shown" (it includes no
change). Below: capability kept, identical answers, KL and distinct-2. With train-sft, the same rows for base ->
SFT and SFT -> final, so a reader sees what each stage added.
"""
from __future__ import annotations

import html
import math

from character.reporting.eval_summary import verdict
from character.reporting.figures import dig, fmt

# (label, summary key of the comparison block, what is compared)
STEPS = (("base → final", None), ("base → SFT", "sft"), ("SFT → final", "sft_to_final"))
MEASURES = (("trait_score", "trait score", "trait_score_delta", 0.0), ("probe", "probe rate", "probe_delta", 0.0),
            ("win_rate", "win rate", "win_rate", 0.5))
SPLIT = "held_out"


def _shift(stat: dict | None, null: float) -> tuple[str, str]:
    """(the cell's text, its verdict) for a {mean, lo, hi} statistic."""
    if not stat or stat.get("mean") is None or math.isnan(stat.get("mean", math.nan)):
        return "–", "not available"
    signed = null == 0.0
    number = (f"{stat['mean']:+.3f} [{stat['lo']:+.3f}, {stat['hi']:+.3f}]" if signed
              else f"{stat['mean']:.3f} [{stat['lo']:.3f}, {stat['hi']:.3f}]")
    return number, verdict(stat, null)


def headline_rows(summary: dict) -> list[dict]:
    """One row per (step, trait) on held-out messages: {step, trait, n_messages, <measure>: (text, verdict)}."""
    rows = []
    for label, key in STEPS:
        block = summary if key is None else summary.get(key)
        if not block:
            continue
        for name, g in sorted((block.get("groups") or {}).items()):
            if g.get("split") != SPLIT:
                continue
            row = {"step": label, "trait": g["trait"], "n_messages": g.get("n_messages")}
            for measure, _, field, null in MEASURES:
                row[measure] = _shift(g.get(field), null)
            rows.append(row)
    return rows


def headline_html(summary: dict) -> str:
    esc = html.escape
    rows = headline_rows(summary)
    head = "".join(f"<th>{esc(title)} shift</th>" for _, title, _, _ in MEASURES)
    body = []
    for r in rows:
        cells = "".join(
            f'<td data-key="{esc(r["step"])}.{esc(r["trait"])}.{m}" data-verdict="{esc(r[m][1])}" '
            f'class="v-{r[m][1].replace(" ", "-")}">{esc(r[m][0])}<br><b>{esc(r[m][1])}</b></td>'
            for m, _, _, _ in MEASURES)
        body.append(f"<tr><th>{esc(r['step'])}</th><th>{esc(r['trait'])}</th><td>{r['n_messages']}</td>{cells}</tr>")
    table = (f"<table id='headline'><thead><tr><th>models</th><th>trait</th><th>messages</th>{head}</tr></thead>"
             f"<tbody>{''.join(body)}</tbody></table>") if body else "<p class='na'>No held-out groups.</p>"
    return (f"<p>Held-out messages (never trained on). Trait score: the frozen base model's per-token "
            f"log p(answer | trait) &minus; log p(answer | no trait); probe rate: the share of answers showing the "
            f"trait's checkable behaviour (configs/traits, <code>probes</code>; no training stage reads them); win "
            f"rate: the judge's preference, 0.5 is no change. A verdict says <i>moved</i> only where the interval "
            f"excludes no change.</p>{table}{_kept_html(summary)}")


def _kept_html(summary: dict) -> str:
    """Capability, identical answers, KL and distinct-2 (held out), one line each."""
    esc = html.escape
    items = []
    capability = summary.get("capability") or {}
    for model in ("base", "sft", "trained"):
        c = capability.get(model)
        if c:
            kept = "" if model == "base" else (" (kept: at or above the base's lower bound)"
                                                if capability.get("kept", {}).get(model) else
                                                " (<b>below the base's lower bound</b>)")
            items.append((f"capability, {model}", f"{fmt(c['accuracy'])} [{fmt(c['lo'])}, {fmt(c['hi'])}] of "
                          f"{c['n']} questions{kept}"))
    for label, key in STEPS:
        block = summary if key is None else summary.get(key)
        held = dig(block, f"overall.{SPLIT}") if block else None
        if not held:
            continue
        against, model = block.get("against", "base"), block.get("model", "trained")
        share = held.get("identical_share") or {}
        items.append((f"{label}: identical answers", f"{fmt(share.get('share'))} ({share.get('identical')} of "
                      f"{share.get('n')} samples byte-identical)"))
        items.append((f"{label}: distinct-2", f"{fmt(held.get(f'distinct2_{against}'))} → "
                      f"{fmt(held.get(f'distinct2_{model}'))}"))
        if held.get("kl"):
            kl = held["kl"]
            items.append((f"{label}: KL to the base (Monte Carlo, per answer)",
                          f"{fmt(kl.get('mean'))} [{fmt(kl.get('lo'))}, {fmt(kl.get('hi'))}]"))
    return ("<dl class='nums' id='headline-kept'>" + "".join(
        f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>") if items else ""
