"""vLLM engines for batch generation inside Ray Data.

Why a hand-written callable class for `map_batches` instead of `ray.data.llm`'s processor: on vLLM
0.32 the processor keeps only `outputs[0]` of a request, so `n` candidates per message would silently
shrink to one; it runs an `AsyncLLMEngine` in a separate engine process outside Ray's CPU accounting
(re-importing vLLM, ~11 s per actor); and on CPU it schedules only with a hand-made placement group. A
class holding an in-process `vllm.LLM` keeps all `n` samples, gives us the log-probabilities we need for
self-ranking from the same engine, and was measured faster here (../shared/FEASIBILITY.md). Ray Data's
`ActorPoolStrategy(min_size, max_size)` still shards and autoscales the actors.
"""
from __future__ import annotations

import os
from typing import Any

import pyarrow as pa

from character.core.config import EngineConfig, SamplingConfig
from character.core.space import FULL_DISK_ENV
from character.inference.gates import GATES_ENV, gates_folder, paced_batch
from character.inference.shared_engine import SharedEngine
from character.models.loading import load_tokenizer, resolve_model


def resolved_device(engine: EngineConfig) -> str:
    if engine.device != "auto":
        return engine.device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def engine_env(engine: EngineConfig) -> dict[str, str]:
    """Environment a vLLM engine needs, set before `import vllm`."""
    # In-process engine: starts in ~3 s instead of 20-30 s and its worker is reachable for weight sync.
    env = {"VLLM_NO_USAGE_STATS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if resolved_device(engine) == "cpu":
        # Unset, vLLM on CPU tries to reserve most of RAM for its KV cache and refuses to start.
        env.update({"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(engine.kv_cache_gib)))})
    if (folder := gates_folder()) is not None:  # tests only: the driver's batch gates reach every actor
        env[GATES_ENV] = str(folder)
    if FULL_DISK_ENV in os.environ:  # tests only: a full-disk drill (character.core.space) reaches them too
        env[FULL_DISK_ENV] = os.environ[FULL_DISK_ENV]
    return env


def create_llm(model_name: str, dtype: str, engine: EngineConfig, seed: int):
    """An in-process vllm.LLM for `model_name` (any id/path/built-in, resolved by character.models.loading)."""
    for key, value in engine_env(engine).items():
        os.environ.setdefault(key, value)
    path = resolve_model(model_name)
    if resolved_device(engine) == "cpu":
        import torch

        # vLLM's CPU worker makes torch.set_num_threads a no-op once the engine exists: set it first.
        torch.set_num_threads(max(1, int(engine.num_cpus_per_actor)))
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=path,
        tokenizer=path,
        dtype=dtype,
        max_model_len=engine.max_model_len,
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        enforce_eager=engine.enforce_eager,
        tensor_parallel_size=engine.tensor_parallel_size,
        seed=seed,
    )
    if resolved_device(engine) == "cuda":
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    if engine.enable_chunked_prefill is not None or resolved_device(engine) == "cpu":
        kwargs["enable_chunked_prefill"] = bool(engine.enable_chunked_prefill)
    if engine.block_size is not None or resolved_device(engine) == "cpu":
        kwargs["block_size"] = engine.block_size or 32
    kwargs.update(engine.extra_args)
    return LLM(**kwargs)


def chat_token_ids(tokenizer, system: str, user: str, assistant_prefix: str = "") -> list[int]:
    """Chat-templated prompt ids; `assistant_prefix` starts the assistant's turn (the model continues it)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text + assistant_prefix, add_special_tokens=False)["input_ids"]


def generate_chat(llm, tokenizer, systems: list[str], users: list[str], seeds: list[int],
                  sampling: SamplingConfig, max_model_len: int, prefixes: list[str] | None = None,
                  logprobs: bool = False, row_sampling: list[SamplingConfig | None] | None = None) -> list[dict]:
    """Generate `sampling.n` completions per chat; prompts that cannot fit are rejected, not crashed on.
    `row_sampling`: a row's own settings where not None (evaluate asks its greedy capability questions in the
    same pass as its sampled answers: one engine start per model, not two).

    Returns one dict per input: outputs, finish_reasons, reject_reason (None when generated); with
    `logprobs`, also each completion's token ids and its log-probability under the prompt (the sum of the
    raw model log-probs of its tokens: vLLM's default logprobs_mode is raw_logprobs, before temperature
    or top-p, so it equals a forward pass of prompt + completion whatever the sampling settings).
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    results: list[dict] = [{"outputs": [], "finish_reasons": [], "reject_reason": None} for _ in users]
    prompts, params, where = [], [], []
    prefixes = prefixes or [""] * len(users)
    row_sampling = row_sampling or [None] * len(users)
    for i, (system, user, seed, prefix, own) in enumerate(zip(systems, users, seeds, prefixes, row_sampling)):
        sampling_i = own or sampling
        ids = chat_token_ids(tokenizer, system, user, prefix)
        if len(ids) + sampling_i.max_tokens > max_model_len:
            results[i]["reject_reason"] = "prompt_too_long"
            results[i]["detail"] = (f"{len(ids)} prompt tokens + {sampling_i.max_tokens} new > max_model_len "
                                    f"{max_model_len}")
            continue
        prompts.append(TokensPrompt(prompt_token_ids=ids))
        params.append(SamplingParams(
            n=sampling_i.n, temperature=sampling_i.temperature, top_p=sampling_i.top_p,
            max_tokens=sampling_i.max_tokens, seed=int(seed), stop=list(sampling_i.stop) or None,
            logprobs=0 if logprobs else None,
        ))
        where.append(i)
    if prompts:
        for i, out in zip(where, llm.generate(prompts, params, use_tqdm=False)):
            results[i]["outputs"] = [c.text for c in out.outputs]
            results[i]["finish_reasons"] = [str(c.finish_reason or "length") for c in out.outputs]
            results[i]["new_tokens"] = sum(len(c.token_ids) for c in out.outputs)
            results[i]["output_tokens"] = [len(c.token_ids) for c in out.outputs]
            if logprobs:
                results[i]["output_token_ids"] = [list(c.token_ids) for c in out.outputs]
                results[i]["output_logprobs"] = [float(c.cumulative_logprob) for c in out.outputs]
    return results


class PerThreadTokenizer:
    """One HF tokenizer per thread. Why: Ray Data runs `engine.concurrent_batches` calls of an actor in
    threads at once, and a fast tokenizer's truncation/padding settings are state of the one Rust object:
    a call that sets them changes what the other threads' calls return (silently truncated prompts,
    measured in tests/test_generation_stages.py), or fails with "Already borrowed"."""

    def __init__(self, model_name: str):
        import threading

        self.path = resolve_model(model_name)
        self._local = threading.local()

    def get(self):
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = load_tokenizer(self.path)
        return tokenizer


class ChatGenerator:
    """Ray Data actor: rows with `system`, `user`, `seed` (and optionally `assistant_prefix`, and `sampling`: a
    SamplingConfig as JSON for that row instead of the actor's) in; `outputs`,
    `finish_reasons`, `reject_reason`, `detail`, `new_tokens` appended (with `logprobs`, also
    `output_token_ids` and `output_logprobs`: see generate_chat).

    `then(batch, **then_kwargs)`, when given, runs on the generated batch inside the actor and its result
    is returned instead (the stages commit their parts there). Why not a separate `map_batches` after it:
    a task operator downstream takes an equal share of Ray Data's CPU budget for as long as generation
    runs, and the pool could not grow onto a node that joins; writing where the batch already is also
    saves an object-store hop, and the writers scale with the pool.
    """

    def __init__(self, model_name: str, dtype: str, engine: dict, sampling: dict, seed: int,
                 then=None, then_kwargs: dict | None = None, logprobs: bool = False):
        self.then, self.then_kwargs, self.logprobs = then, dict(then_kwargs or {}), logprobs
        self.engine = EngineConfig.model_validate(engine)
        self.sampling = SamplingConfig.model_validate(sampling)
        # Ray Data runs up to engine.concurrent_batches calls at once (generation_pool_args); they share it.
        self.llm = SharedEngine(create_llm(model_name, dtype, self.engine, seed))
        self.tokenizers = PerThreadTokenizer(model_name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with paced_batch():  # a no-op outside tests (character.inference.gates)
            generated = self.generate(batch)
            return self.then(generated, **self.then_kwargs) if self.then is not None else generated

    def generate(self, batch: pa.Table) -> pa.Table:
        results = generate_chat(
            self.llm, self.tokenizers.get(),
            batch.column("system").to_pylist(), batch.column("user").to_pylist(), batch.column("seed").to_pylist(),
            self.sampling, self.engine.max_model_len,
            batch.column("assistant_prefix").to_pylist() if "assistant_prefix" in batch.column_names else None,
            self.logprobs,
            [None if x is None else SamplingConfig.model_validate_json(x) for x in batch.column("sampling").to_pylist()]
            if "sampling" in batch.column_names else None,
        )
        if self.logprobs:
            batch = (batch.append_column("output_token_ids", pa.array([r.get("output_token_ids", []) for r in results],
                                                                       pa.list_(pa.list_(pa.int32()))))
                     .append_column("output_logprobs", pa.array([r.get("output_logprobs", []) for r in results],
                                                                pa.list_(pa.float64()))))
        return (
            batch.append_column("outputs", pa.array([r["outputs"] for r in results], pa.list_(pa.string())))
            .append_column("finish_reasons", pa.array([r["finish_reasons"] for r in results], pa.list_(pa.string())))
            .append_column("reject_reason", pa.array([r["reject_reason"] for r in results], pa.string()))
            .append_column("detail", pa.array([r.get("detail") for r in results], pa.string()))
            .append_column("new_tokens", pa.array([r.get("new_tokens", 0) for r in results], pa.int64()))
            .append_column("output_tokens", pa.array([r.get("output_tokens", []) for r in results], pa.list_(pa.int64())))
        )


def engine_sized_blocks(ds, engine: EngineConfig):
    """The dataset re-cut into blocks of at most one engine batch, so that every batch is its own task.

    Why: an actor-pool `map_batches` runs each input *block* as one task and slices it into batches inside
    that task. `flat_map` turns a trait into one block of all its requests, and a Parquet part is one block,
    so without this a few huge tasks pin all the work to the first actors: a pool that grows (a node joins)
    finds nothing queued to take, and a lost actor takes a whole trait's work down with it.
    """
    return ds.repartition(target_num_rows_per_block=engine.batch_size)


def generation_pool_args(engine: EngineConfig) -> dict:
    """actor_pool_args for ChatGenerator: `engine.concurrent_batches` calls run at once in each actor."""
    return actor_pool_args(engine, concurrent_calls=engine.concurrent_batches)


def actor_pool_args(engine: EngineConfig, concurrent_calls: int = 1) -> dict:
    """map_batches arguments that shard rows over an autoscaling pool of engine actors.

    `concurrent_calls` > 1 lets Ray Data run that many calls of one actor at once, in threads; only for
    callables that are safe to call so (ChatGenerator, through character.inference.shared_engine).
    """
    import ray.data

    concurrency = {} if concurrent_calls == 1 else dict(
        max_concurrent_calls_per_actor=concurrent_calls, enable_true_multi_threading=True)
    return dict(
        compute=ray.data.ActorPoolStrategy(min_size=engine.actors.min, max_size=engine.actors.max, **concurrency),
        batch_size=engine.batch_size,
        num_cpus=engine.num_cpus_per_actor,
        num_gpus=engine.num_gpus_per_actor if resolved_device(engine) == "cuda" else 0,
        batch_format="pyarrow",
        # The env must be in place before the actor imports vllm.
        runtime_env={"env_vars": engine_env(engine)},
    )


def judge_pool_args(config) -> dict:
    """Ray Data actor-pool arguments for judge workers (rank and evaluate), from `config.judge`."""
    if config.judge.kind != "rule":
        # One call at a time: a model judge's requests are single-token prefills, with no generation tail for
        # a concurrent batch to fill (cf. generation_pool_args).
        return actor_pool_args(config.engine)
    import ray.data

    return dict(compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.engine.actors.max),
                batch_size=config.engine.batch_size, num_cpus=0.5, batch_format="pyarrow")
