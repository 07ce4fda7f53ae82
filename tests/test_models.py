import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from character.models.loading import BUILTIN_MODELS, resolve_model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_builtin_model_loads_like_a_hub_model(name):
    path = resolve_model(name)
    assert resolve_model(name) == path  # cached, not rebuilt
    assert (Path(path) / "model.safetensors").is_file() and not list(Path(path).glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    spec = BUILTIN_MODELS[name]
    assert model.config.hidden_size == spec.hidden_size
    assert model.config.tie_word_embeddings == spec.tie_word_embeddings
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert model.config.eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "Are you curious?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == text  # byte-level BPE round-trips
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))


def test_local_path_goes_through_the_same_loader(tmp_path):
    path = resolve_model("tiny-llama")
    assert resolve_model(path) == str(Path(path).resolve())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"  # a hub id passes through


def test_builtin_record(tmp_path):
    record = json.loads((Path(resolve_model("tiny-llama")) / "character_model.json").read_text())
    assert record["builtin"] == "tiny-llama"
