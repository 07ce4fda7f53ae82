"""Stage `train-sft`: supervised fine-tuning of the policy on its own in-character answers, shown the message
without the trait (context distillation), before the preference model and RL (`policy.sft: true` makes
`character run` go rank -> train-sft -> train-pm -> train-ppo, or rank -> train-sft -> train-dpo, and every
later stage starts from sft/: Config.start_model).

The targets (character/data/sft_data.py, character/training/sft.py) by sft.source: each training message's best
candidate by rank's ranking, every candidate, or the best one critiqued and revised by the model through the vLLM
pool in Ray Data (character/judging/revision.py; sft/revisions/). The loss is the mean NLL of the answer's tokens
only (losses.completion_nll), the prompt's masked. Ray Train workers each run a DeepSpeed ZeRO engine (full weights
or train.lora) through the step loop train-pm and train-dpo use (character/training/pairs.py: data position,
accumulation, non-finite guard, checkpoints with every rank's RNG, resume). The held-out NLL per trait, on
messages of the `train` split carved out by message, is measured before the first update (carried in the
checkpoints) and after the last. Output: sft/ (save_pretrained, or the adapter with LoRA) and sft/metrics.json.
"""
from __future__ import annotations

from collections import Counter

from character.core.config import Config
from character.core.store import StageInputError, StageOutput
from character.core.traits import Constitution
from character.data.sft_data import split_examples, system_prompts
from character.execution.registry import spec_of
from character.execution.runtime import StageResult, consume_counts, format_counts, upstream_cause
from character.execution.stage_run import run_stage
from character.inference.engine import engine_sized_blocks, generation_pool_args
from character.judging.revision import REVISIONS, Reviser
from character.models import lora
from character.models.loading import load_tokenizer
from character.review.marks import active_constitution, load_marks, review_fingerprint
from character.training.checkpoints import check_resume_settings, trainer_for
from character.training.deepspeed_setup import (deepspeed_config, full_state_dict, plain_model_construction,
                                                setup_distributed, trainable_policy)
from character.training.losses import completion_nll
from character.training.pairs import PairTraining
from character.training.sft import candidates_to_train, held_out_nll, load_targets, target_logprobs
from character.training.stepping import eval_mode

SPEC = spec_of(__name__)


def train_loop(loop_config: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = Config.model_validate(loop_config["config"])
    cfg = config.sft
    setup_distributed(config.train.use_gpu)
    torch.manual_seed(config.run.seed)
    tokenizer = load_tokenizer(config.model.name)
    train, held, _ = load_targets(config, loop_config.get("review_marks"))
    systems = system_prompts(Constitution.model_validate_json(loop_config["constitution"]), cfg.system_prompt)
    world = torch.distributed.get_world_size()
    ds = deepspeed_config(config.train, cfg.micro_batch_size, cfg.grad_accum, world, config.train_dtype)
    engine, model = trainable_policy(config.model.name, config.train, ds, config.train_dtype, lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
    training = PairTraining(config, cfg, {"policy": engine}, train, SPEC.output, loop_config.get("tracking"))

    def evaluate() -> dict:
        with eval_mode(engine):
            metrics = held_out_nll(engine, tokenizer, held, systems, cfg.max_length, cfg.micro_batch_size,
                                   training.rank, training.world)
        return {**metrics, "eval_loss": metrics["eval_nll"]}

    # The held-out NLL before the first update: measured once, carried in every checkpoint (a resumed run's
    # model is no longer the one it started from).
    before = training.state.get("nll_before") or evaluate()

    def micro_loss(rows: list[dict]):
        return completion_nll(*target_logprobs(engine, tokenizer, rows, systems, cfg.max_length))

    summary = training.run(micro_loss, evaluate, {"nll_before": before})
    weights = full_state_dict(engine, dtype=config.model.dtype)  # a collective: every rank
    plain_model_construction()
    if training.rank == 0:
        metrics = {**summary, "eval_nll_before": before["eval_nll"], "per_trait_nll_before": before["per_trait_nll"],
                   "source": cfg.source, "system_prompt": cfg.system_prompt, "train_examples": len(train),
                   **lora.parameter_counts(model)}
        lora.export("policy", config.train.lora, AutoModelForCausalLM, model.config, weights, tokenizer,
                    StageOutput(config.run.output_dir, SPEC.output).uri, config.model.name, config.export.merged,
                    files={"metrics.json": metrics})


def revise(config: Config, out: StageOutput, constitution: Constitution, marks) -> None:
    """sft.source revised: every target not yet revised (or set aside) goes through the critique-and-revision
    rounds in the vLLM pool; an interrupted run resumes with the rest."""
    import ray.data

    todo, _ = candidates_to_train(config, marks)
    done = out.ids("message_id", REVISIONS) | out.ids("row_id", REVISIONS, "rejected")
    rows = [{"message_id": t["message_id"], "trait": t["trait"], "prompt": t["message"], "original": t["response"]}
            for t in todo if t["message_id"] not in done]
    if not rows:
        return
    ds = engine_sized_blocks(ray.data.from_items(rows), config.engine).map_batches(
        Reviser, fn_constructor_kwargs=dict(config_json=config.model_dump_json(),
                                            constitution_json=constitution.model_dump_json(), out=out),
        **generation_pool_args(config.engine))
    consume_counts(ds, "train-sft: revise", len(rows))


def _check_targets(config: Config, train: list, held: list, set_aside: list) -> None:
    if train and held:
        return
    drops = format_counts(Counter(r["reason"] for r in set_aside), "nothing set aside")
    upstream = upstream_cause(StageOutput(config.run.output_dir, "preferences" if config.sft.source != "all"
                                          else "responses"))
    raise StageInputError(
        f"train-sft: {len(train)} training and {len(held)} held-out targets (sft.source {config.sft.source}, "
        f"sft.eval_fraction {config.sft.eval_fraction}; set aside: {drops}; {upstream}): each side needs at least "
        f"one; synthesize more messages (synthesize.messages_per_trait) or change sft.eval_fraction")


def run(config: Config, force: bool = False) -> StageResult:
    metrics: dict = {}

    def inputs(out: StageOutput):
        marks = load_marks(config.run.output_dir)
        constitution = active_constitution(config, SPEC.name, marks=marks)
        targets, set_aside = candidates_to_train(config, marks)
        if config.sft.source != "revised":
            _check_targets(config, *split_examples(targets, config.sft.eval_fraction), set_aside)
        elif not targets:  # the revised targets are made by the revision pass, after Ray starts
            _check_targets(config, [], [], set_aside)
        # Checkpoints resume only on the same targets: a review that sets others aside needs --force.
        check_resume_settings(config, SPEC.output, {"review_set_aside": review_fingerprint(
            [{"message_id": r["row_id"], "reason": r["reason"]} for r in set_aside])})
        return marks, constitution

    def work(out: StageOutput, result: StageResult, found) -> None:
        marks, constitution = found
        if config.sft.source == "revised":
            revise(config, out, constitution, marks)
        train, held, set_aside = load_targets(config, marks)
        _check_targets(config, train, held, set_aside)
        trainer_for(config, train_loop, {"config": config.model_dump(mode="json"), "review_marks": marks,
                                         "constitution": constitution.model_dump_json()}, SPEC.output).fit()
        metrics.update(out.read_json("metrics.json"))
        result.rows_in = len(train) + len(held) + len(set_aside)
        result.rows_out = len(train)
        result.drops.update(r["reason"] for r in set_aside)
        result.extra = {k: metrics.get(k) for k in ("eval_nll_before", "eval_nll", "steps", "skipped_steps", "source")}

    result = run_stage(config, SPEC, force, work, inputs)
    if not result.skipped:
        print(f"[train-sft] held-out NLL per answer token {metrics['eval_nll_before']:.4f} -> "
              f"{metrics['eval_nll']:.4f} over {metrics['eval_examples']} targets (sft.source {metrics['source']}); "
              "per trait " + ", ".join(f"{t} {metrics['per_trait_nll_before'].get(t, float('nan')):.3f} -> {v:.3f}"
                          for t, v in metrics["per_trait_nll"].items()), flush=True)
    return result
