"""Stage `evaluate`: how each trait changed the model's behaviour, base vs trained.

On the held-out messages (never trained on, nor any near-copy of them) and the adversarial ones
synthesised for evaluation (pushing the model off its character), both from messages/ where `synthesize`
split them (character/data/splits.py), both models answer with the same sampling settings and seeds; every response
gets the preference model's score, and each trained/base pair of the same sample is judged in both
orders. The trained model is train-ppo's policy/ or, with policy.method dpo, train-dpo's dpo/; the score is
then the DPO implicit reward, as no PM is trained (character/training/scoring.py evaluation_scorer). With
policy.sft, train-sft's sft/ answers too and is judged against the base the same way: summary.json's `sft`
block says what SFT alone added, its top level what SFT then RL did. Output:
eval/part-*.parquet (message x model x sample) and eval/summary.json per trait and split, with intervals
clustered by message (character/reporting/evalstats.py).
"""
from __future__ import annotations

import re
from collections import defaultdict

import pyarrow as pa

from character.core import schemas
from character.core.config import Config
from character.core.store import StageInputError, StageOutput, seed_from_id
from character.core.traits import Constitution
from character.data.prompts import character_system_prompt
from character.data.splits import evaluation_messages
from character.execution.registry import spec_of
from character.execution.runtime import StageResult, batch_key, consume_counts, upstream_cause
from character.execution.stage_run import run_stage
from character.inference.engine import ChatGenerator, engine_sized_blocks, generation_pool_args, judge_pool_args
from character.judging.judge import Comparison, build_judge, judge_name
from character.judging.ranking import soft_label
from character.reporting.evalstats import METHOD, clustered_delta, clustered_mean, win_rates
from character.review.marks import active_constitution
from character.training.scoring import evaluation_scorer

SPEC = spec_of(__name__)
COMPARED = ("trained", "sft")  # the models judged against the base, each on the base's answer of the same sample
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
    """Holds the preference model (scores) and the judge (win probabilities); writes eval parts."""

    def __init__(self, config_json: str, constitution_json: str):
        self.config = Config.model_validate_json(config_json)
        constitution = Constitution.model_validate_json(constitution_json)
        self.traits = {t.name: t.describe() for t in constitution.traits}
        self.systems = {t.name: character_system_prompt(t, constitution, "trait") for t in constitution.traits}
        judged = self.config.model_copy(update={"judge": self.config.evaluate.judge})
        self.judge, self.judge_name = build_judge(judged), judge_name(judged)
        # The PM scores text with its own tokenizer (character/training/scoring.py), whatever its base model.
        self.pm = evaluation_scorer(self.config)
        self.out = StageOutput(self.config.run.output_dir, SPEC.output)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        comps, flat, judged = [], [], []  # judged: (flat index, its comparisons' index, the base row's or None)
        for r in rows:
            system = self.systems[r["trait"]]
            for s, b in enumerate(r["base_outputs"]):
                base_at = len(flat)
                for model in ("base", *COMPARED):
                    if f"{model}_outputs" not in r:
                        continue
                    text = r[f"{model}_outputs"][s]
                    if model != "base":  # judged against the base's answer of the same sample, in both orders
                        judged.append((len(flat), len(comps), base_at if model == "trained" else None))
                        comps += [Comparison(self.traits[r["trait"]], r["text"], text, b, system),
                                  Comparison(self.traits[r["trait"]], r["text"], b, text, system)]
                    flat.append({"message_id": r["message_id"], "trait": r["trait"], "split": r["split"],
                                 "model": model, "sample": s, "prompt": r["text"], "response": text,
                                 "n_words": len(_WORD.findall(text)), "n_tokens": r[f"{model}_tokens"][s],
                                 "finish_reason": r[f"{model}_finish"][s]})
        probs = self.judge.prob_first(comps)
        rewards = self.pm([f["prompt"] for f in flat], [f["response"] for f in flat]).tolist()
        for f, reward in zip(flat, rewards):
            f["reward"] = reward
        for at, c, base_at in judged:
            q_first, q_second = probs[c], probs[c + 1]
            p = 0.5 if q_first is None or q_second is None else soft_label(q_first, q_second)
            flat[at]["win_prob"] = p
            if base_at is not None:  # a base row's win_prob is against the final model
                flat[base_at]["win_prob"] = 1.0 - p
        if flat:
            self.out.write_part(pa.Table.from_pylist(flat, schema=schemas.EVAL),
                                key=batch_key([r["message_id"] for r in rows]))
        return pa.table({"rows_in": [len(rows)], "rows_out": [len(flat)], "drops": [""], "new_tokens": [0]})


def paired_samples(rows: list[dict], model: str = "trained") -> list[dict]:
    """{"base": row, model: row} per (message, sample) that both models answered."""
    pairs = defaultdict(dict)
    for r in rows:
        pairs[(r["message_id"], r["sample"])][r["model"]] = r
    return [p for p in pairs.values() if "base" in p and model in p]


def summarise(rows: list[dict], model: str = "trained") -> dict:
    """Per trait/split and overall per split, `model` (the final model, or the SFT model) against the base: PM
    scores, paired score shift, win rates, lengths, each with an interval clustered by message (the samples of
    one message are not independent)."""
    def block(subset: list[dict]) -> dict:
        both = paired_samples(subset, model)
        ids = [p["base"]["message_id"] for p in both]
        base_r, model_r = [p["base"]["reward"] for p in both], [p[model]["reward"] for p in both]
        base_l, model_l = [p["base"]["n_words"] for p in both], [p[model]["n_words"] for p in both]
        soft, hard = win_rates([p[model]["win_prob"] for p in both], ids)
        return {"n_messages": len(set(ids)), "n_samples": len(both),
                "pm_base": clustered_mean(base_r, ids), f"pm_{model}": clustered_mean(model_r, ids),
                "pm_delta": clustered_delta(model_r, base_r, ids), "win_rate": soft, "hard_win_rate": hard,
                "length_base": clustered_mean(base_l, ids), f"length_{model}": clustered_mean(model_l, ids),
                "length_change": clustered_delta(model_l, base_l, ids)}

    groups, splits = defaultdict(list), defaultdict(list)
    for r in rows:
        groups[(r["trait"], r["split"])].append(r)
        splits[r["split"]].append(r)
    return {
        "interval": METHOD,
        "groups": {f"{t}/{s}": {"trait": t, "split": s, **block(g)} for (t, s), g in sorted(groups.items())},
        "overall": {s: {"split": s, **block(g)} for s, g in sorted(splits.items())},
    }


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
    models = evaluated_models(config)
    for label, model in models.items():
        _generate(config, out, label, model, prompts)
    _judge(config, out, constitution, models)
    rows = out.read(schema=schemas.EVAL).to_pylist()
    cfg = config.evaluate
    summary = {"base_model": config.model.name, "trained_model": models["trained"], "samples": cfg.samples,
               "score": "DPO implicit reward" if config.policy.method == "dpo" else "preference model",
               "judge": judge_name(config.model_copy(update={"judge": cfg.judge})), **summarise(rows)}
    if "sft" in models:  # what SFT alone added (the final model's numbers above: SFT then RL)
        summary.update(sft_model=models["sft"], sft=summarise(rows, "sft"))
    out.write_json("summary.json", summary)
    result.rows_in, result.rows_out = len(prompts), len(rows)
    result.extra = {"trained_model": models["trained"], "sft_model": models.get("sft"),
                    **{split: {k: v["mean"] if "mean" in v else v for k, v in s.items()
                               if k in ("pm_delta", "win_rate", "length_change")}
                       for split, s in summary["overall"].items()}}
    for split, s in summary["overall"].items():
        print(f"[evaluate] {split}: PM score {s['pm_base']['mean']:.3f} -> {s['pm_trained']['mean']:.3f} "
              f"(shift {s['pm_delta']['mean']:+.3f} [{s['pm_delta']['lo']:+.3f}, {s['pm_delta']['hi']:+.3f}]), "
              f"win rate {s['win_rate']['mean']:.3f} [{s['win_rate']['lo']:.3f}, {s['win_rate']['hi']:.3f}], "
              f"length {s['length_base']['mean']:.1f} -> {s['length_trained']['mean']:.1f} words", flush=True)
    for split, s in (summary.get("sft") or {}).get("overall", {}).items():
        print(f"[evaluate] {split}, SFT alone: PM score shift {s['pm_delta']['mean']:+.3f} "
              f"[{s['pm_delta']['lo']:+.3f}, {s['pm_delta']['hi']:+.3f}], win rate over base "
              f"{s['win_rate']['mean']:.3f}", flush=True)


def evaluated_models(config: Config) -> dict[str, str]:
    """label -> model: the base, the final model (train-ppo's policy/ or train-dpo's dpo/) and, with policy.sft,
    train-sft's sft/."""
    models = {"base": config.model.name, "trained": StageOutput(config.run.output_dir, config.policy_stage).path()}
    if config.policy.sft:
        models["sft"] = config.start_model
    return models


def _generate(config: Config, out: StageOutput, label: str, model: str, prompts: list[dict]) -> None:
    """One model's samples for every prompt not yet answered, under eval/_work/<label>/."""
    import ray.data

    cfg = config.evaluate
    done = out.ids("message_id", "_work", label)
    todo = [p for p in prompts if p["message_id"] not in done]
    if not todo:
        return
    ds = (engine_sized_blocks(ray.data.from_items(todo).map_batches(
              _with_chat, fn_kwargs=dict(seed=config.run.seed), batch_format="pyarrow"), config.engine)
          .map_batches(ChatGenerator, fn_constructor_kwargs=dict(
              model_name=model, dtype=config.model.dtype, engine=config.engine.model_dump(),
              sampling=cfg.sampling.model_copy(update={"n": cfg.samples}).model_dump(),
              seed=config.run.seed, then=_write_generations, then_kwargs=dict(out=out, label=label)),
              **generation_pool_args(config.engine)))
    consume_counts(ds, f"evaluate: {label}", len(todo))


def _judge(config: Config, out: StageOutput, constitution: Constitution, models: dict) -> None:
    """Every message both models answered and not yet scored: PM scores and both-order judgements."""
    import ray.data

    gens = {label: {r["message_id"]: r for r in out.read("_work", label, schema=schemas.EVAL_GENERATIONS).to_pylist()}
            for label in models}
    scored = out.ids("message_id")
    joined = [{**gens["base"][m], **{f"{label}_{key}": gens[label][m][column] for label in models
                                      for key, column in (("outputs", "outputs"), ("finish", "finish_reasons"),
                                                          ("tokens", "output_tokens"))}}
              for m in sorted(gens["base"]) if all(m in g for g in gens.values()) and m not in scored]
    if not joined:
        return
    judged = config.model_copy(update={"judge": config.evaluate.judge})
    ds = ray.data.from_items([{k: v for k, v in j.items() if k not in ("outputs", "finish_reasons", "output_tokens")}
                              for j in joined])
    ds = ds.map_batches(EvalWorker, fn_constructor_kwargs=dict(
        config_json=config.model_dump_json(), constitution_json=constitution.model_dump_json()),
        **judge_pool_args(judged))
    consume_counts(ds, "evaluate: judge", len(joined))
