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

import time
import warnings

from character.core.config import EngineConfig, SamplingConfig
from character.inference.engine import create_llm


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


def sampled_logprobs(completion) -> list[float]:
    """The log-probability of each token of a vLLM completion, as sampled (requested with logprobs=0: each
    position's dict holds the sampled token, plus the top one where that differs)."""
    if completion.logprobs is None:
        return []
    return [float(step[token].logprob) for step, token in zip(completion.logprobs, completion.token_ids)]


class RolloutEngine:
    """A Ray actor (wrap with ray.remote) holding one in-process vLLM engine."""

    def __init__(self, model_name: str, dtype: str, engine: dict, seed: int):
        self.engine = EngineConfig.model_validate(engine)
        self.llm = create_llm(model_name, dtype, self.engine, seed)
        self.version = 0

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: dict) -> dict:
        """`sampling.n` samples per prompt (one request each: vLLM seeds sample j with seed + j), returned
        prompt by prompt, the n samples of a prompt consecutive, each with its tokens' log-probabilities under
        the weights that sampled them and their `version` (the behaviour policy: the last update_weights'
        version), and the wall-clock times (time.time()) the engine started and finished: {"samples",
        "started", "finished"}."""
        from vllm import SamplingParams

        started = time.time()
        s = SamplingConfig.model_validate(sampling)
        # logprobs=0: the sampled token's log-probability only. vLLM reports it from the raw logits (its
        # default logprobs_mode), before temperature and top-p, as the trainer computes its own.
        params = [SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=seed,
                                 logprobs=0) for seed in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        samples = [{"token_ids": list(c.token_ids), "text": c.text, "finish_reason": str(c.finish_reason or "length"),
                    "logprobs": sampled_logprobs(c), "version": self.version}
                   for o in outs for c in sorted(o.outputs, key=lambda c: c.index)]
        return {"samples": samples, "started": started, "finished": time.time()}

    def update_weights(self, arrays: dict, tie_word_embeddings: bool, version: int) -> int:
        """`arrays`: name -> numpy array (arrays_for_engines), read in place from the object store."""
        sync_weights(self.llm, tensors_from_arrays(arrays), tie_word_embeddings)
        self.version = version
        return version

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        return prompt_logprobs(self.llm, token_ids)


class SyncError(RuntimeError):
    """The engines do not sample from the policy being trained."""


def sync_check(train_dtype: str, engine_dtype: str) -> tuple[float, str]:
    """How far the engines' log-probabilities of the probe may sit from the trainer's, and over what: fp32 on
    both sides agree to ~1e-6 per token (tests/test_weight_sync.py), so the largest difference must stay under
    1e-3. A bf16 side rounds every activation: on SmolLM2-135M its forward sits 0.24-0.27 nats per token from
    the fp32 one on average, with single tokens up to 1.27 (the same weights), so there the mean difference is
    checked, against 0.5; a sync that reloaded the wrong or half the weights moves it by nats."""
    return (1e-3, "max") if train_dtype == engine_dtype == "float32" else (0.5, "mean")


class SyncProbe:
    """After every weight sync, the engines' log-probabilities of one fixed token sequence are compared
    with the trained policy's. A sync that silently did not take (the engine still sampling the initial
    policy, as verl #7495 reports; adapter names with no target in the engine, OpenRLHF #1349; half a fused
    layer reloaded) shows as a difference larger than `tolerance`, and stops the run naming the iteration.
    `statistic`: the largest per-token difference ("max") or their mean ("mean", for a bf16 side: sync_check).
    `drift` (engine now vs engine when this process started) shows that the engines really moved."""

    def __init__(self, token_ids: list[int], tolerance: float, statistic: str = "max"):
        if statistic not in ("max", "mean"):
            raise ValueError(f"SyncProbe statistic {statistic!r}: max or mean")
        self.token_ids, self.tolerance, self.statistic = list(token_ids), tolerance, statistic
        self.initial: list[float] | None = None

    def compare(self, engine_logprobs: list[list[float]], policy_logprobs: list[float], version: int) -> dict:
        import numpy as np

        policy = np.asarray(policy_logprobs, dtype=np.float64)
        engines = [np.asarray(x, dtype=np.float64) for x in engine_logprobs]
        if self.initial is None:
            self.initial = list(engines[0])
        reduce = np.max if self.statistic == "max" else np.mean
        diff = max(float(reduce(np.abs(e - policy))) for e in engines)
        drift = float(np.max(np.abs(engines[0] - np.asarray(self.initial))))
        if not diff <= self.tolerance:  # NaN fails too
            raise SyncError(f"after the weight sync of version {version} the vLLM engines do not serve the trained "
                            f"policy: {self.statistic} |log p(engine) - log p(policy)| over a "
                            f"{len(self.token_ids)}-token probe is {diff:.3g} (tolerance {self.tolerance:g}); rollouts would come from other weights")
        return {"sync_logprob_diff": diff, "engine_drift": drift}
