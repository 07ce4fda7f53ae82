"""vLLM rollout engines for PPO, held by Ray actors, with in-place weight sync.

Why hand-written: neither Ray Data nor vLLM's own API moves a training process's freshly updated weights
into a running engine. After each PPO update the trainer gathers the full policy weights (ZeRO-3
partitions included), puts them in the object store once as numpy arrays (`arrays_for_engines`: one copy
into shared memory, which every engine on the node then reads in place, where pickled torch tensors are
copied on both ends), and every engine loads them in place through its worker's `reload_weights` (a
`collective_rpc`), then drops its prefix cache — cached prompt states from the old weights would otherwise
be reused and give wrong log-probabilities. No reload from disk.
"""
from __future__ import annotations

import warnings

from character.config import EngineConfig, SamplingConfig


def with_tied_head(state_dict: dict, tie_word_embeddings: bool) -> dict:
    """With tied input/output embeddings vLLM still needs lm_head.weight, or its head keeps old weights."""
    if tie_word_embeddings and "lm_head.weight" not in state_dict and "model.embed_tokens.weight" in state_dict:
        state_dict = {**state_dict, "lm_head.weight": state_dict["model.embed_tokens.weight"]}
    return state_dict


BF16 = "bf16::"  # numpy has no bfloat16: such weights cross as their int16 bit pattern, under this prefix


def arrays_for_engines(state_dict: dict, tie_word_embeddings: bool) -> dict:
    """The weights as numpy arrays sharing the tensors' memory, without a tied head (the engine side
    restores it from the embedding, `with_tied_head`: no second copy of the vocabulary matrix)."""
    import torch

    arrays = {}
    for k, v in state_dict.items():
        if tie_word_embeddings and k == "lm_head.weight":
            continue
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            arrays[BF16 + k] = v.view(torch.int16).numpy()
        else:
            arrays[k] = v.numpy()
    return arrays


def tensors_from_arrays(arrays: dict) -> dict:
    """Torch views of (read-only, object-store) numpy arrays; vLLM copies them into its own weights
    (converting the dtype when training and the engine differ, e.g. bf16 training, fp32 engine)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {(k[len(BF16):] if k.startswith(BF16) else k):
                (torch.from_numpy(v).view(torch.bfloat16) if k.startswith(BF16) else torch.from_numpy(v))
                for k, v in arrays.items()}


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

    def update_weights(self, arrays: dict, tie_word_embeddings: bool, version: int) -> int:
        """`arrays`: name -> numpy array (arrays_for_engines), read in place from the object store."""
        sync_weights(self.llm, tensors_from_arrays(arrays), tie_word_embeddings)
        self.version = version
        return version

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        return prompt_logprobs(self.llm, token_ids)
