"""Continuous batching for :mod:`magpie_hub.generate.backends.local.transformers`.

:class:`ContinuousBatcher` is a decode loop over a :class:`~magpie_hub.generate.backends.local.kvcache.SlotCache`:
finished rows leave the batch at once and queued requests are prefilled into the free slots, so the batch
stays full instead of waiting for its longest row, as ``model.generate`` batches do. A prompt prefix that
requests share (the pre-query, a system prompt) is prefilled once and copied into each new row
(:class:`~magpie_hub.generate.backends.local.prefix.PrefixCache`); only the rest of a prompt is prefilled.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

from magpie_hub.generate.backends.local.batching import Row, penalize, sample_rows
from magpie_hub.generate.backends.local.kvcache import SlotCache
from magpie_hub.generate.backends.local.prefix import Prefix, PrefixCache

PREFILL_TOKENS = 2048          # query positions per prefill forward (rows x padded suffix width)
CACHE_COLUMNS = 256            # initial KV cache width (it grows as rows get longer)


def cache_shapes(model) -> list[tuple[int, int]] | None:
    """(kv heads, head dim) per layer when a one-token forward builds a cache of plain ``DynamicLayer``s
    (no sliding windows) and the attention takes a 4D mask (sdpa, eager); None otherwise."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return None
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=model.device), cache=cache, use_cache=True)
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in layers]


class ContinuousBatcher:
    """``run(inbox, finish)`` loops until it reads ``None`` from ``inbox`` (a ``queue.SimpleQueue`` of
    :class:`Row`), calling ``finish(row)`` for every finished row."""

    def __init__(self, model, *, shapes: list[tuple[int, int]], batch_size: int, pad_id: int, max_wait: float,
                 admit_min: int | None = None, prefix_cache: bool = True):
        self.model, self.shapes, self.batch_size, self.pad_id = model, shapes, batch_size, pad_id
        self.max_wait = max_wait
        self.admit_min = admit_min or max(1, batch_size // 4)
        self.prefixes = PrefixCache() if prefix_cache else None
        self.cache: SlotCache | None = None
        self.steps = self.prefills = self.row_steps = 0
        self.prompt_tokens = self.prefilled_tokens = 0           # prompt tokens admitted / run through the model

    def stats(self) -> dict:
        out = {"steps": self.steps, "row_steps": self.row_steps, "prefills": self.prefills,
               "prompt_tokens": self.prompt_tokens, "prefilled_tokens": self.prefilled_tokens}
        if self.prefixes is not None:
            out["prefixes"] = self.prefixes.created
        return out

    def run(self, inbox: queue.SimpleQueue, finish: Callable[[Row], None]) -> None:
        import torch

        if self.cache is None:
            attn = getattr(self.model.config, "_attn_implementation", "sdpa")
            self.cache = SlotCache(self.shapes, slots=self.batch_size, dtype=self.model.dtype,
                                   device=self.model.device, capacity=CACHE_COLUMNS, bool_mask=attn != "eager")
        self.cache.reset()
        with torch.inference_mode():
            self._loop(inbox, finish)

    def _loop(self, inbox, finish) -> None:
        import torch

        cache = self.cache
        rows: list[Row] = []
        waiting: list[Row] = []
        logits = None
        first_wait = None
        closing = False
        while True:
            # 1. collect requests: block only when idle
            while not closing and (not rows and not waiting):
                item = inbox.get()
                if item is None:
                    closing = True
                else:
                    waiting.append(item)
            while not closing:
                try:
                    item = inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                else:
                    waiting.append(item)
            if waiting and first_wait is None:
                first_wait = time.monotonic()              # when the oldest waiting request arrived (about)
            if closing and not rows and not waiting:
                return
            free = self.batch_size - len(rows)
            if waiting and free > 0:
                due = (first_wait is not None and time.monotonic() - first_wait >= self.max_wait) or closing
                if not rows and not due and len(waiting) < self.batch_size:
                    time.sleep(min(0.002, self.max_wait))      # idle: let a first batch fill up
                    continue
                if not rows or due or len(waiting) >= min(free, self.admit_min):
                    new, waiting = waiting[:free], waiting[free:]
                    first_wait = time.monotonic() if waiting else None
                    new, new_logits = self._admit(new)
                    rows = rows + new
                    logits = new_logits if logits is None else torch.cat([logits, new_logits])
            if not rows:
                continue
            # 2. one token for every row; finished rows leave the batch (the last row moves into the slot)
            tokens = sample_rows(penalize(logits, rows), [r.request.params.temperature for r in rows],
                                 [r.request.params.top_p for r in rows], [r.generator for r in rows])
            token_list = tokens.tolist()
            finished = [i for i, (row, token) in enumerate(zip(rows, token_list, strict=True)) if row.step(token)]
            self.row_steps += len(rows)
            self.steps += 1
            for i in reversed(finished):
                finish(rows[i])
                moved = cache.remove(i)
                rows[i] = rows[moved]
                rows.pop()
            if not rows:
                logits = None
                continue
            if finished:
                cache.compact()
            # 3. forward the new tokens
            tokens = torch.tensor([r.tokens[-1] for r in rows], device=self.model.device)
            mask, positions = cache.decode_step()
            out = self.model(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=positions,
                             cache=cache, use_cache=True, logits_to_keep=1)
            cache.advance()
            logits = out.logits[:, -1].float()

    def _admit(self, new: list[Row]):
        """Place ``new`` in free slots: copy each one's longest cached prefix, prefill the rest. Returns the
        rows in slot order and their next-token logits."""
        import torch

        keys = [tuple(r.ids) for r in new]
        if self.prefixes is not None:
            for key in keys:
                proposal = self.prefixes.propose(key)
                if proposal is not None:
                    self.prefixes.add(self._prefill_prefix(proposal))
            matches = [self.prefixes.longest(key) for key in keys]
        else:
            matches = [None] * len(new)
        plen = [len(m.ids) if m is not None else 0 for m in matches]
        suffix = [len(key) - p for key, p in zip(keys, plen, strict=True)]
        # rows to prefill first (longest rest first, so chunks pad little), then rows that are all prefix
        order = sorted(range(len(new)), key=lambda i: (-suffix[i], id(matches[i]), -len(keys[i])))
        new, keys, matches = [new[i] for i in order], [keys[i] for i in order], [matches[i] for i in order]
        plen, suffix = [plen[i] for i in order], [suffix[i] for i in order]
        cache = self.cache
        first = cache.place([len(k) for k in keys])
        start = 0
        while start < len(new):                   # copy prefixes: one write per run of equal (prefix, length)
            end = start + 1
            while (end < len(new) and matches[end] is matches[start] and len(keys[end]) == len(keys[start])):
                end += 1
            if matches[start] is not None:
                cache.write_prefix(slice(first + start, first + end), cache.width - len(keys[start]),
                                   matches[start].kv)
            start = end
        logits = [None] * len(new)
        start = 0
        while start < len(new) and suffix[start] > 0:
            width = suffix[start]
            end = start + 1
            while end < len(new) and suffix[end] > 0 and (end - start + 1) * width <= PREFILL_TOKENS:
                end += 1
            ids = torch.full((end - start, width), self.pad_id, dtype=torch.long)
            for i in range(start, end):
                ids[i - start, width - suffix[i]:] = torch.tensor(keys[i][plen[i]:])
            mask, positions = cache.prefill(slice(first + start, first + end), suffix[start:end], width)
            out = self.model(input_ids=ids.to(self.model.device), attention_mask=mask, position_ids=positions,
                             cache=cache, use_cache=True, logits_to_keep=1)
            cache.finish_prefill()
            logits[start:end] = list(out.logits[:, -1].float())
            self.prefills += 1
            start = end
        for i in range(len(new)):
            if suffix[i] == 0:
                logits[i] = matches[i].logits
        self.prompt_tokens += sum(len(k) for k in keys)
        self.prefilled_tokens += sum(suffix)
        if self.prefixes is not None:
            self.prefixes.reused_tokens += sum(plen)
        return new, torch.stack(logits)

    def _prefill_prefix(self, ids: tuple[int, ...]) -> Prefix:
        """Prefill a shared prefix alone, through the same masked forward as any prompt: its keys/values
        differ from those of a batched prefill only by the rounding of differently shaped matmuls."""
        import torch

        cache = SlotCache(self.shapes, slots=1, dtype=self.model.dtype, device=self.model.device,
                          capacity=len(ids), bool_mask=self.cache.bool_mask)
        cache.place([len(ids)])
        mask, positions = cache.prefill(slice(0, 1), [len(ids)], len(ids))
        out = self.model(input_ids=torch.tensor([ids], device=self.model.device), attention_mask=mask,
                         position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        self.prefilled_tokens += len(ids)
        self.prefixes.prefilled_tokens += len(ids)
        return Prefix(ids=ids, kv=[(k[0, :, :len(ids)], v[0, :, :len(ids)]) for k, v in zip(cache.k, cache.v,
                                                                                           strict=True)],
                      logits=out.logits[0, -1].float())
