"""Inputs that leave a stage nothing (or too little) to do fail before Ray starts, naming the stage and
the upstream cause, write no _SUCCESS and lose nothing already written (no model, no Ray: fast)."""
import pyarrow as pa
import pytest

from character.core import schemas
from character.core.store import StageInputError, StageOutput, stable_id

RULE = ["ppo.reward=rule", "ppo.critic_init=policy", "judge.rule.words=[curious]"]


def _no_ray(monkeypatch):
    """Every stage starts Ray in the preamble they share (character/execution/stage_run.py)."""
    from character.execution import stage_run

    def refuse(*_):
        raise AssertionError("Ray was started: the check must come before it")
    monkeypatch.setattr(stage_run, "init_ray", refuse)


def _messages(root, splits: list[str], success: dict | None = None) -> StageOutput:
    rows = [{"message_id": stable_id("curiosity", f"m{i}"), "trait": "curiosity", "kind": "values",
             "text": f"Why is message {i} interesting?", "request_id": f"r{i}", "split": s}
            for i, s in enumerate(splits)]
    out = StageOutput(str(root), "messages")
    if rows:
        out.write_part(pa.Table.from_pylist(rows, schema=schemas.MESSAGES), key="hand")
    info = {**(success or {"stage": "messages", "rows_in": 40, "rows_out": len(rows), "drops": {}}),
            "per_split": {s: splits.count(s) for s in ("train", "held_out", "adversarial")}}
    out.write_json("stats.json", info)
    out.mark_success(info)
    return out


def test_respond_with_no_training_message_names_what_synthesize_kept(tmp_path, make_config, monkeypatch):
    from character.stages import respond

    _no_ray(monkeypatch)
    _messages(tmp_path, ["held_out", "adversarial"],
              {"stage": "messages", "rows_in": 40, "rows_out": 2, "drops": {"too_short": 29, "empty": 9}})
    with pytest.raises(StageInputError, match=r"respond: 0 messages to answer; synthesize kept 2 of 40 "
                                              r"\(empty=9, too_short=29\), none of them in the 'train' split"):
        respond.run(make_config(tmp_path))
    assert not StageOutput(str(tmp_path), "responses").complete()
    assert StageOutput(str(tmp_path), "messages").read().num_rows == 2  # nothing lost


def _preferences(root, pairs: list[dict], info: dict) -> None:
    out = StageOutput(str(root), "preferences")
    if pairs:
        out.write_part(pa.Table.from_pylist(pairs, schema=schemas.PREFERENCES), key="hand")
    out.mark_success(info)


def _pair(message: str, k: int) -> dict:
    return {"pair_id": f"{message}-{k}", "message_id": message, "trait": "curiosity", "prompt": "Why?",
            "chosen": "Because it is curious.", "rejected": "No.", "p_chosen": 0.8, "p_ab": 0.8, "p_ba": 0.2,
            "judge": "rule:keywords", "chosen_score": 1.0, "rejected_score": 0.0}


@pytest.mark.parametrize("command,section,output", [("train-pm", "pm", "pm"), ("train-dpo", "dpo", "dpo")])
def test_pair_training_with_zero_or_too_few_pairs_fails_before_ray(tmp_path, make_config, monkeypatch, command,
                                                                  section, output):
    import importlib

    from character.data.splits import pm_validation

    stage = importlib.import_module(f"character.stages.{command.replace('-', '_')}")
    _no_ray(monkeypatch)
    _preferences(tmp_path, [], {"stage": "preferences", "rows_in": 5, "rows_out": 0, "drops": {"tie": 30}})
    config = make_config(tmp_path)
    with pytest.raises(StageInputError, match=rf"{command}: 0 usable preference pairs; rank kept 0 of 5 \(tie=30\)"):
        stage.run(config)
    # Three pairs of one message: all on one side of the validation carve-out, the other side empty.
    StageOutput(str(tmp_path), "preferences").reset()
    message = "m-one"
    _preferences(tmp_path, [_pair(message, k) for k in range(3)], {"stage": "preferences", "rows_in": 1, "rows_out": 3})
    side = "validation" if pm_validation(message, 0.2) else "training"
    with pytest.raises(StageInputError, match=rf"{command}: 3 pairs from 1 messages split \(by message, "
                                              rf"{section}.eval_fraction=0.2\) into "
                                              + (r"0 training and 3 validation" if side == "validation"
                                                 else r"3 training and 0 validation")):
        stage.run(config)
    assert not StageOutput(str(tmp_path), output).complete()


def test_train_ppo_with_too_few_training_prompts_fails_before_ray(tmp_path, make_config, monkeypatch):
    from character.stages import train_ppo

    _no_ray(monkeypatch)
    _messages(tmp_path, ["train"] * 5 + ["held_out"] * 3)
    with pytest.raises(StageInputError, match=r"train-ppo: needs >= 16 training prompts .* has \d and \d; "
                                              r"synthesize kept 8 of 40 .*'train': 5"):
        train_ppo.run(make_config(tmp_path, *RULE))
    assert not StageOutput(str(tmp_path), "policy").complete()


def test_evaluate_with_no_held_out_or_adversarial_message_fails_before_ray(tmp_path, make_config, monkeypatch):
    from character.stages import evaluate

    _no_ray(monkeypatch)
    _messages(tmp_path, ["train"] * 4)
    for stage in ("pm", "policy"):
        StageOutput(str(tmp_path), stage).mark_success({})
    with pytest.raises(StageInputError, match=r"evaluate: 0 held-out or adversarial messages to evaluate on; "
                                              r"synthesize kept 4 of 40"):
        evaluate.run(make_config(tmp_path))
    assert not StageOutput(str(tmp_path), "eval").complete()


def test_an_evaluation_of_another_policy_method_is_redone_not_skipped(tmp_path, make_config, monkeypatch, capsys):
    """eval/ of the PPO policy is complete; with policy.method dpo the same run dir must evaluate dpo/ (here not
    trained yet: the error names it, before Ray), while the PPO config still skips it."""
    from character.stages import evaluate

    _no_ray(monkeypatch)
    _messages(tmp_path, ["train", "held_out"])
    StageOutput(str(tmp_path), "eval").mark_success({"trained_model": str(tmp_path / "policy"),
                                                     "measures": evaluate.MEASURES})
    assert evaluate.run(make_config(tmp_path)).skipped
    with pytest.raises(FileNotFoundError, match=r"evaluate needs the 'dpo' output"):
        evaluate.run(make_config(tmp_path, "policy.method=dpo"))
    assert "evaluating again" in capsys.readouterr().out
    assert not StageOutput(str(tmp_path), "eval").complete()


def test_an_evaluation_with_fewer_measures_than_this_release_is_redone(tmp_path, make_config, monkeypatch, capsys):
    """eval/ written before the trait score, probes and capability existed is evaluated again, not skipped."""
    from character.stages import evaluate

    _no_ray(monkeypatch)
    _messages(tmp_path, ["train", "held_out"])
    StageOutput(str(tmp_path), "eval").mark_success({"trained_model": str(tmp_path / "policy")})
    with pytest.raises(FileNotFoundError, match=r"evaluate needs the 'pm' output"):
        evaluate.run(make_config(tmp_path))
    assert f"measures version 1, this release writes {evaluate.MEASURES}: evaluating again" in capsys.readouterr().out


def test_an_unreadable_upstream_part_names_the_file_before_ray(tmp_path, make_config, monkeypatch):
    from character.stages import respond

    _no_ray(monkeypatch)
    messages = _messages(tmp_path, ["train", "held_out"])
    part = messages.part_files()[0]
    with open(part, "r+b") as f:
        f.truncate(100)
    with pytest.raises(StageInputError, match=r"respond: .*messages/part-hand.parquet cannot be read .*Delete "
                                              r".*messages/_SUCCESS and rerun"):
        respond.run(make_config(tmp_path))


def test_messages_from_an_older_version_without_a_split_name_the_file_and_the_fix(tmp_path, make_config, monkeypatch):
    from character.stages import respond

    _no_ray(monkeypatch)
    old = pa.Table.from_pylist([{"message_id": "m0", "trait": "curiosity", "kind": "values", "text": "Why?",
                                 "request_id": "r0"}])  # the layout before the split column
    out = StageOutput(str(tmp_path), "messages")
    out.write_part(old, key="old")
    out.mark_success({"stage": "messages", "rows_in": 1, "rows_out": 1, "drops": {}})
    with pytest.raises(StageInputError, match=r"respond: .*messages/part-old.parquet has no column split \(written by "
                                              r"an older version of character\?\): redo the stage that writes "
                                              r"'messages' with --force"):
        respond.run(make_config(tmp_path))


def test_an_input_error_is_one_line_without_a_traceback_from_a_stage_and_from_run(tmp_path, make_config, monkeypatch,
                                                                                  capsys):
    """`character rank` before `respond` ended in a traceback whose last line held the message; `character run`
    on an unreadable upstream part too. Both are now one line on stderr and exit 1, before Ray; --debug (or
    CHARACTER_DEBUG=1) raises it, traceback and all."""
    from character.core.store import MissingUpstreamError
    from character.pipeline import cli

    _no_ray(monkeypatch)
    args = ["--config", make_config(tmp_path).source, f"run.output_dir={tmp_path}", "tracking.backend=none"]
    assert cli.main(["rank", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[rank] rank needs the 'responses' output at "), err
    assert err[0].endswith("which has no _SUCCESS: run that stage first")
    with pytest.raises(MissingUpstreamError):
        cli.main(["rank", *args, "--debug"])
    monkeypatch.setenv("CHARACTER_DEBUG", "1")
    with pytest.raises(MissingUpstreamError):
        cli.main(["rank", *args])
    monkeypatch.delenv("CHARACTER_DEBUG")

    messages = _messages(tmp_path, ["train", "held_out"])
    with open(messages.part_files()[0], "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    assert cli.main(["run", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("[respond] respond: ") and "part-hand.parquet cannot be read" in err[0], err
    assert err[1:] == ["stopped; fix the cause and rerun `character run` to resume from 'respond'"]
