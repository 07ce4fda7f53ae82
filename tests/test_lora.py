"""character/models/lora.py without Ray: engine names, fused groups, merged weights, export and loading."""
from pathlib import Path

import pytest
import torch

from character.models import lora
from character.core.config import LoraConfig


def test_engine_names_drop_the_peft_prefix_only():
    assert lora.engine_name("base_model.model.model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert lora.engine_name("model.layers.0.mlp.up_proj") == "model.layers.0.mlp.up_proj"


def test_a_module_of_a_fused_group_is_pushed_with_its_whole_group_layer_by_layer():
    adapted = ["model.layers.10.self_attn.v_proj", "model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj",
               "model.layers.2.mlp.up_proj"]
    assert lora.modules_to_push(adapted) == [
        "model.layers.2.mlp.down_proj", "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj",
        "model.layers.2.self_attn.k_proj", "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj",
        "model.layers.10.self_attn.k_proj", "model.layers.10.self_attn.q_proj", "model.layers.10.self_attn.v_proj"]
    assert lora.modules_to_push(["model.layers.0.self_attn.o_proj"]) == ["model.layers.0.self_attn.o_proj"]


def _peft(kind="policy", targets=("q_proj", "v_proj"), name="tiny-qwen2"):
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from character.models.loading import load_causal_lm, resolve_model

    settings = LoraConfig(rank=4, alpha=8, target_modules=list(targets))
    base = load_causal_lm(name) if kind == "policy" else AutoModelForSequenceClassification.from_pretrained(
        resolve_model(name), num_labels=1)
    model = get_peft_model(base, lora.peft_config(settings, kind))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # B starts at zero: make the adapters do something
    return model, settings


def test_merged_weights_are_peft_merge_and_unload_and_leave_the_model_alone():
    model, _ = _peft()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = lora.merged_weights(model)
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # not merged in place
    # q/v adapted; k (and the q/k/v biases of Qwen2) pushed with them; nothing else
    assert sorted({k.split(".self_attn.")[1] for k in weights}) == [
        "k_proj.bias", "k_proj.weight", "q_proj.bias", "q_proj.weight", "v_proj.bias", "v_proj.weight"]
    full = model.merge_and_unload().state_dict()
    for k, v in weights.items():
        assert torch.allclose(v, full[k], atol=1e-6), k


def test_heads_are_trained_whole_and_kept_out_of_the_adapters():
    model, _ = _peft(kind="pm", targets=("q_proj",))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".score.modules_to_save." in n for n in trained)
    assert all("lora_" in n or ".score." in n for n in trained)
    counts = lora.parameter_counts(model)
    assert 0 < counts["trainable_parameters"] < counts["total_parameters"]


def test_an_adapter_only_export_is_merged_on_load_and_a_merged_export_is_a_plain_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from character.core.config import ConfigError
    from character.models.loading import load_causal_lm, load_tokenizer, model_problem, resolve_model

    model, settings = _peft()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = load_tokenizer("tiny-qwen2")
    for merged in (False, True):
        out = tmp_path / f"policy-{merged}"
        lora.export("policy", settings, AutoModelForCausalLM, model.config, weights, tokenizer, str(out),
                    "tiny-qwen2", merged=merged, files={"metrics.json": {"merged": merged}})
        assert (out / "adapter" / "adapter_config.json").is_file() and (out / "metrics.json").is_file()
        assert (out / "model.safetensors").is_file() == merged
        assert model_problem(str(out)) is None
        loaded = AutoModelForCausalLM.from_pretrained(resolve_model(str(out)))
        with torch.no_grad():
            assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-4), merged
    adapter = PeftModel.from_pretrained(load_causal_lm("tiny-qwen2"), tmp_path / "policy-False" / "adapter")
    with torch.no_grad():
        assert torch.allclose(adapter(input_ids=ids).logits, expected, atol=1e-5)
    with pytest.raises(ConfigError, match="train.lora.target_modules"):
        lora.wrap(load_causal_lm("tiny-qwen2"), LoraConfig(rank=2, target_modules=["no_such_proj"]), "policy")


def test_lora_settings_are_validated_and_part_of_the_resume_settings(tmp_path):
    from character.core.config import ConfigError, config_from_dict
    from character.training.checkpoints import RESUME_SETTINGS

    assert not config_from_dict({}).train.lora.enabled
    assert config_from_dict({}, overrides=["train.lora.rank=8"]).train.lora.enabled
    with pytest.raises(ConfigError, match="train.lora.rank"):
        config_from_dict({}, overrides=["train.lora.rank=-1"])
    with pytest.raises(ConfigError, match="train.lora.dropout"):
        config_from_dict({}, overrides=["train.lora.dropout=1.5"])
    assert all("train.lora" in settings for settings in RESUME_SETTINGS.values())


def test_target_modules_that_match_no_layer_are_a_config_error_before_any_compute(tmp_path):
    from character.core.config import ConfigError, config_from_dict
    from character.execution.checks import check_stage_config

    good = config_from_dict({"run": {"output_dir": str(tmp_path)}}, overrides=[
        "train.lora.rank=4", "train.lora.target_modules=[self_attn.q_proj,v_proj]"])
    check_stage_config(good, "train-ppo")
    bad = config_from_dict({"run": {"output_dir": str(tmp_path)}}, overrides=[
        "train.lora.rank=4", "train.lora.target_modules=[q_proj,query_key_value]"])
    for stage in ("train-pm", "train-ppo"):
        with pytest.raises(ConfigError, match=r"field 'train.lora.target_modules': \['query_key_value'\] match no "
                                              r"linear layer of tiny-llama \(its linear layers: down_proj, gate_proj"):
            check_stage_config(bad, stage)


def test_checkpoints_from_before_lora_resume_without_it_and_are_refused_with_it(tmp_path):
    import json

    from character.core.config import ConfigError, config_from_dict
    from character.training.checkpoints import SETTINGS_FILE, check_resume_settings, resume_settings

    plain = config_from_dict({"run": {"output_dir": str(tmp_path)}})
    state = tmp_path / "_train" / "policy"
    (state / "checkpoint_000000").mkdir(parents=True)
    older = {k: v for k, v in resume_settings(plain, "policy").items() if k != "train.lora"}
    (state / SETTINGS_FILE).write_text(json.dumps(older))
    check_resume_settings(plain, "policy")
    with pytest.raises(ConfigError, match=r"train.lora: \{'rank': 0, .* in the checkpoint, \{'rank': 8"):
        check_resume_settings(config_from_dict({"run": {"output_dir": str(tmp_path)}},
                                               overrides=["train.lora.rank=8"]), "policy")


def test_an_adapter_is_merged_whole_by_a_ray_train_worker_of_rank_1(tmp_path, monkeypatch):
    """A worker of rank 1 can be the first to need a merged adapter (train-dpo starting from an adapter-only sft/):
    the cached folder it publishes must hold the model. transformers 5's save_pretrained writes nothing but on rank
    0 (a torch.distributed process of another rank got a folder with only a tokenizer in the pipeline test)."""
    from transformers import AutoModelForCausalLM

    from character.models.loading import load_tokenizer, resolve_model

    model, settings = _peft()  # tiny-qwen2: tied embeddings, written once
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = tmp_path / "sft"
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lora.export("policy", settings, AutoModelForCausalLM, model.config, weights, load_tokenizer("tiny-qwen2"), str(out),
                "tiny-qwen2", merged=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    merged = resolve_model(str(out))
    monkeypatch.undo()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in Path(merged).iterdir()}
    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits, expected, atol=1e-4)
