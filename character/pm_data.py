"""Preference-model data: held-out split by message, tokenisation, deterministic epoch order and shards.

Why not Ray Data shards for training: exact resume ("no batch repeated or skipped") needs every worker
to know which examples the first N steps consumed. A seeded permutation per epoch, cut into global
batches and then into per-rank micro-batches, makes the data position a single integer (the step) that
goes into the checkpoint.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np


def is_held_out(message_id: str, fraction: float, seed: int) -> bool:
    """Stable held-out assignment by message: no message has pairs on both sides."""
    h = int(hashlib.sha256(f"{seed}:{message_id}".encode()).hexdigest()[:12], 16)
    return (h % 1_000_000) / 1_000_000 < fraction


def validate_pairs(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Keep usable pairs; set aside the rest with a reason (never silently)."""
    good, bad = [], []
    for row in rows:
        p = row.get("p_chosen")
        if p is None or not math.isfinite(p) or not 0.0 <= p <= 1.0:
            bad.append({**row, "reason": "bad_p_chosen"})
        elif not row.get("chosen", "").strip() or not row.get("rejected", "").strip():
            bad.append({**row, "reason": "empty_response"})
        else:
            good.append(row)
    return good, bad


def chat_prefix(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, prompt: str, response: str, max_length: int) -> list[int]:
    """Chat-formatted prompt + response + eos, at most max_length tokens. Too long: the prompt keeps its
    end (at least half the budget when the response is long), the response keeps its start, and the
    sequence always ends with eos, the position the reward head reads."""
    head = chat_prefix(tokenizer, prompt)
    tail = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(head) + len(tail) <= max_length:
        return head + tail
    head_budget = min(len(head), max(max_length // 2, max_length - len(tail)))
    head = head[len(head) - head_budget:]
    tail = tail[: max_length - len(head) - 1] + [tokenizer.eos_token_id]
    return head + tail


def pad_batch(sequences: list[list[int]], pad_id: int):
    """Right-padded input_ids and attention_mask tensors."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, world: int, micro: int, accum: int) -> int:
    return n // (world * micro * accum)


def micro_batch_indices(order: np.ndarray, step_in_epoch: int, micro_index: int, rank: int, world: int,
                        micro: int, accum: int) -> list[int]:
    """The examples rank `rank` uses for micro-batch `micro_index` of a step (global batch = world*micro*accum)."""
    start = step_in_epoch * world * micro * accum + micro_index * world * micro + rank * micro
    return order[start : start + micro].tolist()
