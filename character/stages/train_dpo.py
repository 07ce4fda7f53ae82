"""Stage `train-dpo`: the policy trained by DPO straight from rank's soft-labelled pairs, with no preference
model and no RL (Open Character Training's recipe): `policy.method: dpo` makes `character run` go
rank -> train-dpo -> evaluate.

Ray Train workers each run a DeepSpeed ZeRO engine over the policy (full weights or train.lora) and step
through the pairs with the loop train-pm uses (character/training/pairs.py: data position, accumulation,
non-finite guard, checkpoints and resume). The loss is losses.dpo_loss on the pair's soft label (the
Bradley-Terry target; conservative DPO's label smoothing with epsilon = 1 - p), plus `dpo.nll_coef` times
the chosen response's per-token NLL. The reference log-probs are those of the policy before its first update
(the reference is the model it starts from: the base model, or train-sft's sft/ with policy.sft), computed
once for every pair and carried in every checkpoint (dpo.precompute_reference, the default: benchmarks/recipes.py
measures it against a frozen reference engine scoring each batch). Output: dpo/ (save_pretrained, or the adapter with LoRA) and dpo/metrics.json with
held-out preference accuracy and implicit-reward margins.
"""
from __future__ import annotations

from character.core.config import Config
from character.core.store import StageOutput
from character.execution.pair_stage import run_pair_stage
from character.execution.registry import spec_of
from character.execution.runtime import StageResult
from character.models import lora
from character.models.loading import load_tokenizer, resolve_model
from character.models.lora import adapter_disabled
from character.training.deepspeed_setup import (build_under_zero, deepspeed_config, frozen_engine, full_state_dict,
                                                plain_model_construction, setup_distributed, trainable_policy)
from character.training.losses import chosen_nll, dpo_loss
from character.training.pairs import PairTraining, gather_pair_scores, load_pairs, pair_metrics
from character.training.scoring import response_logprobs
from character.training.stepping import eval_mode

SPEC = spec_of(__name__)


def _logprobs(engine, tokenizer, rows: list[dict], max_length: int):
    """Summed log-probs of chosen and rejected (one forward over both, as TRL's concatenated forward) and the
    chosen responses' token counts."""
    n = len(rows)
    total, tokens = response_logprobs(engine, tokenizer, [r["prompt"] for r in rows] * 2,
                                      [r["chosen"] for r in rows] + [r["rejected"] for r in rows], max_length)
    return total[:n], total[n:], tokens[:n]


class _Reference:
    """Reference log-probs of a pair's chosen and rejected responses: looked up in the table computed once
    (precompute), or scored per batch by a frozen reference engine (or, with LoRA, the policy with its adapter
    disabled)."""

    def __init__(self, engine, reference, tokenizer, cfg, table: dict | None):
        self.engine, self.reference, self.tokenizer, self.cfg, self.table = engine, reference, tokenizer, cfg, table

    def score(self, rows: list[dict]):
        import torch

        if self.table is not None:
            return (torch.tensor([self.table[r["pair_id"]][0] for r in rows]),
                    torch.tensor([self.table[r["pair_id"]][1] for r in rows]))
        with torch.no_grad():
            if self.reference is not None:
                return _logprobs(self.reference, self.tokenizer, rows, self.cfg.max_length)[:2]
            with eval_mode(self.engine), adapter_disabled(self.engine):
                return _logprobs(self.engine, self.tokenizer, rows, self.cfg.max_length)[:2]


def reference_table(engine, tokenizer, rows: list[dict], cfg, rank: int, world: int) -> dict:
    """{pair_id: (log ref(chosen), log ref(rejected))} for every pair, computed by the policy before its first
    update (it is the reference then: the base model, or a LoRA model whose B matrices are still 0), in eval
    mode, shared by all ranks."""
    import torch

    def score(chunk):
        chosen, rejected, _ = _logprobs(engine, tokenizer, chunk, cfg.max_length)
        return chosen.tolist(), rejected.tolist()

    with torch.no_grad(), eval_mode(engine):
        chosen, rejected = gather_pair_scores(rows, rank, world, cfg.micro_batch_size, score)
    return {r["pair_id"]: (c, j) for r, c, j in zip(rows, chosen, rejected)}


def train_loop(loop_config: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = Config.model_validate(loop_config["config"])
    cfg = config.dpo
    setup_distributed(config.train.use_gpu)
    torch.manual_seed(config.run.seed)
    tokenizer = load_tokenizer(config.model.name)
    train, held, _ = load_pairs(config.run.output_dir, cfg.eval_fraction, loop_config.get("review_marks"),
                                cfg.pairs_per_message)
    world = torch.distributed.get_world_size()
    ds = deepspeed_config(config.train, cfg.micro_batch_size, cfg.grad_accum, world, config.train_dtype)
    # The policy's start and its reference: the base model, or sft/ with policy.sft.
    engine, model = trainable_policy(config.start_model, config.train, ds, config.train_dtype, lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
    training = PairTraining(config, cfg, {"policy": engine}, train, SPEC.output, loop_config.get("tracking"))
    table = None
    if cfg.precompute_reference:
        table = training.state.get("reference") or reference_table(engine, tokenizer, train + held, cfg,
                                                                  training.rank, training.world)
    frozen = None if cfg.precompute_reference or config.train.lora.enabled else frozen_engine(build_under_zero(
        lambda: AutoModelForCausalLM.from_pretrained(resolve_model(config.start_model),
                                                     dtype=getattr(torch, config.train_dtype)), ds), ds)
    reference = _Reference(engine, frozen, tokenizer, cfg, table)

    def labels(rows):
        return torch.tensor([r["p_chosen"] if cfg.soft_labels else 1.0 for r in rows], dtype=torch.float32)

    def micro_loss(rows: list[dict]):
        chosen, rejected, tokens = _logprobs(engine, tokenizer, rows, cfg.max_length)
        ref_chosen, ref_rejected = reference.score(rows)
        loss, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, labels(rows), cfg.beta)
        return loss + cfg.nll_coef * chosen_nll(chosen, tokens) if cfg.nll_coef else loss

    def implicit_rewards(rows):
        chosen, rejected, _ = _logprobs(engine, tokenizer, rows, cfg.max_length)
        ref_chosen, ref_rejected = reference.score(rows)
        return (cfg.beta * (chosen - ref_chosen)).tolist(), (cfg.beta * (rejected - ref_rejected)).tolist()

    def evaluate() -> dict:
        with torch.no_grad(), eval_mode(engine):
            chosen, rejected = gather_pair_scores(held, training.rank, training.world, cfg.micro_batch_size,
                                                  implicit_rewards)
        return pair_metrics(chosen, rejected, labels(held).tolist(), [r["trait"] for r in held], 0.0,
                            cfg.calibration_bins)

    summary = training.run(micro_loss, evaluate, {"reference": table} if table is not None else {})
    weights = full_state_dict(engine, dtype=config.model.dtype)  # a collective: every rank
    plain_model_construction()
    if training.rank == 0:
        lora.export("policy", config.train.lora, AutoModelForCausalLM, model.config, weights, tokenizer,
                    StageOutput(config.run.output_dir, SPEC.output).uri, config.start_model, config.export.merged,
                    files={"metrics.json": {**summary, "eval_pairs_total": len(held), "beta": cfg.beta,
                                            "reference": "precomputed" if table is not None else "online",
                                            "reference_model": config.start_model,
                                            **lora.parameter_counts(model)}})


def run(config: Config, force: bool = False) -> StageResult:
    result, metrics = run_pair_stage(config, SPEC, "dpo", train_loop, force)
    if metrics is not None:
        print(f"[train-dpo] held-out preference accuracy {metrics['eval_accuracy']:.3f} (implicit rewards), loss "
              f"{metrics['eval_loss']:.4f}, mean margin {metrics['eval_mean_margin']:.3f} over "
              f"{metrics['eval_pairs']} pairs; per trait {metrics['per_trait_accuracy']}", flush=True)
    return result
