"""Local generation with transformers, batching concurrent requests dynamically.

Every ``generate()`` call is queued for one decode thread. Requests with different sampling settings,
stop strings and token budgets share a batch:

* continuous batching (default, models whose KV cache is a plain ``DynamicCache``): a decode loop
  (:class:`~magpie_hub.generate.backends.local.continuous.ContinuousBatcher`) over a preallocated KV cache
  lets finished rows leave at once and prefills queued requests into the free slots, so the batch stays
  full; a prompt prefix that requests share (the pre-query, a system prompt) is prefilled once and copied
  into each row (``prefix_cache``);
* otherwise (sliding-window caches, or ``continuous=False``): FIFO groups of up to ``batch_size`` (waiting
  at most ``max_wait_ms`` to fill) run through ``model.generate`` with
  :class:`~magpie_hub.generate.backends.local.batching.RowSampler` and
  :class:`~magpie_hub.generate.backends.local.batching.RowStopper`; finished rows are padded.

In both paths each row samples with its own temperature / top-p and its own ``torch.Generator`` seeded with
the request's seed, so a row's text does not depend on the batch it lands in (same recipe + seed -> same
rows); each row stops at the chat format's end-of-turn ids, its request's stop strings (single special
tokens by id, other strings with transformers' ``StopStringCriteria``) or its own ``max_new_tokens``.
Prompts are tokenized with ``add_special_tokens=False`` when they already carry the BOS text (never a
doubled BOS). dtype ``auto`` and the thread policy: :mod:`.device` (bf16 on GPUs and on CPUs with bf16
matrix instructions; the choice and its reason are in :meth:`TransformersBackend.info`); a GPU gets a
``device_map`` (one GPU per data-parallel rank).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from magpie_hub.errors import BackendError, ModelError
from magpie_hub.generate.backends.base import (
    Backend,
    BackendInfo,
    BackendOptions,
    GenerationRequest,
    GenerationResult,
    cut_at_stop,
)
from magpie_hub.generate.backends.local.batching import Row, RowPenalty, RowSampler, RowStopper
from magpie_hub.generate.backends.local.continuous import ContinuousBatcher, cache_shapes
from magpie_hub.generate.backends.local.device import pick_dtype, pick_threads

log = logging.getLogger(__name__)


class TransformersOptions(BackendOptions):
    batch_size: int = Field(32, ge=1)
    dtype: Literal["auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"] = "auto"
    device_map: Any = None
    max_wait_ms: float = 20.0
    num_threads: int | None = Field(None, ge=0)
    trust_remote_code: bool = False
    continuous: bool = True               # continuous batching when the model's cache allows it
    prefix_cache: bool = True             # prefill a shared prompt prefix once (continuous batching)


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future


class TransformersBackend(Backend):
    """A local ``AutoModelForCausalLM`` with dynamic batching of concurrent requests."""

    name = "transformers"
    Options = TransformersOptions

    def __init__(self, model: str, *, revision: str | None = None, chat_format=None, **options):
        """``chat_format``: the model's loaded chat format (a tag step passes its own), else loaded here."""
        opts = self.parse_options(options)
        self.model_id, self.revision = model, revision
        self.batch_size = opts.batch_size
        self.dtype_option, self.device_map = opts.dtype, opts.device_map
        self.max_wait = max(0.0, opts.max_wait_ms) / 1000.0
        self.num_threads = opts.num_threads
        self.trust_remote_code = opts.trust_remote_code
        self.chat_format = chat_format
        self.continuous = opts.continuous
        self.prefix_cache = opts.prefix_cache
        self.choices: dict[str, str] = {}     # why this dtype / thread count (info, manifest)
        self.model = self.tokenizer = None
        self._batcher: ContinuousBatcher | None = None
        self._inbox = self._serving = None
        self._outstanding: set[asyncio.Future] = set()
        self.batches = 0                      # statistics (bench, tests)
        self.batch_rows = 0
        self.max_batch_seen = 0
        self.busy_s = 0.0                     # wall time spent inside model.generate batches
        self.padded_steps = 0                 # rows x decode steps computed (generated tokens <= this)
        self._queue: deque[_Pending] = deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stop_cache: dict[str, object] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.model is None:
            await asyncio.to_thread(self._load)
        if self._worker is not None or self._serving is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="magpie-generate")
        if self._batcher is not None:
            import queue

            loop = asyncio.get_running_loop()
            self._inbox = queue.SimpleQueue()
            self._serving = loop.run_in_executor(self._executor, self._batcher.run, self._inbox, self._finish_row)
            self._serving.add_done_callback(self._serving_ended)
        else:
            self._wake = asyncio.Event()
            self._worker = asyncio.create_task(self._work())

    def _serving_ended(self, serving: asyncio.Future) -> None:
        exc = serving.exception() if not serving.cancelled() else None
        if exc is not None and type(exc).__name__ == "OutOfMemoryError":
            exc = BackendError(f"out of memory with batch_size {self.batch_size}: lower backend_options.batch_size "
                               "or max_new_tokens")
        for future in list(self._outstanding):       # a crashed decode loop: every waiting caller hears of it
            if not future.done():
                if exc is not None:
                    future.set_exception(exc)
                else:
                    future.set_result(GenerationResult("", "error", 0, error="backend closed"))

    async def close(self) -> None:
        if self._serving is not None:
            self._inbox.put(None)
            await asyncio.gather(self._serving, return_exceptions=True)
            self._serving = self._inbox = None
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_result(GenerationResult("", "error", 0, error="backend closed"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _threads(self) -> None:
        import torch

        threads, why = pick_threads(self.num_threads)
        if threads:
            torch.set_num_threads(threads)
        self.choices["threads"] = f"{torch.get_num_threads()} ({why})"

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        # imported here, not at the top: both import transformers, and the recipe loader imports this
        # module (for TransformersOptions) at CLI start
        from magpie_hub.chat.format import load_chat_format
        from magpie_hub.models import resolve_model

        path = resolve_model(self.model_id)
        fmt = self.chat_format or load_chat_format(self.model_id, self.revision)
        cuda = torch.cuda.is_available()
        name, why = pick_dtype(self.dtype_option, cuda)
        dtype = getattr(torch, name)
        self.choices["dtype"] = f"{name} ({why})"
        device_map = self.device_map
        if device_map is None and cuda:
            device_map = {"": int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()}
        try:
            model = AutoModelForCausalLM.from_pretrained(path, revision=self.revision, dtype=dtype,
                                                         device_map=device_map,
                                                         trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ModelError(f"cannot load model {self.model_id} ({first}): download it first "
                             "(`hf download MODEL`) or pass a local model folder") from None
        model.eval()
        self._threads()
        tok = fmt.tokenizer
        tok.padding_side = "left"
        stop_ids = [int(i) for i in fmt.stop_token_ids if i is not None]
        # role-header tokens end a turn too: decoding skips special tokens, so a header the model writes would
        # otherwise leave its text ("assistant") inside the turn (docs/fidelity.md)
        stop_ids += [int(i) for i in getattr(fmt, "role_marker_ids", ()) if i is not None and int(i) not in stop_ids]
        if tok.pad_token_id is None:
            if not stop_ids:
                raise ModelError(f"{self.model_id} defines neither a pad nor an end-of-turn token: fix its tokenizer")
            tok.pad_token_id = stop_ids[0]
        model.generation_config = GenerationConfig(pad_token_id=tok.pad_token_id)   # no hidden processors
        self.chat_format, self.tokenizer, self.model = fmt, tok, model
        self.stop_ids = stop_ids
        self._specials = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values()}
        self.device = model.device
        self.dtype = str(dtype).removeprefix("torch.")
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        shapes = cache_shapes(model) if self.continuous else None
        if shapes:
            self._batcher = ContinuousBatcher(model, shapes=shapes, batch_size=self.batch_size,
                                              pad_id=tok.pad_token_id, max_wait=self.max_wait,
                                              prefix_cache=self.prefix_cache)

    # -- requests --------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self._worker is None and self._serving is None:
            raise BackendError("the transformers backend is not started: use `async with backend:`")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._serving is not None:
            if self._serving.done():
                raise BackendError("the transformers backend's decode loop has stopped: restart the build")
            ids = self._encode(request.prompt)
            budget = self._budget(request, ids)
            if budget < 1:
                return self._too_long(ids)
            end_ids, criterion = self._row_stops(tuple(request.stop))
            row = Row(request=request, ids=ids, budget=budget, end_ids=end_ids, criterion=criterion,
                      deliver=lambda result: loop.call_soon_threadsafe(_settle, future, result))
            self._outstanding.add(future)
            future.add_done_callback(self._outstanding.discard)
            self._inbox.put(row)
            return await future
        self._queue.append(_Pending(request, future))
        self._wake.set()
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            deadline = loop.time() + self.max_wait
            while len(self._queue) < self.batch_size and loop.time() < deadline:
                await asyncio.sleep(min(0.002, max(0.0, deadline - loop.time())))
            batch = []
            while self._queue and len(batch) < self.batch_size:
                item = self._queue.popleft()
                if not item.future.done():            # the caller was cancelled
                    batch.append(item)
            if not self._queue:
                self._wake.clear()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch,
                                                     [item.request for item in batch])
            except Exception as exc:                  # noqa: BLE001 - every waiting caller must hear of it
                import torch

                if isinstance(exc, torch.OutOfMemoryError) and self.batch_size > 1:
                    self.batch_size = max(1, self.batch_size // 2)
                    log.warning("out of memory: batch_size lowered to %d", self.batch_size)
                    results = [GenerationResult("", "error", 0, error="out of memory") for _ in batch]
                else:
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)

    def _stop_plan(self, stop: tuple[str, ...]) -> tuple[list[int], object | None]:
        """Stop strings -> (ids of those that are one special token, StopStringCriteria for the rest)."""
        from transformers import StopStringCriteria

        tok = self.tokenizer
        ids, strings = [], []
        for s in stop:
            tid = tok.convert_tokens_to_ids(s) if s in self._specials else None
            if isinstance(tid, int) and tid != tok.unk_token_id:
                ids.append(tid)
            elif s:
                strings.append(s)
        key = "\x00".join(sorted(strings))
        if strings and key not in self._stop_cache:
            self._stop_cache[key] = StopStringCriteria(tokenizer=tok, stop_strings=sorted(strings))
        return ids, (self._stop_cache[key] if strings else None)

    def _budget(self, request: GenerationRequest, ids: list[int]) -> int:
        budget = request.params.max_new_tokens
        return budget if self.context is None else min(budget, self.context - len(ids))

    def _too_long(self, ids: list[int]) -> GenerationResult:
        return GenerationResult("", "error", 0, error=f"prompt of {len(ids)} tokens fills the model's context "
                                f"({self.context})")

    def _row_stops(self, stop: tuple[str, ...]) -> tuple[set[int], object | None]:
        ids, criterion = self._stop_plan(stop)
        return set(self.stop_ids) | set(ids), criterion

    def _finish_row(self, row: Row) -> None:
        """Decode loop thread: a row is finished; hand its result to the event loop."""
        result = self._result(row.tokens, len(row.tokens), row.stop_hit, row.budget, row.end_ids,
                              tuple(row.request.stop))
        self.batch_rows += 1
        row.deliver(result)

    def _encode(self, prompt: str) -> list[int]:
        fmt, bos = self.chat_format, self.tokenizer.bos_token
        carries_bos = bool(getattr(fmt, "bos_in_template", False)) or bool(bos and prompt.startswith(bos))
        return list(self.tokenizer(prompt, add_special_tokens=not carries_bos)["input_ids"])

    def _run_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        started = time.monotonic()
        results: list[GenerationResult | None] = [None] * len(requests)
        encoded, rows = [], []
        for i, req in enumerate(requests):
            ids = self._encode(req.prompt)
            budget = self._budget(req, ids)
            if budget < 1:
                results[i] = self._too_long(ids)
                continue
            encoded.append(ids)
            rows.append((i, req, budget))
        if not rows:
            return results
        batch = self.tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt")
        input_ids = batch["input_ids"].to(self.device)
        attention = batch["attention_mask"].to(self.device)
        prompt_len = input_ids.shape[1]
        by_stop: dict[tuple[str, ...], list[int]] = {}
        for r, (_, req, _) in enumerate(rows):
            by_stop.setdefault(tuple(req.stop), []).append(r)
        groups, end_ids = [], [set(self.stop_ids)] * len(rows)
        for stop, members in by_stop.items():
            ids, criterion = self._stop_plan(stop)
            groups.append((members, ids, criterion))
            for r in members:
                end_ids[r] = set(self.stop_ids) | set(ids)
        budgets = [b for _, _, b in rows]
        stopper = RowStopper(prompt_len, budgets, self.stop_ids, groups, self.device)
        sampler = RowSampler([float(req.params.temperature) for _, req, _ in rows],
                             [float(req.params.top_p) for _, req, _ in rows],
                             [req.params.seed for _, req, _ in rows],
                             [RowPenalty.of(req.params, ids) for ids, (_, req, _) in zip(encoded, rows, strict=True)],
                             prompt_len)
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max(budgets),
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids or None)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                                      logits_processor=[sampler], stopping_criteria=StoppingCriteriaList([stopper]))
        done_at, stopped = stopper.done_at.tolist(), stopper.stopped.tolist()
        generated = out[:, prompt_len:].tolist()
        for r, (i, req, budget) in enumerate(rows):
            results[i] = self._result(generated[r], done_at[r], stopped[r], budget, end_ids[r], tuple(req.stop))
        self.batches += 1
        self.busy_s += time.monotonic() - started
        self.padded_steps += len(rows) * (out.shape[1] - prompt_len)
        self.batch_rows += len(rows)
        self.max_batch_seen = max(self.max_batch_seen, len(rows))
        log.debug("batch of %d rows, %d prompt tokens, %.2fs", len(rows), prompt_len, time.monotonic() - started)
        return results

    def _result(self, tokens: list[int], done_at: int, stopped: bool, budget: int, end_ids: set[int],
                stop: tuple[str, ...]) -> GenerationResult:
        n = done_at if done_at >= 0 else min(len(tokens), budget)
        kept = tokens[:n]
        if stopped and kept and kept[-1] in end_ids:
            kept = kept[:-1]                           # the end-of-turn token is not part of the text
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        if stopped:
            text, _ = cut_at_stop(text, stop)
        return GenerationResult(text=text, finish_reason="stop" if stopped else "length", generated_tokens=n)

    def stats(self) -> dict:
        """Rows served, decode steps and row-steps computed (generated tokens <= row_steps)."""
        if self._batcher is not None:
            b = self._batcher
            return {"rows": self.batch_rows, **b.stats(), "mean_batch": b.row_steps / max(1, b.steps)}
        return {"rows": self.batch_rows, "steps": self.batches, "row_steps": self.padded_steps,
                "prefills": self.batches, "mean_batch": self.batch_rows / max(1, self.batches)}

    def info(self) -> BackendInfo:
        revision = self.revision
        if revision is None and self.model is not None:
            revision = getattr(self.model.config, "_commit_hash", None)
        extra = {"batch_size": self.batch_size, "continuous_batching": self._batcher is not None,
                 "prefix_cache": self._batcher is not None and self._batcher.prefixes is not None}
        if self.model is not None:
            extra.update(dtype=self.dtype, device=str(self.device), choices=dict(self.choices))
        return BackendInfo(name=self.name, model_id=self.model_id, model_revision=revision,
                           max_concurrency=self.batch_size, extra=extra)


def _settle(future: asyncio.Future, result: GenerationResult) -> None:
    if not future.done():                         # the caller may have been cancelled meanwhile
        future.set_result(result)
