"""One in-process vLLM engine fed by several Ray Data batches at once: continuous batching across batches.

Why: `LLM.generate` runs one batch to its end, and its last steps run with only the batch's longest few
sequences while the engine's other slots sit idle. At Ray Data's batch sizes that tail costs ~13 % of
the generation time on the tiny model here (64-row calls vs one call over the same 840 prompts). Ray Data
can run several calls of one actor at once (`ActorPoolStrategy(max_concurrent_calls_per_actor=N,
enable_true_multi_threading=True)`); this class lets those calls share the engine, so the next batch's
requests fill the slots the previous batch's tail leaves free. `ray.data.llm` gets the same effect from
vLLM's AsyncLLMEngine in a separate engine process (`max_concurrent_batches`); we keep the in-process
`vllm.LLM` (why: character/inference/engine.py), which has no async front end, so we step it ourselves.

vLLM's engine is not thread-safe: only the one stepping thread ever touches it. Callers hand their
requests over and wait; the stepping thread adds them between steps (`LLMEngine.add_request` under ids
of our own, which finished outputs carry back) and gives every finished request to the call that owns it.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any


class _Call:
    def __init__(self, prompts: list, params: list):
        self.prompts, self.params = prompts, params
        self.outputs: list[Any] = [None] * len(prompts)
        self.remaining = len(prompts)
        self.error: BaseException | None = None
        self.done = threading.Event()


class SharedEngine:
    """`generate(prompts, params)` like `vllm.LLM.generate`, callable from many threads at once."""

    def __init__(self, llm):
        self.llm = llm
        self._lock = threading.Condition()
        self._intake: list[_Call] = []
        self._error: BaseException | None = None
        self._closed = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="vllm-stepper", daemon=True)
        self._thread.start()

    def generate(self, prompts: list, params, use_tqdm: bool = False) -> list:
        """Outputs in the order of `prompts`; `params` one SamplingParams or one per prompt."""
        prompts = list(prompts)
        call = _Call(prompts, list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts))
        if not call.prompts:
            return []
        with self._lock:
            if self._error is not None:
                raise RuntimeError("the shared vLLM engine failed earlier") from self._error
            if self._closed:
                raise RuntimeError("the shared vLLM engine is closed")
            self._intake.append(call)
            self._lock.notify()
        call.done.wait()
        if call.error is not None:
            raise RuntimeError("vLLM generation failed") from call.error
        return call.outputs

    def close(self) -> None:
        """Stop the stepping thread once the calls in flight are done (it then lets go of the engine)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def _run(self) -> None:
        from vllm.sampling_params import RequestOutputKind

        owners: dict[str, tuple[_Call, int]] = {}  # vLLM request id -> (its call, its index there)
        while True:
            with self._lock:
                while not self._intake and not owners and not self._closed:
                    self._lock.wait()
                if self._closed and not self._intake and not owners:
                    self.llm = None
                    return
                new, self._intake = self._intake, []
            for call in new:
                self._add(call, owners, RequestOutputKind.FINAL_ONLY)
            try:
                for output in self.llm.llm_engine.step():
                    if not output.finished or output.request_id not in owners:
                        continue
                    call, index = owners.pop(output.request_id)
                    call.outputs[index] = output
                    call.remaining -= 1
                    if call.remaining == 0:
                        call.done.set()
                if owners and not self.llm.llm_engine.has_unfinished_requests():  # fail, rather than spin forever
                    raise RuntimeError(f"vLLM has no work left but {len(owners)} request(s) never came back finished")
            except BaseException as exc:  # the engine's state is unknown now: fail every call, now and later
                with self._lock:
                    self._error = exc
                    failed, self._intake = self._intake + [c for c, _ in owners.values()], []
                for call in failed:
                    call.error = exc
                    call.done.set()
                return

    def _add(self, call: _Call, owners: dict, final_only) -> None:
        """Add one call's requests; a request vLLM refuses fails that call alone, as LLM.generate would."""
        added = []
        try:
            for index, (prompt, params) in enumerate(zip(call.prompts, call.params)):
                request_id = f"shared-{next(self._ids)}"
                params.output_kind = final_only  # as LLM.generate: no partial outputs
                self.llm.llm_engine.add_request(request_id, prompt, params)
                added.append(request_id)
                owners[request_id] = (call, index)
        except Exception as exc:
            if added:
                self.llm.llm_engine.abort_request(added)
            for request_id in added:
                owners.pop(request_id)
            call.error = exc
            call.done.set()
