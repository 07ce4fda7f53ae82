"""A run directory written straight from the schemas (no model): every file `character review` reads, for any
number of traits. Used by the review tests and by benchmarks/review_load.py (the 1,000-trait load time)."""
from __future__ import annotations

import json
import random

import pyarrow as pa
import yaml

from character.core import schemas
from character.core.store import StageOutput, stable_id

KINDS = ("values", "situation", "everyday")


def _interval(rng: random.Random, centre: float) -> dict:
    half = rng.uniform(0.05, 0.2)
    return {"mean": centre, "lo": centre - half, "hi": centre + half, "n": 8, "se": half / 2, "clusters": 8}


def synthetic_run(run_dir: str, traits: int = 3, messages_per_trait: int = 12, candidates: int = 4,
                  seed: int = 0) -> dict:
    """Writes the run; returns {"traits": names, "pairs": {trait: [pair rows]}, "messages": {trait: [rows]}}."""
    rng = random.Random(seed)
    names = [f"trait_{i:04d}" for i in range(traits)]
    rows = {k: [] for k in ("messages", "rejected", "responses", "comparisons", "pairs", "scores", "eval")}
    groups = {}
    for t in names:
        for n in range(messages_per_trait):
            split = "train" if n % 4 < 2 else "held_out" if n % 4 == 2 else "adversarial"
            text = f"{t} message {n}: what would you do about case {rng.randrange(10**6)}?"
            mid = stable_id(t, text)
            rows["messages"].append({"message_id": mid, "trait": t, "kind": KINDS[n % 3], "text": text,
                                     "request_id": stable_id("req", mid), "split": split})
            if split == "train":
                cands = [f"answer {c} to {n} for {t}: " + "word " * rng.randrange(1, 30) for c in range(candidates)]
                rows["responses"].append({
                    "message_id": mid, "trait": t, "kind": KINDS[n % 3], "prompt": text, "candidates": cands,
                    "finish_reasons": ["stop"] * candidates, "system_prompt": "trait", "temperature": 1.0,
                    "top_p": 1.0, "max_tokens": 64, "seed": n, "candidate_token_ids": [[1, 2]] * candidates,
                    "candidate_logprobs": [-3.0] * candidates})
                for i in range(candidates):
                    for j in range(i + 1, candidates):
                        q_ij, q_ji = rng.random(), rng.random()
                        rows["comparisons"].append({"message_id": mid, "trait": t, "i": i, "j": j, "q_ij": q_ij,
                                                    "q_ji": q_ji, "label": (q_ij + 1 - q_ji) / 2})
                for i in range(candidates - 1):
                    p_ab, p_ba = rng.uniform(0.5, 1), rng.uniform(0, 0.5)
                    pair = {"pair_id": stable_id(mid, cands[i], cands[i + 1]), "message_id": mid, "trait": t,
                            "prompt": text, "chosen": cands[i], "rejected": cands[i + 1],
                            "p_chosen": (p_ab + 1 - p_ba) / 2, "p_ab": p_ab, "p_ba": p_ba, "judge": "synthetic",
                            "chosen_score": 1.0, "rejected_score": 0.0}
                    rows["pairs"].append(pair)
                    rows["scores"].append({"pair_id": pair["pair_id"], "message_id": mid, "trait": t,
                                           "role": "train", "chosen_reward": rng.gauss(0.5, 1),
                                           "rejected_reward": rng.gauss(0, 1)})
            else:
                for model, shift in (("base", 0.0), ("trained", rng.uniform(-1, 2))):
                    rows["eval"].append({
                        "message_id": mid, "trait": t, "split": split, "model": model, "sample": 0, "prompt": text,
                        "response": f"{model} answer to {n}", "reward": rng.gauss(shift, 0.5), "n_words": 4,
                        "n_tokens": 6, "finish_reason": "stop", "win_prob": rng.random()})
        rows["rejected"].append({"row_id": stable_id(t, "dropped"), "trait": t, "reason": "too_short",
                                 "text": "hi", "detail": None})
        for split in ("held_out", "adversarial"):
            win = rng.uniform(0.3, 0.9)
            groups[f"{t}/{split}"] = {"trait": t, "split": split, "n_messages": 3, "n_samples": 3,
                                      "win_rate": _interval(rng, win), "pm_base": _interval(rng, 0.1),
                                      "pm_trained": _interval(rng, 0.6), "pm_delta": _interval(rng, 0.5),
                                      "length_change": _interval(rng, 2.0),
                                      "hard_win_rate": {"p": win, "lo": win - 0.2, "hi": win + 0.1, "n": 3}}
    out = lambda stage: StageOutput(run_dir, stage)  # noqa: E731
    out("messages").write_part(pa.Table.from_pylist(rows["messages"], schema=schemas.MESSAGES))
    out("messages").write_part(pa.Table.from_pylist(rows["rejected"], schema=schemas.REJECTED), "rejected")
    out("responses").write_part(pa.Table.from_pylist(rows["responses"], schema=schemas.RESPONSES))
    out("preferences").write_part(pa.Table.from_pylist(rows["pairs"], schema=schemas.PREFERENCES))
    out("preferences").write_part(pa.Table.from_pylist(rows["comparisons"], schema=schemas.COMPARISONS), "comparisons")
    out("pm").write_table("pair_scores.parquet", pa.Table.from_pylist(rows["scores"], schema=schemas.PM_PAIR_SCORES))
    out("eval").write_part(pa.Table.from_pylist(rows["eval"], schema=schemas.EVAL))
    out("eval").write_text("summary.json", json.dumps({"groups": groups}))
    constitution = {"name": "synthetic", "traits": [
        {"name": t, "statement": f"I care about {t}.", "clarification": f"What {t} means in practice."} for t in names]}
    StageOutput(run_dir, "").write_text("constitution.yaml", yaml.safe_dump(constitution))
    def by_trait(key: str) -> dict[str, list[dict]]:
        grouped = {t: [] for t in names}
        for r in rows[key]:
            grouped[r["trait"]].append(r)
        return grouped

    return {"traits": names, "pairs": by_trait("pairs"), "messages": by_trait("messages"), "groups": groups}
