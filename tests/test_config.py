import subprocess
import sys

import pytest

from character.core.config import ConfigError, config_from_dict, load_config, parse_overrides
from character.core.traits import constitution_from_dict, load_constitution


def test_tiny_config_loads_with_overrides(repo):
    cfg = load_config(repo / "configs/tiny.yaml", ["synthesize.messages_per_trait=3", "engine.actors.max=2",
                                                   "respond.sampling.temperature=0.5"])
    assert cfg.synthesize.messages_per_trait == 3
    assert cfg.engine.actors.max == 2
    assert cfg.respond.sampling.temperature == 0.5
    assert cfg.source.endswith("tiny.yaml")


def test_unknown_key_names_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("synthesize:\n  messages_per_trate: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert "synthesize.messages_per_trate" in str(err.value) and "unknown key" in str(err.value)


def test_wrong_type_names_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("engine:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: field 'engine.batch_size'"):
        load_config(path)


def test_override_with_unknown_key_and_bad_form():
    with pytest.raises(ConfigError, match="respond.candidatez"):
        config_from_dict({}, "x.yaml", ["respond.candidatez=3"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["respond.candidates"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="min"):
        config_from_dict({"engine": {"actors": {"min": 3, "max": 1}}}, "x.yaml")
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        config_from_dict({"engine": {"max_model_len": 1024, "max_num_batched_tokens": 512}}, "x.yaml")


@pytest.mark.parametrize("overrides,needle", [
    # a rule reward with no rule: every response scored 0, silently (judge.kind model leaves rule unchecked)
    (["ppo.reward=rule", "judge.kind=model"], "judge.rule.words"),
    # a critic initialised from a PM on another tokenizer would read the policy's token ids
    (["pm.base_model=tiny-qwen2", "ppo.critic_init=pm"], "ppo.critic_init"),
    (["ppo.minibatch_size=6", "ppo.forward_batch_size=4"], "ppo.forward_batch_size"),
    (["ppo.kl_target=6", "ppo.kl_coef=0"], "ppo.kl_coef"),
    (["train.dtype=float16"], "float16"),
    # GRPO / RLOO with one sample per prompt: every group's baseline is the sample itself, every advantage 0
    (["ppo.advantage=grpo"], "ppo.samples_per_prompt >= 2"),
    (["ppo.advantage=rloo", "ppo.samples_per_prompt=1"], "ppo.samples_per_prompt >= 2"),
])
def test_silently_wrong_combinations_fail_before_compute(repo, overrides, needle):
    from character.execution.checks import check_config

    with pytest.raises(ConfigError, match=needle):
        check_config(load_config(repo / "configs/tiny.yaml", overrides))


def test_elastic_workers_with_zero3_are_refused_before_training(repo):
    from character.execution.checks import check_stage_config

    cfg = load_config(repo / "configs/tiny.yaml", ["train.num_workers=[1,2]",
                                                   f"train.deepspeed_config={repo / 'configs/deepspeed/zero3.json'}"])
    with pytest.raises(ConfigError, match="train.num_workers.*ZeRO-3"):
        check_stage_config(cfg, "train-ppo")
    # ZeRO-2 resumes on another worker count, and a prompt count that does not divide is padded: accepted
    cfg = load_config(repo / "configs/tiny.yaml", ["train.num_workers=[1,2]", "ppo.prompts_per_iteration=5"])
    check_stage_config(cfg, "train-ppo")


def test_missing_trait_field_names_trait(tmp_path):
    data = {"traits": [{"name": "curiosity", "statement": "I like ideas.", "clarification": "ok"},
                       {"name": "honesty", "clarification": "no statement here"}]}
    with pytest.raises(ConfigError) as err:
        constitution_from_dict(data, "traits.yaml")
    assert "traits.yaml: field 'traits[1] ('honesty').statement'" in str(err.value)


def test_duplicate_and_bad_trait_names():
    with pytest.raises(ConfigError, match="repeats the name 'a'"):
        constitution_from_dict({"traits": [{"name": "a", "statement": "I x", "clarification": "y"}] * 2}, "t.yaml")
    with pytest.raises(ConfigError, match=r"traits\[0\].*name"):
        constitution_from_dict({"traits": [{"name": "Bad Name", "statement": "I x", "clarification": "y"}]}, "t.yaml")


def test_shipped_constitutions(repo):
    big = load_constitution(repo / "configs/traits/constitution.yaml")
    assert len(big.traits) >= 10
    assert all(t.statement.startswith("I") for t in big.traits)
    tiny = load_constitution(repo / "configs/traits/tiny.yaml")
    assert [t.name for t in tiny.traits] == ["curiosity", "honesty", "ai_nature"]


def test_traits_only_picks_a_subset_and_names_unknown_ones(repo):
    path = repo / "configs/traits/constitution.yaml"
    small = load_constitution(path, ["ai_nature", "curiosity"])
    assert [t.name for t in small.traits] == ["curiosity", "ai_nature"]  # the file's order
    with pytest.raises(ConfigError, match=r"traits.only.*no_such_trait.*\(it has: curiosity"):
        load_constitution(path, ["curiosity", "no_such_trait"])
    config = load_config(repo / "configs/small.yaml")
    assert config.model.name == "smollm2-135m-instruct" and len(config.traits.only) == 4
    assert len(load_constitution(config.traits.path, config.traits.only).traits) == 4


@pytest.mark.parametrize("content,needle", [
    ("respond:\n  candidates: one\n", "respond.candidates"),
    ("traits:\n  path: /nonexistent/traits.yaml\n", "traits file not found"),
    ("model:\n  name: ./models/no-such-model\n", "field 'model.name': no such folder"),
    ("run:\n  seed: -1\n", "field 'run.seed': Input should be greater than or equal to 0"),
    ("run:\n  held_out_fraction: 0\n", "field 'run.held_out_fraction'"),
])
def test_cli_fails_before_ray_starts(tmp_path, repo, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "rayjobs.synthesize", "--config", str(path)],
                          cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_cluster_config_validates(repo):
    from character.execution.checks import check_stage_config

    cfg = load_config(repo / "configs/cluster.yaml")
    assert cfg.train.num_workers == 8 and cfg.engine.actors.max == 16
    assert cfg.train_dtype == "bfloat16"  # model.dtype reaches training
    for stage in ("train-pm", "train-ppo"):
        check_stage_config(cfg, stage)
    assert cfg.run.output_dir.startswith("s3://")  # URIs stay URIs; local paths are made absolute


def test_models_that_cannot_load_fail_naming_the_field(tmp_path, repo, monkeypatch):
    """A missing local folder, a folder without config.json, or (offline) a hub id not in the cache: a
    config error naming the field, before any stage starts; built-ins and cached hub ids pass."""
    from character.execution.checks import check_stage_config
    from character.models.loading import model_problem

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at its import
    assert model_problem("tiny-llama") is None and model_problem("smollm2-135m-instruct") is None
    assert model_problem("s3://bucket/run/policy") is None  # checked when fetched
    assert "not in the Hugging Face cache" in model_problem("someorg/not-downloaded")
    cached = tmp_path / "hub" / "models--someorg--cached" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--someorg--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--cached" / "refs" / "main").write_text("abc")
    assert model_problem("someorg/cached") is None
    (tmp_path / "empty").mkdir()
    assert "without config.json" in model_problem(str(tmp_path / "empty"))
    config = load_config(repo / "configs/tiny.yaml", [f"judge.model={tmp_path}/nope/model"])
    check_stage_config(config, "respond")  # respond does not load the judge
    with pytest.raises(ConfigError, match=r"field 'judge.model': no such folder .*nope/model"):
        check_stage_config(config, "rank")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert model_problem("someorg/not-downloaded") is None  # online: the hub may have it
