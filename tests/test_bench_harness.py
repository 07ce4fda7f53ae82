"""benchmarks/_harness.py: the parent side of the fresh-subprocess protocol (run_worker) on tiny python children."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` alone does not put the repository root on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks._harness import child_env, choose, comma_list, rotation, run_worker  # noqa: E402


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_returns_the_last_result_line_among_noise():
    cmd = child("import sys\n"
                "print('loading weights... RESULT lines only count at the start of a line')\n"
                "print('RESULT {\"n\": 1}')\n"
                "print('warning: something', file=sys.stderr)\n"
                "print('RESULT {\"n\": 2, \"name\": \"x\"}')\n"
                "print('shutting down')\n")
    assert run_worker(cmd) == {"n": 2, "name": "x"}


def test_emit_result_and_wall_time():
    # The child speaks through the harness itself (cwd defaults to the repository root, so it imports).
    cmd = child("from benchmarks._harness import emit_result; print('noise'); emit_result({'tokens': 3, 'wall_s': -1})")
    result = run_worker(cmd, wall_key="wall_s")
    assert result["tokens"] == 3
    assert 0 < result["wall_s"] < 120  # the parent's measurement replaces the child's key


def test_environment_is_passed():
    cmd = child("import json, os; print('RESULT ' + json.dumps({'v': os.environ.get('BENCH_HARNESS_TEST')}))")
    assert run_worker(cmd, child_env(BENCH_HARNESS_TEST="set")) == {"v": "set"}
    assert run_worker(cmd, {**child_env(), "BENCH_HARNESS_TEST": "whole env"}) == {"v": "whole env"}


def test_no_result_line_raises_with_the_childs_stderr():
    cmd = child("import sys\nprint('some output')\nprint('the real cause is here', file=sys.stderr)\n")
    with pytest.raises(RuntimeError) as info:
        run_worker(cmd, what="hf worker")
    message = str(info.value)
    assert "hf worker failed" in message and "no RESULT line" in message
    assert "the real cause is here" in message
    assert sys.executable in message  # the command


def test_nonzero_exit_is_reported_even_with_a_result_line():
    cmd = child("import sys\nprint('RESULT {\"n\": 1}')\nprint('Traceback: boom', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(RuntimeError) as info:
        run_worker(cmd)
    assert "rc 3" in str(info.value) and "Traceback: boom" in str(info.value)


def test_tail_keeps_the_end_of_stderr():
    cmd = child("import sys\nfor i in range(100): print(f'out {i}')\n"
                "for i in range(100): print(f'err {i}', file=sys.stderr)\n")
    with pytest.raises(RuntimeError) as info:
        run_worker(cmd, tail_lines=5)
    message = str(info.value)
    assert "err 99" in message and "err 95" in message and "err 94" not in message and "out 99" not in message


def test_command_line_helpers():
    assert comma_list(" a, b,,c ,") == ["a", "b", "c"]
    assert choose("hf, direct", ("ray", "direct", "hf")) == ["hf", "direct"]
    with pytest.raises(SystemExit, match="unknown \\['gpu'\\]"):
        choose("hf,gpu", ("ray", "direct", "hf"))
    with pytest.raises(SystemExit):
        choose(" , ", ("ray",))
    assert [rotation(["a", "b", "c"], r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                                ["a", "b", "c"]]
    assert [rotation(["x", "y"], r) for r in range(3)] == [["x", "y"], ["y", "x"], ["x", "y"]]


def test_the_learning_ablation_table_reads_each_recipes_summary_and_counts_seeds_that_moved():
    from benchmarks.learning import ablation_table, recipe_row

    def stat(mean, half=0.1):
        return {"mean": mean, "lo": mean - half, "hi": mean + half}

    def summary(shift):
        groups = {f"{t}/held_out": {"trait": t, "split": "held_out", "trait_score_delta": stat(shift)} for t in "ab"}
        held = {"probe_delta": stat(0.0), "identical_share": {"share": 0.1}, "kl": stat(2.0)}
        block = {"groups": groups, "overall": {"held_out": held}}
        return {**block, "sft": block, "capability": {"base": {"accuracy": 0.5}, "trained": {"accuracy": 0.4},
                                                      "sft": {"accuracy": 0.45}, "kept": {"trained": True}}}

    pm = {"eval_accuracy": 0.6, "eval_pairs": 100}
    rows = {"main": [recipe_row(summary(0.2), pm, 20.0), recipe_row(summary(0.05), pm, 22.0)],
            "sft_only": [recipe_row(summary(0.3), None, 8.0, "sft")]}
    assert rows["main"][0]["pm"]["n"] == 100 and 0.5 < rows["main"][0]["pm"]["lo"] < 0.6
    assert rows["sft_only"][0]["capability"] == 0.45 and rows["sft_only"][0]["pm"]["n"] == 0
    table = ablation_table(rows).splitlines()
    assert table[0].startswith("| recipe | seeds | trait score: a | trait score: b | probe |")
    assert table[2].startswith("| main | 2 | +0.125 (1/2) | +0.125 (1/2) | +0.000 (0/2) | 0.400 | 0.10 | 2.00 |")
    assert table[2].endswith("of 100 | 21.0 |") and table[3].endswith("| - | 8.0 |")


def test_the_learning_ablation_takes_the_main_jobs_run_as_its_data_only_when_their_seeds_agree(tmp_path):
    from benchmarks.learning import RULER, copy_stages, main_run_seed, parse_args

    run = tmp_path / "small"
    for folder in ("messages", "sft", "sft/_train"):
        (run / folder).mkdir(parents=True)
        (run / folder / "_SUCCESS").write_text("{}")
    (run / "config.yaml").write_text("run: {seed: 0, output_dir: small}\n")
    assert main_run_seed(parse_args(["--main-run", str(run)])) == 0
    assert main_run_seed(parse_args([])) is None
    with pytest.raises(SystemExit, match="run.seed 0, not --data-seed 3"):
        main_run_seed(parse_args(["--main-run", str(run), "--data-seed", "3"]))
    copy_stages(run, tmp_path / "copy", ("messages", "sft"))
    copied = tmp_path / "copy"
    assert (copied / "messages" / "_SUCCESS").exists() and not (copied / "sft" / "_train").exists()
    (run / "messages" / "_SUCCESS").write_text('{"changed": 1}')
    copy_stages(run, tmp_path / "copy", ("messages",))  # a folder already there is kept, not overwritten
    assert (tmp_path / "copy" / "messages" / "_SUCCESS").read_text() == "{}"
    copy_stages(run, tmp_path / "copy", (RULER,))  # kept ruler numbers are optional: none to copy, none copied
    assert not (copied / RULER).exists()
    with pytest.raises(FileNotFoundError):  # a stage the recipe shares is not: its absence is an error
        copy_stages(run, tmp_path / "copy", ("pm",))


def test_a_recipe_runs_stage_by_stage_and_gets_the_main_recipes_answers_just_before_evaluate(tmp_path, monkeypatch):
    """`character run` redoes evaluate (from an empty eval/) once a training stage did work: the answers and ruler
    numbers copied for it were wiped, and every recipe made the base's answers again. run_recipe runs the stages one
    by one and copies them in just before evaluate, which then resumes from them."""
    from benchmarks import learning

    main = tmp_path / "main"
    for folder in ("sft", "pm", learning.BASE_ANSWERS, learning.SFT_ANSWERS, learning.RULER):
        (main / folder).mkdir(parents=True)
        (main / folder / "part-x.parquet").write_text("x")
    calls = []

    def fake_run(config, run_dir, overrides, stage):
        calls.append((stage, (run_dir / learning.BASE_ANSWERS).exists(), (run_dir / "sft").exists()))
    monkeypatch.setattr(learning, "character_run", fake_run)
    shared = learning.RECIPES["judge"][1]
    learning.run_recipe(str(learning.ROOT / "configs" / "small.yaml"), tmp_path / "judge",
                        ["run.seed=1", "ppo.reward=judge"], main, shared)
    assert [c[0] for c in calls] == ["synthesize", "respond", "rank", "train-sft", "train-pm", "train-ppo",
                                     "evaluate", "report"]
    assert all(sft for _, _, sft in calls)  # the shared stages are there from the start
    assert [stage for stage, answers, _ in calls if answers] == ["evaluate", "report"]
    assert (tmp_path / "judge" / learning.RULER / "part-x.parquet").exists()
