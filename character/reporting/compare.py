"""`character compare RUN [RUN ...]`: finished (or partly finished) runs side by side — model, constitution,
recipe, the PM's (or DPO's) held-out pair accuracy, PPO's final KL and rewards, win rates per trait — as a
table on stdout and one HTML page with their PPO curves overlaid and their win rates per trait (the report's
figure code). Reads only the run directories (local or object storage), so it works with any tracking
backend, including none.
"""
from __future__ import annotations

import html
import os
import time

import yaml

from character.reporting.figures import dig, fmt, png_data_uri, ppo_curves_overlay_figure, win_rate_comparison_figure
from character.reporting.run_files import read_json, read_ppo_metrics, read_text
from character.tracking.runs import recipe_name

# Table columns: (key, heading); per-trait win rates follow.
COLUMNS = (("run", "run"), ("model", "model"), ("constitution", "constitution"), ("recipe", "recipe"),
           ("pair_accuracy", "held-out pair acc."), ("ppo_kl", "final KL"), ("ppo_reward", "final reward"),
           ("ppo_eval_reward", "final held-out reward"), ("win_rate", "win rate (held out)"),
           ("win_rate_adversarial", "win rate (adversarial)"))
TRAIT_COLUMNS_IN_TEXT = 8  # more traits than this: per-trait win rates on the page only


def run_facts(run_dir: str) -> dict:
    """What one run directory says about itself; missing parts are None."""
    if "://" not in run_dir:
        run_dir = os.path.abspath(run_dir)
    parent, name = run_dir.rstrip("/").rsplit("/", 1)  # config.yaml lies in the run directory itself
    config = yaml.safe_load(read_text(parent, name, "config.yaml") or "{}") or {}
    summary = read_json(run_dir, "eval", "summary.json") or {}
    groups = summary.get("groups") or {}
    dpo = dig(config, "policy.method") == "dpo"  # a policy/ beside dpo/ is an earlier PPO run's, not this one's
    ppo = [] if dpo else read_ppo_metrics(read_text(run_dir, "policy", "metrics.jsonl")) or []
    pairs = read_json(run_dir, "dpo" if dpo else "pm", "metrics.json") or {}
    last = {k: next((r[k] for r in reversed(ppo) if r.get(k) is not None), None)
            for k in ("kl", "reward", "eval_reward")}
    traits = sorted({g.get("trait") for g in groups.values() if g.get("trait")})
    return {
        "run": run_dir.rstrip("/"), "model": dig(config, "model.name"),
        "constitution": f"{os.path.basename(dig(config, 'traits.path') or '?')} ({len(traits)} traits)"
        if traits else os.path.basename(dig(config, "traits.path") or "") or None,
        "recipe": recipe_name(dig(config, "policy.method"), dig(config, "ppo.advantage"), dig(config, "policy.sft")) if config else None,
        "pair_accuracy": pairs.get("eval_accuracy"),
        "ppo_kl": last["kl"], "ppo_reward": last["reward"], "ppo_eval_reward": last["eval_reward"],
        "win_rate": dig(summary, "overall.held_out.win_rate.mean"),
        "win_rate_adversarial": dig(summary, "overall.adversarial.win_rate.mean"),
        "trait_win_rates": {t: dig(groups, f"{t}/held_out.win_rate.mean") for t in traits},
        "ppo": ppo, "groups": groups,
    }


def _cell(value) -> str:
    if value is None:
        return "-"
    return fmt(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def table_text(facts: list[dict]) -> str:
    """The runs as a fixed-width text table, one row per run."""
    traits = sorted({t for f in facts for t in f["trait_win_rates"]})
    shown = traits if len(traits) <= TRAIT_COLUMNS_IN_TEXT else []
    head = [h for _, h in COLUMNS] + [f"win:{t}" for t in shown]
    rows = [[_cell(f.get(k)) for k, _ in COLUMNS] + [_cell(f["trait_win_rates"].get(t)) for t in shown]
            for f in facts]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in (head, *rows)]
    if traits and not shown:
        lines.append(f"({len(traits)} traits: per-trait win rates on the page)")
    return "\n".join(lines)


def page_html(facts: list[dict]) -> str:
    """One self-contained page: the table (cells carry data-key="<run index>.<column>") and the figures."""
    esc = html.escape
    traits = sorted({t for f in facts for t in f["trait_win_rates"]})
    head = "".join(f"<th>{esc(h)}</th>" for _, h in COLUMNS) + "".join(f"<th>win: {esc(t)}</th>" for t in traits)
    body = ""
    for i, f in enumerate(facts):
        cells = [(k, f.get(k)) for k, _ in COLUMNS] + [(f"win:{t}", f["trait_win_rates"].get(t)) for t in traits]
        body += "<tr>" + "".join(f'<td data-key="{i}.{esc(k)}">{esc(_cell(v))}</td>' for k, v in cells) + "</tr>"
    labels = _labels(facts)
    figures = ""
    curves = {label: f["ppo"] for label, f in zip(labels, facts) if any("reward" in r for r in f["ppo"])}
    if curves:
        figures += ('<h2>PPO curves</h2><img id="fig-compare-ppo" alt="PPO curves" src="'
                    f'{png_data_uri(ppo_curves_overlay_figure(curves))}">')
    wins = {label: f["groups"] for label, f in zip(labels, facts) if f["groups"]}
    if wins:
        figures += ('<h2>Win rate of trained over base, per trait</h2><img id="fig-compare-win-rate" '
                    f'alt="win rates" src="{png_data_uri(win_rate_comparison_figure(wins))}">')
    legend = "".join(f"<li><code>{esc(label)}</code>: {esc(f['run'])}</li>" for label, f in zip(labels, facts))
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>character: runs compared</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}</style></head><body>"
            f"<h1>Runs compared</h1><p>generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p><ul>{legend}</ul>"
            f"<table><tr>{head}</tr>{body}</table>{figures}</body></html>")


def _labels(facts: list[dict]) -> list[str]:
    """Short names for the legends: the run folder's name, with its index when two share one."""
    names = [os.path.basename(f["run"]) or f["run"] for f in facts]
    return [f"{i}:{n}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def compare(run_dirs: list[str], output: str) -> tuple[str, list[dict]]:
    """Print nothing; return the text table and the facts, and write the page to `output` (atomically)."""
    facts = [run_facts(d) for d in run_dirs]
    tmp = f"{output}.tmp"
    with open(tmp, "w") as f:
        f.write(page_html(facts))
    os.replace(tmp, output)
    return table_text(facts), facts
