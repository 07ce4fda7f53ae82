"""SharedEngine: many Ray Data calls feeding one vLLM engine (continuous batching across batches)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from character.core.config import EngineConfig
from character.inference.shared_engine import SharedEngine


class FakeEngine:
    """vLLM's LLMEngine surface SharedEngine uses. A request finishes `prompt["steps"]` steps after it was
    added and echoes its prompt's text; touching the engine from two threads at once fails the test."""

    def __init__(self, fail_at_step: int | None = None, lose: str | None = None):
        self.live: dict[str, list] = {}
        self.steps, self.most_live, self.fail_at_step, self.lose = 0, 0, fail_at_step, lose
        self._in_use = threading.Lock()

    def _enter(self):
        assert self._in_use.acquire(blocking=False), "the engine was used by two threads at once"

    def add_request(self, request_id, prompt, params):
        self._enter()
        try:
            assert params.output_kind is not None and request_id not in self.live
            if prompt.get("refuse"):
                raise ValueError(f"request {request_id} refused")
            self.live[request_id] = [prompt["text"], prompt["steps"]]
            self.most_live = max(self.most_live, len(self.live))
        finally:
            self._in_use.release()

    def abort_request(self, request_ids):
        self._enter()
        try:
            self.aborted = list(request_ids)
            for request_id in request_ids:
                del self.live[request_id]
        finally:
            self._in_use.release()

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self):
        self._enter()
        try:
            self.steps += 1
            if self.steps == self.fail_at_step:
                raise ValueError("engine broke")
            time.sleep(0.001)  # lets the callers' threads run while a step is "computing"
            finished = []
            for request_id, state in list(self.live.items()):
                state[1] -= 1
                if state[1] <= 0 and state[0] == self.lose:  # finished, but its output never comes back
                    del self.live[request_id]
                elif state[1] <= 0:
                    finished.append(SimpleNamespace(request_id=request_id, finished=True, text=state[0]))
                    del self.live[request_id]
            return finished[::-1]  # out of order on purpose
        finally:
            self._in_use.release()


def fake_llm(**kwargs):
    return SimpleNamespace(llm_engine=FakeEngine(**kwargs))


def call(shared: SharedEngine, name: str, size: int):
    prompts = [{"text": f"{name}-{i}", "steps": 1 + (i * 7) % 5} for i in range(size)]
    return [o.text for o in shared.generate(prompts, [SimpleNamespace(output_kind=None) for _ in prompts])]


def test_concurrent_calls_get_their_own_outputs_in_order_and_overlap_in_the_engine():
    llm = fake_llm()
    shared = SharedEngine(llm)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda k: call(shared, f"c{k}", 20), range(12)))
    assert results == [[f"c{k}-{i}" for i in range(20)] for k in range(12)]
    # Several calls' requests were in the engine together: that is what fills one batch's tail.
    assert llm.llm_engine.most_live > 20
    assert not llm.llm_engine.live
    assert shared.generate([], []) == []
    shared.close()
    assert shared.llm is None  # the stepping thread let go of the engine
    with pytest.raises(RuntimeError, match="closed"):
        call(shared, "late", 1)


def test_one_params_object_serves_every_prompt():
    shared = SharedEngine(fake_llm())
    params = SimpleNamespace(output_kind=None)
    out = shared.generate([{"text": "a", "steps": 2}, {"text": "b", "steps": 1}], params)
    assert [o.text for o in out] == ["a", "b"]


def test_a_refused_request_fails_its_own_call_only():
    llm = fake_llm()
    shared = SharedEngine(llm)
    params = SimpleNamespace(output_kind=None)
    bad = [{"text": "x", "steps": 3}, {"text": "y", "steps": 3, "refuse": True}]
    with pytest.raises(RuntimeError, match="vLLM generation failed") as info:
        shared.generate(bad, params)
    assert "refused" in repr(info.value.__cause__)
    assert len(llm.llm_engine.aborted) == 1 and not llm.llm_engine.live  # its first request was taken back
    assert call(shared, "after", 4) == [f"after-{i}" for i in range(4)]
    shared.close()


def test_an_engine_error_fails_the_waiting_calls_and_every_later_one():
    shared = SharedEngine(fake_llm(fail_at_step=3))
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(call, shared, f"c{k}", 5) for k in range(3)]
        for future in futures:
            with pytest.raises(RuntimeError, match="vLLM generation failed|failed earlier") as info:
                future.result(timeout=30)
            assert "engine broke" in repr(info.value.__cause__)
    with pytest.raises(RuntimeError, match="failed earlier"):
        call(shared, "late", 2)


def test_a_request_that_never_comes_back_fails_the_calls_instead_of_hanging():
    shared = SharedEngine(fake_llm(lose="c0-3"))
    with pytest.raises(RuntimeError, match="vLLM generation failed") as info:
        call(shared, "c0", 6)
    assert "never came back" in str(info.value.__cause__)


def test_generation_pool_args_run_concurrent_calls_only_for_the_generator():
    from character.inference.engine import actor_pool_args, generation_pool_args

    engine = EngineConfig(concurrent_batches=3, actors={"min": 1, "max": 2})
    compute = generation_pool_args(engine)["compute"]
    assert (compute.min_size, compute.max_size) == (1, 2)
    assert compute.max_concurrent_calls_per_actor == 3 and compute.enable_true_multi_threading
    single = actor_pool_args(engine)["compute"]  # e.g. the rank stage's judge: one call at a time
    assert single.max_concurrent_calls_per_actor is None and not single.enable_true_multi_threading


@pytest.mark.slow
def test_real_vllm_outputs_are_the_same_as_one_generate_call():
    """Per-request seeds: concurrent calls through one engine reproduce a single LLM.generate exactly."""
    import gc

    from character.core.config import SamplingConfig
    from character.inference.engine import create_llm, generate_chat
    from character.models.loading import load_tokenizer

    engine = EngineConfig(max_model_len=512, kv_cache_gib=1, num_cpus_per_actor=2)
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_tokens=16, n=2)
    llm = create_llm("tiny-llama", "float32", engine, seed=0)
    tokenizer = load_tokenizer("tiny-llama")
    users = [f"Tell me about question {i}." for i in range(24)]
    seeds = [1000 + i for i in range(24)]

    def chat(runner, lo, hi):
        return generate_chat(runner, tokenizer, [""] * (hi - lo), users[lo:hi], seeds[lo:hi], sampling, 512)

    try:
        expected = chat(llm, 0, 24)
        shared = SharedEngine(llm)
        with ThreadPoolExecutor(3) as pool:
            parts = list(pool.map(lambda lo: chat(shared, lo, lo + 8), (0, 8, 16)))
        got = [r for part in parts for r in part]
        assert [r["outputs"] for r in got] == [r["outputs"] for r in expected]
        assert [r["finish_reasons"] for r in got] == [r["finish_reasons"] for r in expected]
        assert all(len(r["outputs"]) == 2 for r in got)
        shared.close()
    finally:
        del llm
        gc.collect()
