"""The config sections of the training stages (train-sft, train-pm, train-ppo, train-dpo) and the Ray Train + DeepSpeed
settings they share: each field's `description` is its documentation (docs/config.md,
`character.pipeline.config_help`).

`character.core.config` assembles them into `Config`; import them from there.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from character.core.config_sections import SamplingConfig, Strict


class LoraConfig(Strict):
    """Low-rank adapters (peft) instead of training every weight, for train-pm and train-ppo: the base weights
    stay frozen and carry no gradient or optimizer state. rank 0 (the default) trains all weights, as
    OpenRLHF's `--lora_rank 0`. The PM's score head, the critic's value head are trained whole."""

    rank: int = Field(0, ge=0, description=(
        "r of W + (alpha / r) B A; 0: no adapters, every weight is trained. Open Character Training uses 64."))
    alpha: float = Field(16.0, gt=0, description="Scale alpha / r (OCT: 128 at rank 64).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input (peft's lora_dropout).")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description=(
        "Module names (peft matching: \"q_proj\" matches every layer's q_proj), or \"all-linear\": every linear "
        "layer but the output head."))

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class TrainConfig(Strict):
    """Ray Train + DeepSpeed settings shared by the preference-model and PPO stages."""

    num_workers: int | tuple[int, int] = Field(2, description=(
        "A number, or [min, max] for an elastic worker group (Ray Train V2 resizes it as nodes come and go; "
        "the global batch then scales with the workers present)."))
    use_gpu: bool = Field(False, description=(
        "One GPU per training worker (NCCL); false: CPU workers (gloo)."))
    cpus_per_worker: float = Field(1, gt=0, description=(
        "CPUs reserved per worker; OpenMP threads per CPU worker follow this."))
    deepspeed_config: str = Field("configs/deepspeed/zero2.json", description=(
        "DeepSpeed JSON (ZeRO stage, optimizer settings); its batch sizes and precision are set from this config."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "Weights and activations of the trained and frozen models (PM, policy, critic, reference); \"auto\": "
        "model.dtype. bfloat16/float16 add the matching section to the DeepSpeed config (fp32 master weights in "
        "the optimizer); losses, advantages and log-probabilities are computed in fp32 either way. Exports are in "
        "model.dtype: bf16 training of a float32 model exports the fp32 master weights."))
    max_failures: int = Field(1, ge=-1, description=(
        "Ray Train FailureConfig: restarts from the latest checkpoint (-1: no limit)."))
    checkpoint_every: int = Field(20, ge=1, description=(
        "Steps between checkpoints (train-pm and train-dpo: optimizer steps; train-ppo: iterations)."))
    keep_checkpoints: int = Field(2, ge=1, description="Latest checkpoints kept (Ray Train's num_to_keep).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description=(
        "Low-rank adapters (peft) instead of training every weight; rank 0 (the default) trains all weights."))

    @model_validator(mode="after")
    def _workers(self) -> TrainConfig:
        low, high = (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else self.num_workers
        if not 1 <= low <= high:
            raise ValueError("num_workers must be >= 1 (or [min, max] with 1 <= min <= max)")
        return self


class StepLoopConfig(Strict):
    """What train-sft, train-pm and train-dpo share: the step loop over a fixed list of examples
    (character/training/pairs.py), its data position, accumulation, guard, evaluation and checkpoints."""

    epochs: int = Field(2, ge=1, description="Passes over the training pairs.")
    max_steps: int | None = Field(None, ge=1, description=(
        "Stop after this many optimizer steps (None: when the epochs are done)."))
    micro_batch_size: int = Field(8, ge=1, description="Pairs per worker per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(256, ge=8, description=(
        "Most tokens of prompt and response per sequence; a longer one keeps the prompt's end and the "
        "response's start."))
    eval_fraction: float = Field(0.2, gt=0, lt=1, description=(
        "Validation pairs, by message, out of the `train` split."))
    eval_every: int = Field(0, ge=0, description="Steps; 0: at each checkpoint and at the end.")
    max_nonfinite_in_row: int = Field(3, ge=1, description=(
        "Consecutive steps skipped for a non-finite loss or gradient norm that stop the run."))


class PairTrainingConfig(StepLoopConfig):
    """What train-pm and train-dpo share: both step through the same preference pairs (character/training/pairs.py)."""

    calibration_bins: int = Field(5, ge=1, description=(
        "Confidence bins of the validation calibration (accuracy by confidence)."))
    pairs_per_message: int | None = Field(None, ge=1, description=(
        "Train on at most this many pairs per message, its clearest (soft label farthest from 0.5); the rest are "
        "set aside as `pairs_per_message`. Validation keeps every pair, so rank.pairs all with a cap of 1 trains "
        "on one pair per message and validates on all of them (None: train on every pair)."))


class RevisionConfig(Strict):
    """sft.source revised: Constitutional AI's supervised phase. The model critiques an answer against its trait,
    then rewrites it in the light of the critique; `rounds` times, each round revising the last revision."""

    model: str | None = Field(None, description=(
        "The model that critiques and revises (None: the policy, model.name, as in Constitutional AI); a larger "
        "model makes a teacher, as Open Character Training's: a 135M model's critiques and revisions are rarely "
        "usable (benchmarks/sft.py)."))
    rounds: int = Field(1, ge=1, le=8, description="Critique-then-revise rounds per answer.")
    critique_sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.95, max_tokens=96),
        description="Sampling of each critique.")
    revision_sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.95, max_tokens=128),
        description="Sampling of each revision; a revision cut off at max_tokens is set aside (truncated).")


class SFTConfig(StepLoopConfig):
    """train-sft: supervised fine-tuning on the model's own in-character answers, shown the message without the
    trait's system prompt (context distillation, Askell et al. 2021), the loss on the answer's tokens only."""

    source: Literal["best", "all", "revised"] = Field("best", description=(
        "best: each training message's best candidate by rank's ranking (best-of-K, rejection-sampling SFT); all: "
        "every candidate (pure context distillation); revised: the best candidate critiqued against the trait "
        "and revised by the model (Constitutional AI's supervised phase; sft.revision)."))
    system_prompt: Literal["none", "trait", "constitution"] = Field("none", description=(
        "What the training prompt shows before the message: none (the default: the trait becomes the model's own, "
        "not its prompt's), the trait's system prompt, or the whole constitution's."))
    revision: RevisionConfig = Field(default_factory=RevisionConfig, description=(
        "source revised: the critique and revision rounds through the vLLM pool."))
    lr: float = Field(2e-5, gt=0, description="AdamW learning rate (TRL's SFTConfig default).")
    epochs: int = Field(2, ge=1, description="Passes over the training targets.")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description=(
        "Held-out messages, out of the `train` split, whose targets measure the held-out NLL before and after; "
        "carved out by message with the preference model's hash, so at equal fractions the PM validates on "
        "messages SFT never trained on."))


class PMConfig(PairTrainingConfig):
    base_model: str | None = Field(None, description="None: the policy model (model.name).")
    margin: float = Field(0.0, ge=0, description=(
        "Margin m of the Bradley-Terry loss: the preferred side must win by at least m."))
    score_pairs: bool = Field(True, description=(
        "Score every pair (training and validation) with the trained PM into pm/pair_scores.parquet, which "
        "`character review` shows next to each pair: one forward pass over the pairs after the last step."))


class DPOConfig(PairTrainingConfig):
    """DPO on rank's pairs (train-dpo): -[p log sigma(h) + (1 - p) log sigma(-h)], h = beta * ((log pi(chosen) -
    log ref(chosen)) - (log pi(rejected) - log ref(rejected))), with p the pair's soft label: the soft label
    is the Bradley-Terry target, which is conservative DPO's label smoothing with epsilon = 1 - p per pair."""

    lr: float = Field(5e-6, gt=0, description="AdamW learning rate of the policy.")
    beta: float = Field(0.1, gt=0, description=(
        "beta of h = beta * (log-ratio difference); Open Character Training and TRL: 0.1."))
    soft_labels: bool = Field(True, description="False: every pair counts as p = 1 (plain DPO).")
    nll_coef: float = Field(0.0, ge=0, description=(
        "Weight of the NLL of `chosen` added to the loss (RPO; Open Character Training: 0.1): each answer's mean "
        "per-token NLL, averaged over pairs (TRL's rpo_alpha pools the batch's tokens instead)."))
    precompute_reference: bool = Field(True, description=(
        "True: the reference log-probs of every pair are computed once, by the policy before its first update, "
        "and kept in the checkpoints; False: a frozen reference model scores each batch (TRL's default)."))


class AsyncRolloutConfig(Strict):
    """train-ppo's rollouts generated ahead of training: the engines sample the next batches while the workers
    score and train on this one (character/training/ppo/inflight.py)."""

    enabled: bool = Field(False, description=(
        "Generate batch i+1 (up to max_staleness batches ahead) while the workers train on batch i. Worth it where "
        "generation takes a large share of an iteration and engines and trainers have their own GPUs or cores "
        "(docs/cluster.md); off, generation and training alternate."))
    max_staleness: int = Field(1, ge=0, description=(
        "How many policy versions a batch may lag the weights it is trained on (0: the synchronous loop). A batch "
        "that arrives older stops the run. Each sample carries the version that generated it; the ratio is "
        "corrected by ppo.tis_cap."))


class PPOConfig(Strict):
    reward: Literal["pm", "judge", "rule"] = Field("pm", description=(
        "pm: the trained preference model; judge: the contrast judge's own score of each answer, with no PM in "
        "between (\"direct RLAIF\", Lee et al. 2023; needs judge.kind contrast; judge.model, else the base model, "
        "frozen); rule: judge.rule's score."))
    advantage: str = Field("gae", description=(
        "The advantage estimator, by its registered name (character/training/estimators.py, checked before any "
        "stage starts): gae, PPO with a critic; grpo / rloo, no critic, `samples_per_prompt` samples per prompt "
        "and the group as the baseline (GRPO: reward minus the group mean over the group std, or with group_std "
        "false over nothing as Dr. GRPO; RLOO: minus the mean of the other samples)."))
    policy_loss: str = Field("clip", description=(
        "The policy loss, by its registered name (character/training/estimators.py, checked before any stage "
        "starts): clip, PPO's clipped surrogate."))
    samples_per_prompt: int = Field(1, ge=1, description="K: one vLLM request with n = K per prompt.")
    group_std: bool = Field(True, description="grpo only: divide by the group's std (false: Dr. GRPO).")
    kl_penalty: Literal["reward", "loss"] = Field("reward", description=(
        "reward: -kl_coef * KL in the per-token reward (PPO, InstructGPT); loss: kl_coef * KL to the reference "
        "added to the policy loss (GRPO), the reward left as the scorer gave it. Either way the KL is "
        "kl_estimator's."))
    critic_init: Literal["pm", "policy"] = Field("pm", description=(
        "gae only: the critic starts from the preference model or from the policy."))
    iterations: int = Field(20, ge=1, description="Rollout-and-train iterations.")
    prompts_per_iteration: int = Field(32, ge=1, description=(
        "Global; a count that does not divide by the workers is padded with zero-weight rows (never cut)."))
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=32),
        description="Sampling of the rollouts (samples_per_prompt samples per prompt).")
    max_prompt_tokens: int = Field(192, ge=8, description="Longer prompts are cut from the left.")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each iteration's rollouts.")
    minibatch_size: int = Field(8, ge=1, description="Sequences per worker per optimizer step.")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate of the policy.")
    critic_lr: float = Field(1e-5, gt=0, description="AdamW learning rate of the critic (gae only).")
    clip: float = Field(0.2, gt=0, description="Clip range of the policy's probability ratio (1 +- clip).")
    value_clip: float = Field(0.2, gt=0, description="Clip range of the critic's value change (gae only).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount of the GAE returns (gae only).")
    lam: float = Field(0.95, ge=0, le=1, description="lambda of GAE (gae only).")
    kl_coef: float = Field(0.05, ge=0, description=(
        "Coefficient of the KL to the reference (where it enters: kl_penalty); the starting value under kl_target."))
    kl_target: float | None = Field(None, gt=0, description=(
        "None: fixed coefficient; else adaptive towards this KL."))
    kl_horizon: int = Field(10000, ge=1, description=(
        "Adaptive KL (Ziegler et al.): each iteration multiplies the coefficient by 1 + e * samples / kl_horizon, "
        "e the KL's relative error clipped to [-0.2, 0.2]."))
    kl_estimator: Literal["k1", "k2", "k3"] | None = Field(None, description=(
        "Per-token KL estimate: k1 = log p - log q (unbiased, can be negative); k2 = (log p - log q)^2 / 2 "
        "(biased, >= 0); k3 = (r - 1) - log r, r = q / p (unbiased, >= 0). Unset: k1 under kl_penalty reward, k3 "
        "under loss (verl's defaults: k1's gradient in a loss has expectation zero)."))
    whiten_advantages: bool = Field(True, description=(
        "Normalise the advantages to zero mean and unit variance per batch (gae only)."))
    truncation_penalty: float = Field(0.0, description=(
        "Added to the score of a response cut off at max_tokens."))
    eval_fraction: float = Field(0.1, gt=0, lt=1, description=(
        "Validation prompts for the held-out reward curve, by message_id, out of the `train` split (evaluation's "
        "held-out messages are never shown to PPO)."))
    eval_prompts: int = Field(32, ge=1, description="Validation prompts scored at each evaluation.")
    eval_every: int = Field(5, ge=1, description=(
        "Iterations between held-out reward evaluations (also before the first and after the last)."))
    rollout_engines: int = Field(1, ge=1, description=(
        "vLLM rollout engine actors; training worker i generates with engine i mod rollout_engines."))
    max_nonfinite_in_row: int = Field(3, ge=1, description=(
        "Consecutive steps skipped for a non-finite loss or gradient norm that stop the run."))
    forward_batch_size: int = Field(4, ge=1, description=(
        "Sequences per forward pass when scoring (policy, reference, critic, PM) and per backward pass in "
        "training (minibatch_size is split into forward_batch_size pieces, gradients accumulated): bounds the "
        "logits kept at once whatever prompts_per_iteration is."))
    logits_chunk: int = Field(128, ge=1, description=(
        "Sequence positions per fp32 log-softmax when reading log-probs."))
    async_: AsyncRolloutConfig = Field(default_factory=AsyncRolloutConfig, alias="async", description=(
        "Asynchronous rollouts: generation overlaps training, with bounded staleness."))
    tis_cap: float | None = Field(2.0, ge=1, description=(
        "Truncated importance sampling (verl's TIS, Yao et al. 2025): each token's policy loss is weighted by "
        "min(pi_old / pi_behaviour, tis_cap), pi_old the trainer's log-prob before the update, pi_behaviour the "
        "vLLM engine's that sampled it (an older version with async rollouts; other kernels or dtype even "
        "without). null: no correction (the gap is still logged as behaviour_logprob_gap)."))

    @property
    def kl(self) -> str:
        """The KL estimator used: kl_estimator, or where unset k1 in the reward and k3 in the loss."""
        return self.kl_estimator or ("k3" if self.kl_penalty == "loss" else "k1")
