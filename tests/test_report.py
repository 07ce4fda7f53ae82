"""Stage `report` on a fake run directory (no Ray, no models): figures, numbers, escaping, skip/force."""
from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser

import pyarrow as pa
import pytest

from character.core import schemas
from character.core.config import config_from_dict
from character.reporting import figures
from character.reporting.run_files import read_ppo_metrics
from character.stages import report
from character.core.store import StageOutput

FIG_IDS = ("fig-trait-score", "fig-interference", "fig-score-shift", "fig-win-rate", "fig-length", "fig-ppo-curves",
           "fig-ppo-time", "fig-pm-calibration", "fig-ranking", "fig-funnel")
TRAITS = ("curiosity", "honesty")
EVIL = "<script>alert('x')</script> & more"


class Page(HTMLParser):
    """Collects <img> attributes by id, data-key cell texts, section ids and the visible text."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs, self.cells, self.sections, self.text, self.tags = {}, {}, [], [], []
        self._key = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img" and "id" in a:
            self.imgs[a["id"]] = a
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "td" and "data-key" in a:
            self._key = a["data-key"]
            self.cells[self._key] = ""

    def handle_endtag(self, tag):
        if tag == "td":
            self._key = None

    def handle_data(self, data):
        self.text.append(data)
        if self._key:
            self.cells[self._key] += data


def _ci(mean, half=0.1):
    return {"mean": mean, "lo": mean - half, "hi": mean + half}


def _group(trait, split, k):
    g = {"split": split, "n_messages": 2, "n_samples": 2, "pm_base": _ci(0.1 * k), "pm_trained": _ci(0.3 * k + 0.12345),
         "pm_delta": _ci(0.2 * k + 0.023456), "win_rate": _ci(0.55 + 0.01 * k, 0.05),
         "hard_win_rate": {"p": 0.5, "lo": 0.2, "hi": 0.8, "wins": 1, "ties": 0, "n": 2},
         "length_base": _ci(40.0 + k), "length_trained": _ci(47.123456 + k), "length_change": _ci(7.00005),
         "trait_score_base": _ci(0.1), "trait_score_trained": _ci(0.2 + 0.05 * k),
         "trait_score_delta": _ci(0.1 + 0.05 * k),
         "probe_base": _ci(0.3), "probe_trained": _ci(0.5), "probe_delta": _ci(0.2, 0.3),
         "identical_share": {"share": 0.25, "identical": 1, "n": 4}, "distinct2_base": 0.8, "distinct2_trained": 0.9,
         "kl": _ci(1.5, 0.5)}
    if trait:
        g["trait"] = trait
    return g


def make_run(tmp_path, *, ppo=True, evaluation=True):
    out = str(tmp_path)
    if evaluation:
        ev = StageOutput(out, "eval")
        rows = []
        for t, trait in enumerate(TRAITS):
            for split in figures.SPLITS:
                for m in range(3):
                    for model in ("base", "trained"):
                        for sample in range(2):
                            rows.append({"message_id": f"{trait}-{split}-{m}", "trait": trait, "split": split,
                                         "model": model, "sample": sample, "prompt": f"prompt {m} {EVIL}",
                                         "response": f"{model} answer {sample} {EVIL}", "reward": 0.1 * m + t,
                                         "n_words": 5, "n_tokens": 7, "finish_reason": "stop", "win_prob": 0.6})
        ev.write_part(pa.Table.from_pylist(rows, schema=schemas.EVAL))
        groups = {f"{trait}/{split}": _group(trait, split, k)
                  for k, (trait, split) in enumerate((t, s) for t in TRAITS for s in figures.SPLITS)}
        groups["curiosity/held_out"]["pm_delta"]["hi"] = None  # a missing number renders as n/a
        ev.write_json("summary.json", {"base_model": "tiny-llama", "trained_model": "policy", "judge": "model:pm",
                                       "samples": 2, "groups": groups, "interval": "clustered by message: a <test> method",
                                       "overall": {s: _group(None, s, 1) for s in figures.SPLITS},
                                       "interference": {i: {j: _ci(0.2 if i == j else 0.01, 0.05) for j in TRAITS}
                                                        for i in TRAITS},
                                       "capability": {"base": {"accuracy": 0.5, "lo": 0.4, "hi": 0.6, "n": 67},
                                                      "trained": {"accuracy": 0.45, "lo": 0.35, "hi": 0.55, "n": 67},
                                                      "kept": {"trained": True}}})
        ev.mark_success({"rows_out": len(rows)})
    if ppo:
        lines = [{"iteration": 0, "eval_reward": 0.1}]
        for i in range(1, 4):
            lines.append({"iteration": i, "reward": 0.1 * i, "kl": 0.01 * i, "entropy": 2.0 - 0.1 * i,
                          "response_length": 30 + i, "clip_frac": 0.1, "value_loss": 0.5, "explained_variance": 0.2,
                          "time_generation": 1.0, "time_scoring": 0.5, "time_training": 2.0, "time_sync": 0.2,
                          **({"eval_reward": 0.3} if i == 3 else {})})
        policy = StageOutput(out, "policy")
        policy.ensure()
        with open(policy.path("metrics.jsonl"), "w") as f:
            f.write("\n".join(json.dumps(r) for r in lines) + "\n{\"iteration\": 4, \"rew")  # torn last line
    pm = StageOutput(out, "pm")
    pm.write_json("metrics.json", {
        "eval_loss": 0.61, "eval_accuracy": 0.7, "eval_mean_margin": 0.4, "eval_pairs": 20,
        "per_trait_accuracy": {"curiosity": 0.8, "honesty": 0.6},
        "calibration": [{"lo": 0.5, "hi": 0.75, "n": 10, "correct": 6, "accuracy": 0.6},
                        {"lo": 0.75, "hi": 1.0, "n": 0, "correct": 0, "accuracy": None}]})
    pm.mark_success({})
    StageOutput(out, "preferences").write_json("stats.json", {
        "rows_in": 6, "rows_out": 10, "comparisons": 24, "order_consistency": 0.9,
        "position_bias_mean_p_first": 0.52, "label_histogram": {"edges": [0, 0.5, 1.0], "counts": [3, 7]},
        "pairs_per_trait": {"curiosity": 6, "honesty": 4}, "drops": {"identical_candidate": 2}})
    StageOutput(out, "messages").write_json("stats.json", {
        "requested": 12, "rows_in": 12, "rows_out": 9, "drops": {"near_duplicate": 2, "too_short": 1},
        "generated": 12, "generated_kept": 9, "keep_rate": 0.75,
        "examples_kept": {"curiosity": [{"kind": "values", "text": "Why do stars twinkle?"}]},
        "examples_dropped": {"too_short": [{"trait": "honesty", "text": "Hi", "reply": f" Hi {EVIL}"}]}})
    StageOutput(out, "responses").write_json("stats.json", {"rows_in": 9, "rows_out": 9, "drops": {}})
    return config_from_dict({"run": {"output_dir": out}}, "test.yaml")


def read_page(tmp_path) -> tuple[str, Page]:
    text = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    return text, Page(text)


def test_report_page(tmp_path):
    config = make_run(tmp_path)
    result = report.run(config)
    assert not result.skipped and result.rows_in == 2 * 2 * 3 * 2 * 2 and result.rows_out == len(FIG_IDS)
    assert (tmp_path / "report" / "_SUCCESS").exists()
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.startswith(".tmp")]
    text, page = read_page(tmp_path)
    for fig_id in FIG_IDS:
        src = page.imgs[fig_id]["src"]
        assert src.startswith("data:image/png;base64,"), fig_id
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG"), fig_id
    assert {"headline", "trait-score", "interference", "score-shift", "win-rate", "length", "ppo-curves", "ppo-time", "pm-calibration", "ranking", "funnel",
            "transcripts", "summary"} <= set(page.sections)
    assert "script" not in page.tags and "<script>" not in text and "&lt;script&gt;" in text
    assert "not available" not in text
    assert "Intervals ([lo, hi] in the figures): clustered by message: a &lt;test&gt; method." in text
    # Every table cell equals summary.json rounded to 4 decimals; every group and field is there.
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    rows = {**summary["groups"], **{f"overall/{s}": g for s, g in summary["overall"].items()}}
    table = {k: v for k, v in page.cells.items() if "→" not in k}  # the headline's cells: tests/test_measures.py
    assert len(table) == len(rows) * len(report.TABLE_FIELDS)
    assert len(page.cells) - len(table) == len(TRAITS) * 3  # held out: trait score, probe and win-rate shifts
    for key, shown in table.items():
        group, field = key.split(".", 1)
        value = report.dig(rows[group], field)
        if value is None:
            assert shown == "n/a", key
        else:
            assert shown == f"{value:.4f}" and math.isclose(float(shown), round(value, 4)), key
    # Transcripts: n=2 messages per trait and split, sample 0 only, both models side by side.
    joined = "".join(page.text)
    assert "keep rate 0.7500" in joined and "Why do stars twinkle?" in joined  # synthesis keep rate, examples
    assert f"Hi {EVIL}" in joined  # a dropped message shows the model's whole reply (escaped: no script tag)
    assert joined.count("base answer 0") == len(TRAITS) * len(figures.SPLITS) * 2
    assert "answer 1" not in joined and "prompt 2" not in joined


def test_skip_force_and_missing_inputs(tmp_path):
    config = make_run(tmp_path, ppo=False)
    first = report.run(config, n=1)
    assert first.rows_out == len(FIG_IDS) - 2
    text, page = read_page(tmp_path)
    assert "fig-ppo-curves" not in page.imgs and "fig-ppo-time" not in page.imgs
    assert text.count("not available") == 2
    assert report.run(config).skipped
    (tmp_path / "report" / "index.html").unlink()
    again = report.run(config, force=True)
    assert not again.skipped and (tmp_path / "report" / "index.html").exists()


def test_missing_eval_stage(tmp_path):
    config = make_run(tmp_path, evaluation=False)
    with pytest.raises(FileNotFoundError, match="'eval'"):
        report.run(config)
    assert not (tmp_path / "report" / "_SUCCESS").exists()


def test_pure_helpers():
    assert report.fmt(0.123456) == "0.1235" and report.fmt(None) == "n/a" and report.fmt(2) == "2.0000"
    records = read_ppo_metrics('{"iteration": 0, "eval_reward": 1}\n{"iteration": 1, "reward": 2}\n'
                                      '{"iteration": 1, "reward": 3}\nnot json\n')
    assert records == [{"iteration": 0, "eval_reward": 1}, {"iteration": 1, "reward": 3}]
    assert read_ppo_metrics("") is None
    table = report.summary_table_html({"groups": {"a/held_out": {"trait": "<b>", "split": "held_out",
                                                                 "pm_delta": {"mean": 1 / 3}}}})
    assert 'data-key="a/held_out.pm_delta.mean">0.3333<' in table and "<b>" not in table
    # Builders cope with a missing split and empty inputs.
    fig = figures.win_rate_figure({"t/held_out": {"trait": "t", "split": "held_out", "win_rate": _ci(0.6)}})
    assert figures.png_data_uri(fig).startswith("data:image/png;base64,")
    for fig in (figures.funnel_figure(None, {"rows_in": 3, "rows_out": 2, "drops": {}}, None),
                figures.ranking_figure({}), figures.pm_calibration_figure({})):
        assert figures.png_data_uri(fig)
