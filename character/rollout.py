"""vLLM rollout engines for PPO, held by Ray actors, with in-place weight sync.

Why hand-written: neither Ray Data nor vLLM's own API moves a training process's freshly updated weights
into a running engine. After each PPO update the trainer gathers the full policy weights (ZeRO-3
partitions included), puts them in the object store once, and every engine loads them in place through
its worker's `reload_weights` (a `collective_rpc`), then drops its prefix cache — cached prompt states
from the old weights would otherwise be reused and give wrong log-probabilities. No reload from disk.
"""
from __future__ import annotations

from character.config import EngineConfig, SamplingConfig


def with_tied_head(state_dict: dict, tie_word_embeddings: bool) -> dict:
    """With tied input/output embeddings vLLM still needs lm_head.weight, or its head keeps old weights."""
    if tie_word_embeddings and "lm_head.weight" not in state_dict and "model.embed_tokens.weight" in state_dict:
        state_dict = {**state_dict, "lm_head.weight": state_dict["model.embed_tokens.weight"]}
    return state_dict


def sync_weights(llm, state_dict: dict, tie_word_embeddings: bool) -> None:
    state_dict = with_tied_head(state_dict, tie_word_embeddings)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
    llm.reset_prefix_cache()


def prompt_logprobs(llm, token_ids: list[int]) -> list[float]:
    """log p(token_t | tokens_<t) for t >= 1 under the engine's current weights."""
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": token_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return [step[tok].logprob for step, tok in zip(out.prompt_logprobs[1:], token_ids[1:])]


class RolloutEngine:
    """A Ray actor (wrap with ray.remote) holding one in-process vLLM engine."""

    def __init__(self, model_name: str, dtype: str, engine: dict, seed: int):
        from character.engine import create_llm

        self.engine = EngineConfig.model_validate(engine)
        self.llm = create_llm(model_name, dtype, self.engine, seed)
        self.version = 0

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: dict) -> list[dict]:
        from vllm import SamplingParams

        s = SamplingConfig.model_validate(sampling)
        params = [SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=seed)
                  for seed in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [{"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
                 "finish_reason": str(o.outputs[0].finish_reason or "length")} for o in outs]

    def update_weights(self, state_dict: dict, tie_word_embeddings: bool, version: int) -> int:
        sync_weights(self.llm, state_dict, tie_word_embeddings)
        self.version = version
        return version

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        return prompt_logprobs(self.llm, token_ids)
