"""Preference-model data: held-out split by message, tokenisation, deterministic epoch order and shards.

Why not Ray Data shards for training: exact resume ("no batch repeated or skipped") needs every worker
to know which examples the first N steps consumed. A seeded permutation per epoch, cut into global
batches and then into per-rank micro-batches, makes the data position a single integer that goes into
the checkpoint: the number of examples consumed (not steps: a global batch changes size when an elastic
worker group resizes).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np


def is_held_out(message_id: str, fraction: float, salt: int | str) -> bool:
    """Stable held-out assignment by message: no message has pairs on both sides (character/data/splits.py)."""
    h = int(hashlib.sha256(f"{salt}:{message_id}".encode()).hexdigest()[:12], 16)
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


def chat_prefix(tokenizer, prompt: str, system: str = "") -> list[int]:
    """The chat-templated user turn (after `system`'s turn, if any) and the start of the assistant's."""
    turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, prompt: str, response: str, max_length: int) -> list[int]:
    """Chat-formatted prompt + response + eos, at most max_length tokens. Too long: the prompt keeps its
    end (at least half the budget when the response is long), the response keeps its start, and the
    sequence always ends with eos, the position the reward head reads."""
    head, tail = encode_prompt_and_response(tokenizer, prompt, response, max_length)
    return head + tail


def encode_prompt_and_response(tokenizer, prompt: str, response: str, max_length: int, system: str = "",
                               eos: bool = True) -> tuple[list[int], list[int]]:
    """`encode_response` as its two parts: the prompt's tokens (after `system`'s turn, if any) and the
    response's, eos included unless `eos` is False (an answer cut off by its sampler did not end there:
    supervised training on it must not teach the model to stop there)."""
    head = chat_prefix(tokenizer, prompt, system)
    end = [tokenizer.eos_token_id] if eos else []
    tail = tokenizer(response, add_special_tokens=False)["input_ids"] + end
    if len(head) + len(tail) <= max_length:
        return head, tail
    head_budget = min(len(head), max(max_length // 2, max_length - len(tail)))
    head = head[len(head) - head_budget:]
    return head, tail[: max_length - len(head) - len(end)] + end


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


def step_slice(n: int, position: int, world: int, micro: int, accum: int) -> tuple[int, int, int]:
    """(epoch, start in that epoch's order, examples) of the step that begins `position` examples into
    training. A step takes one global batch (world x micro x accum), except an epoch's last step, which
    takes what is left: every epoch covers its examples exactly once, and because the position counts
    examples, not steps, a run resumed on another number of workers neither skips nor repeats any."""
    epoch, start = divmod(position, n)
    return epoch, start, min(world * micro * accum, n - start)


def steps_left(n: int, position: int, end: int, world: int, micro: int, accum: int) -> int:
    """Steps from `position` until `end` examples have been consumed (at this world size)."""
    steps = 0
    while position < end:
        position += step_slice(n, position, world, micro, accum)[2]
        steps += 1
    return steps


def micro_batch_indices(order: np.ndarray, start: int, size: int, micro_index: int, rank: int, world: int,
                        micro: int) -> list[int]:
    """The examples rank `rank` uses for micro-batch `micro_index` of the step that takes order[start :
    start + size]; in a short last step some ranks' micro-batches are short or empty (the caller pads)."""
    lo = start + micro_index * world * micro + rank * micro
    hi = min(lo + micro, start + size)
    return order[lo:hi].tolist() if lo < hi else []
