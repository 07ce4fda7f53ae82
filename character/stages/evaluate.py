"""Stage `evaluate`: how each trait changed the model's behaviour, base vs trained.

On the held-out messages (never trained on, nor any near-copy of them) and the adversarial ones
synthesised for evaluation (pushing the model off its character), both from messages/ where `synthesize`
split them (character/data/splits.py), both models answer with the same sampling settings and seeds; every response
gets the preference model's score, and each trained/base pair of the same sample is judged in both
orders. The frozen base model is the ruler of the measures that see a small model change
(character/reporting/eval_summary.py): every answer's per-token trait contrast under its own trait and under
every other trait of the run (the interference matrix), and the base's log-probability of it (the KL estimate);
every answer is matched against its trait's probes; and each model answers the built-in capability questions
greedily (character/reporting/capability.py). The trained model is train-ppo's policy/ or, with policy.method
dpo, train-dpo's dpo/; the score is then the DPO implicit reward, as no PM is trained
(character/training/scoring.py evaluation_scorer). With
policy.sft, train-sft's sft/ answers too and is judged against the base the same way: summary.json's `sft`
block says what SFT alone added, its top level what SFT then RL did. Output:
eval/part-*.parquet (message x model x sample), eval/capability.json (every model's reply to every capability
question, and whether it counts as right) and eval/summary.json per trait and split, with intervals clustered
by message (character/reporting/evalstats.py).
"""
from __future__ import annotations

import math
import re

import pyarrow as pa

from character.core import schemas
from character.core.config import Config, SamplingConfig
from character.core.store import StageInputError, StageOutput, seed_from_id
from character.core.traits import Constitution
from character.data.prompts import character_system_prompt
from character.data.splits import HELD_OUT, evaluation_messages
from character.execution.registry import spec_of
from character.execution.runtime import StageResult, batch_key, consume_counts, upstream_cause
from character.execution.stage_run import run_stage
from character.inference.engine import ChatGenerator, actor_pool_args, engine_sized_blocks, generation_pool_args
from character.judging.judge import Comparison, build_judge, contrast_prob, judge_name
from character.judging.ruler import BaseRuler, KeptLogprobs
from character.judging.ranking import soft_label
from character.reporting.capability import (CAPABILITY_SPLIT, capability_accuracy, capability_items,
                                            capability_message_id, capability_prompts)
from character.reporting.eval_summary import capability_block, summarise, verdict
from character.review.marks import active_constitution
from character.training.scoring import evaluation_scorer

SPEC = spec_of(__name__)
COMPARED = ("trained", "sft")  # the models judged against the base, each on the base's answer of the same sample
# The models asked the capability questions: the alignment tax is final vs base, and SFT's share of it.
CAPABILITY = ("base", "sft", "trained")
RULER_KEPT = ("_work", "ruler")  # under eval/: the ruler's numbers, kept (character/judging/ruler.py KeptLogprobs)
MEASURES = 2  # eval/ written with fewer measures than this (an older release) is evaluated again
_WORD = re.compile(r"\w+")


def _with_chat(batch: pa.Table, seed: int) -> pa.Table:
    seeds = [seed_from_id(m, seed) for m in batch.column("message_id").to_pylist()]  # same seeds for both models
    return (batch.append_column("system", pa.array([""] * batch.num_rows, pa.string()))
            .append_column("user", batch.column("text")).append_column("seed", pa.array(seeds, pa.int64())))


def _write_generations(batch: pa.Table, out: StageOutput, label: str) -> pa.Table:
    ok = batch.filter(pa.compute.is_null(batch.column("reject_reason")))
    table = ok.select(schemas.EVAL_GENERATIONS.names).cast(schemas.EVAL_GENERATIONS)
    if table.num_rows:
        out.write_part(table, "_work", label, key=batch_key(table.column("message_id").to_pylist()))
    return pa.table({"rows_in": [batch.num_rows], "rows_out": [table.num_rows],
                     "drops": [f"prompt_too_long:{batch.num_rows - table.num_rows}" if batch.num_rows > table.num_rows
                               else ""], "new_tokens": [0]})


class EvalWorker:
    """Holds the preference model (scores), the judge (win probabilities) and the ruler (the frozen base model's
    log-probabilities: trait scores and KL); writes eval parts."""

    def __init__(self, config_json: str, constitution_json: str):
        self.config = Config.model_validate_json(config_json)
        constitution = Constitution.model_validate_json(constitution_json)
        self.traits = {t.name: t for t in constitution.traits}
        self.systems = {t.name: character_system_prompt(t, constitution, "trait") for t in constitution.traits}
        judged = self.config.model_copy(update={"judge": self.config.evaluate.judge})
        self.judge_name = judge_name(judged)
        self.out = StageOutput(self.config.run.output_dir, SPEC.output)
        self.ruler = base_ruler(self.config)
        # Its numbers kept under eval/_work/ruler: a resumed evaluate, or a run given another's base answers,
        # measures each (system, message, answer) once.
        self.ruler_logprobs = KeptLogprobs(self.ruler.token_logprobs, self.ruler.identity, self.out, *RULER_KEPT)
        # A contrast judge over the base model is the ruler's own contrast: its win probabilities come from the
        # ruler's numbers (_prob_first), with no vLLM engine and no second pass over the answers.
        self.judge = None if self.judge_name == f"contrast:{self.config.model.name}" else build_judge(judged)
        # The PM scores text with its own tokenizer (character/training/scoring.py), whatever its base model.
        self.pm = evaluation_scorer(self.config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        comps, flat, judged = [], [], []  # judged: (flat index, its comparisons' index, the base row's or None)
        for r in rows:
            system, trait = self.systems[r["trait"]], self.traits[r["trait"]]
            for s, b in enumerate(r["base_outputs"]):
                base_at = len(flat)
                for model in ("base", *COMPARED):
                    if f"{model}_outputs" not in r:
                        continue
                    text = r[f"{model}_outputs"][s]
                    if model != "base":  # judged against the base's answer of the same sample, in both orders
                        judged.append((len(flat), len(comps), base_at if model == "trained" else None))
                        comps += [Comparison(trait.describe(), r["text"], text, b, system),
                                  Comparison(trait.describe(), r["text"], b, text, system)]
                    flat.append({"message_id": r["message_id"], "trait": r["trait"], "split": r["split"],
                                 "model": model, "sample": s, "prompt": r["text"], "response": text,
                                 "n_words": len(_WORD.findall(text)), "n_tokens": r[f"{model}_tokens"][s],
                                 "finish_reason": r[f"{model}_finish"][s], "logprob": r[f"{model}_logprobs"][s],
                                 "probes": [{"probe": p.name, "hit": p.hits(text)} for p in trait.probes],
                                 "_ids": r[f"{model}_token_ids"][s]})
        ruler_measures(flat, self.systems, self.ruler_logprobs,
                       lambda f: f["split"] == HELD_OUT and f["model"] != "sft")  # interference: final vs base
        probs = self._prob_first(comps, flat, judged)
        rewards = self.pm([f["prompt"] for f in flat], [f["response"] for f in flat]).tolist()
        for f, reward in zip(flat, rewards):
            f["reward"] = reward
        for at, c, base_at in judged:
            q_first, q_second = probs[c], probs[c + 1]
            p = 0.5 if q_first is None or q_second is None else soft_label(q_first, q_second)
            flat[at]["win_prob"] = p
            if base_at is not None:  # a base row's win_prob is against the final model
                flat[base_at]["win_prob"] = 1.0 - p
        for f in flat:
            del f["_length"]
        if flat:
            self.out.write_part(pa.Table.from_pylist(flat, schema=schemas.EVAL),
                                key=batch_key([r["message_id"] for r in rows]))
        return pa.table({"rows_in": [len(rows)], "rows_out": [len(flat)], "drops": [""], "new_tokens": [0]})

    def _prob_first(self, comps: list[Comparison], flat: list[dict], judged: list[tuple]) -> list[float | None]:
        """The judge's P(first better) per comparison. For a contrast judge over the base model, from the contrasts
        the ruler just computed, on the answers' own token ids: the same numbers without a second pass over every
        answer (the cost of evaluate that grows with every answer)."""
        if self.judge is not None:
            return self.judge.prob_first(comps)
        cfg = self.config.evaluate.judge

        def score(f: dict) -> float | None:
            if f["trait_score"] is None:
                return None
            return f["trait_score"] if cfg.contrast_per_token else f["trait_score"] * f["_length"]

        probs: list[float | None] = [None] * len(comps)
        for at, c, _ in judged:
            base = next(b for b in flat if b["message_id"] == flat[at]["message_id"] and b["model"] == "base"
                        and b["sample"] == flat[at]["sample"])
            a, b = score(flat[at]), score(base)
            if a is not None and b is not None:
                probs[c] = contrast_prob(a, b, cfg.contrast_temperature)
                probs[c + 1] = contrast_prob(b, a, cfg.contrast_temperature)
        return probs


def ruler_measures(flat: list[dict], systems: dict[str, str], token_logprobs, every_trait=lambda f: True) -> None:
    """The ruler's numbers per answer row (prompt, trait, `_ids`: its token ids, replaced here by `_length`), in
    place: its log-probability under the base with no system prompt of ours (logprob_base, the KL's other term),
    and its per-token contrast (log p(ids | trait's system prompt, message) - log p(ids | message)) / len(ids)
    under its own trait (trait_score) and, for the rows `every_trait` picks, under every trait of `systems`
    (trait_scores, the interference matrix's; else only its own). `token_logprobs`: the base model's
    ContrastJudge.token_logprobs. Every distinct prefill is computed once."""
    def scored(f: dict) -> list[str]:
        return list(systems) if every_trait(f) else [f["trait"]]

    keys = sorted({(system, f["prompt"], tuple(f["_ids"])) for f in flat
                   for system in ("", *(systems[t] for t in scored(f)))})
    logprobs = dict(zip(keys, token_logprobs(keys)))
    for f in flat:
        ids = tuple(f.pop("_ids"))
        f["_length"] = len(ids)
        plain = logprobs[("", f["prompt"], ids)]
        f["logprob_base"] = None if plain is None else math.fsum(plain)
        f["trait_scores"], f["trait_score"] = [], None
        for name in scored(f):
            with_trait = logprobs[(systems[name], f["prompt"], ids)]
            score = (None if plain is None or with_trait is None or not ids
                     else (math.fsum(with_trait) - math.fsum(plain)) / len(ids))
            f["trait_scores"].append({"trait": name, "score": score})
            if name == f["trait"]:
                f["trait_score"] = score


def base_ruler(config: Config) -> BaseRuler:
    """The frozen base model's log-probabilities (character/judging/ruler.py): the same ruler whatever the judge."""
    return BaseRuler(config.model.name, config.model.dtype, config.engine.max_model_len,
                     config.ppo.forward_batch_size * 4)


def run(config: Config, force: bool = False) -> StageResult:
    models = evaluated_models(config)
    out = StageOutput(config.run.output_dir, SPEC.output)
    info = out.success_info() if out.complete() and not force else None
    evaluated = None if info is None else (info.get("trained_model"), info.get("sft_model"))
    if evaluated not in (None, (models["trained"], models.get("sft"))):
        # Another policy.method (or policy.sft) than the one evaluated: its eval/ describes other models.
        print(f"[evaluate] eval/ evaluated {', '.join(filter(None, evaluated))}; the config trains "
              f"{', '.join(m for k, m in models.items() if k != 'base')} (policy.method {config.policy.method}, "
              f"policy.sft {config.policy.sft}): evaluating again", flush=True)
        force = True
    elif info is not None and info.get("measures", 1) < MEASURES:
        print(f"[evaluate] eval/ has measures version {info.get('measures', 1)}, this release writes {MEASURES}: "
              "evaluating again", flush=True)
        force = True
    return run_stage(config, SPEC, force, lambda out, result, inputs: _evaluate(config, out, result, *inputs),
                     inputs=lambda out: _inputs(config))


def _inputs(config: Config) -> tuple[list[dict], Constitution]:
    prompts = evaluation_messages(config)
    if not prompts:
        raise StageInputError(f"evaluate: 0 held-out or adversarial messages to evaluate on; "
                              f"{upstream_cause(StageOutput(config.run.output_dir, 'messages'))}")
    prompts = [{k: r[k] for k in ("message_id", "trait", "text", "split")} for r in prompts]
    return prompts, active_constitution(config, "evaluate")


def _evaluate(config: Config, out: StageOutput, result: StageResult, prompts: list[dict],
              constitution: Constitution) -> None:
    models, cfg = evaluated_models(config), config.evaluate
    sampling = cfg.sampling.model_copy(update={"n": cfg.samples})
    greedy = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=cfg.capability_max_tokens)
    for label, model in models.items():
        # The capability questions (greedy) ride in the same pass as the sampled answers: one engine start.
        asked = capability_prompts() if cfg.capability and label in CAPABILITY else []
        rows = ([{**p, "sampling": sampling.model_dump_json()} for p in prompts]
                + [{**p, "sampling": greedy.model_dump_json()} for p in asked])
        _generate(config, out, label, model, rows, sampling)
    _judge(config, out, constitution, models)
    rows = out.read(schema=schemas.EVAL).to_pylist()
    summary = {"base_model": config.model.name, "trained_model": models["trained"], "samples": cfg.samples,
               "score": "DPO implicit reward" if config.policy.method == "dpo" else "preference model",
               "judge": judge_name(config.model_copy(update={"judge": cfg.judge})), "ruler": config.model.name,
               **summarise(rows)}
    if "sft" in models:  # what SFT alone added, and what RL added after it (the top level: SFT then RL)
        summary.update(sft_model=models["sft"], sft=summarise(rows, "sft"),
                       sft_to_final=summarise(rows, "trained", "sft"))
    summary["identical_share"] = {split: s["identical_share"]["share"] for split, s in summary["overall"].items()}
    summary["kl"] = {split: s["kl"] for split, s in summary["overall"].items()}
    if cfg.capability:
        summary["capability"] = _capability(out, models)
    out.write_json("summary.json", summary)
    result.rows_in, result.rows_out = len(prompts), len(rows)
    result.extra = {"trained_model": models["trained"], "sft_model": models.get("sft"), "measures": MEASURES,
                    **{split: {k: v["mean"] if "mean" in v else v for k, v in s.items()
                               if k in ("trait_score_delta", "pm_delta", "win_rate", "length_change")}
                       for split, s in summary["overall"].items()}}
    _print_summary(summary)


def _capability(out: StageOutput, models: dict) -> dict:
    """Every model's greedy replies to the capability questions, matched: eval/capability.json keeps the replies
    (for a reader to check), summary.json the accuracies."""
    replies, accuracies = {}, {}
    item_of = {capability_message_id(i): i.id for i in capability_items()}
    for label in (m for m in models if m in CAPABILITY):
        table = out.read("_work", label, schema=schemas.EVAL_GENERATIONS).to_pylist()
        replies[label] = {item_of[r["message_id"]]: r["outputs"][0] for r in table
                          if r["split"] == CAPABILITY_SPLIT and r["outputs"]}
        accuracies[label] = capability_accuracy(replies[label])
    out.write_json("capability.json", {"replies": replies, "wrong": {m: a["wrong"] for m, a in accuracies.items()}})
    return capability_block({m: {k: v for k, v in a.items() if k != "wrong"} for m, a in accuracies.items()})


def _print_summary(summary: dict) -> None:
    for split, s in summary["overall"].items():
        print(f"[evaluate] {split}: trait score shift {_interval(s['trait_score_delta'])} "
              f"({verdict(s['trait_score_delta'])}), probe shift {_interval(s['probe_delta'])}, PM score shift "
              f"{_interval(s['pm_delta'])}, win rate {_interval(s['win_rate'])}, identical answers "
              f"{s['identical_share']['share']:.2f}, KL {s['kl']['mean']:.3f}, length {s['length_base']['mean']:.1f}"
              f" -> {s['length_trained']['mean']:.1f} words", flush=True)
    for key, g in summary["groups"].items():
        if g["split"] == "held_out":
            print(f"[evaluate] {key}: trait score shift {_interval(g['trait_score_delta'])} "
                  f"({verdict(g['trait_score_delta'])}), probe {_interval(g['probe_delta'])}", flush=True)
    for split, s in (summary.get("sft") or {}).get("overall", {}).items():
        print(f"[evaluate] {split}, SFT alone: trait score shift {_interval(s['trait_score_delta'])}, win rate "
              f"over base {s['win_rate']['mean']:.3f}", flush=True)
    for label, c in {k: v for k, v in (summary.get("capability") or {}).items() if k != "kept"}.items():
        print(f"[evaluate] capability, {label}: {c['accuracy']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}] of {c['n']}",
              flush=True)


def _interval(stat: dict) -> str:
    return f"{stat['mean']:+.3f} [{stat['lo']:+.3f}, {stat['hi']:+.3f}]"


def evaluated_models(config: Config) -> dict[str, str]:
    """label -> model: the base, the final model (train-ppo's policy/ or train-dpo's dpo/) and, with policy.sft,
    train-sft's sft/."""
    models = {"base": config.model.name, "trained": StageOutput(config.run.output_dir, config.policy_stage).path()}
    if config.policy.sft:
        models["sft"] = config.start_model
    return models


def _generate(config: Config, out: StageOutput, label: str, model: str, prompts: list[dict],
              sampling: SamplingConfig) -> None:
    """One model's samples for every prompt not yet answered, under eval/_work/<label>/."""
    import ray.data

    done = out.ids("message_id", "_work", label)
    todo = [p for p in prompts if p["message_id"] not in done]
    if not todo:
        return
    ds = (engine_sized_blocks(ray.data.from_items(todo).map_batches(
              _with_chat, fn_kwargs=dict(seed=config.run.seed), batch_format="pyarrow"), config.engine)
          .map_batches(ChatGenerator, fn_constructor_kwargs=dict(
              model_name=model, dtype=config.model.dtype, engine=config.engine.model_dump(),
              sampling=sampling.model_dump(), seed=config.run.seed, logprobs=True,
              then=_write_generations, then_kwargs=dict(out=out, label=label)),
              **generation_pool_args(config.engine)))
    consume_counts(ds, f"evaluate: {label}", len(todo))


GENERATED = (("outputs", "outputs"), ("finish", "finish_reasons"), ("tokens", "output_tokens"),
             ("token_ids", "output_token_ids"), ("logprobs", "output_logprobs"))


def _judge(config: Config, out: StageOutput, constitution: Constitution, models: dict) -> None:
    """Every message both models answered and not yet scored: PM scores, both-order judgements, the ruler's
    measures."""
    import ray.data

    gens = {label: {r["message_id"]: r for r in out.read("_work", label, schema=schemas.EVAL_GENERATIONS).to_pylist()
                    if r["split"] != CAPABILITY_SPLIT} for label in models}
    scored = out.ids("message_id")
    joined = [{**{k: gens["base"][m][k] for k in ("message_id", "trait", "split", "text")},
               **{f"{label}_{key}": gens[label][m][column] for label in models for key, column in GENERATED}}
              for m in sorted(gens["base"]) if all(m in g for g in gens.values()) and m not in scored]
    if not joined:
        return
    # The engine's actor size whatever the judge: the worker holds the ruler and the PM (torch threads follow it).
    ds = ray.data.from_items(joined).map_batches(EvalWorker, fn_constructor_kwargs=dict(
        config_json=config.model_dump_json(), constitution_json=constitution.model_dump_json()),
        **actor_pool_args(config.engine))
    consume_counts(ds, "evaluate: judge", len(joined))
