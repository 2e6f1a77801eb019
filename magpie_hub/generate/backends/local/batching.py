"""Per-row sampling and continuous batching for :mod:`magpie_hub.generate.backends.local.transformers`.

* :func:`sample_rows` draws each row's next token with that row's temperature / top-p and its own
  ``torch.Generator`` (one uniform number per step, inverse CDF): a row's text depends only on its seed
  and its logits, never on the other rows of the batch.
* :class:`ContinuousBatcher` is a decode loop over a KV cache (``DynamicCache`` of plain layers): finished
  rows leave the batch at once and queued requests are prefilled and merged in (left-padded), so the
  batch stays full instead of waiting for its longest row, as ``model.generate`` batches do.
* :class:`RowSampler` and :class:`RowStopper` are the per-row sampling and stopping of the
  ``model.generate`` fallback path.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from magpie_hub.generate.backends.base import GenerationRequest, GenerationResult


def make_generator(seed: int | None):
    import torch

    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed) % (2**64))
    return gen


def sample_rows(scores, temperatures: list[float], top_ps: list[float], generators: list):
    """Next token per row of ``scores`` (B x V): argmax for temperature 0, else a seeded top-p draw."""
    import torch

    scores = scores.float()
    choice = scores.argmax(dim=-1)
    plain = [r for r, (t, p) in enumerate(zip(temperatures, top_ps, strict=True)) if t > 0.0 and p >= 1.0]
    nucleus = [r for r, (t, p) in enumerate(zip(temperatures, top_ps, strict=True)) if t > 0.0 and p < 1.0]
    for rows, is_nucleus in ((plain, False), (nucleus, True)):
        if not rows:
            continue
        u = torch.stack([torch.rand((), generator=generators[r], dtype=torch.float64) for r in rows])
        idx = torch.tensor(rows, device=scores.device)
        temps = torch.tensor([temperatures[r] for r in rows], device=scores.device).unsqueeze(1)
        probs = torch.softmax(scores[idx] / temps, dim=-1).double()
        if is_nucleus:
            top_p = torch.tensor([top_ps[r] for r in rows], dtype=torch.float64, device=scores.device)
            probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            keep = (probs.cumsum(-1) - probs) < top_p.unsqueeze(1)        # smallest set with mass >= top_p
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        cdf = probs.cumsum(-1)
        target = (u.to(scores.device) * cdf[:, -1]).unsqueeze(1)
        pos = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[1] - 1)
        choice[idx] = (order.gather(1, pos) if is_nucleus else pos).squeeze(1)
    return choice


class RowSampler:
    """Logits processor for the ``model.generate`` path: picks each row's next token with
    :func:`sample_rows` (returns 0 there and -inf elsewhere, so the greedy step of ``generate`` takes it)."""

    def __init__(self, temperatures: list[float], top_ps: list[float], seeds: list[int | None]):
        self.temperatures, self.top_ps = temperatures, top_ps
        self.generators = [make_generator(seed) for seed in seeds]

    def __call__(self, input_ids, scores):
        import torch

        choice = sample_rows(scores, self.temperatures, self.top_ps, self.generators)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, choice.unsqueeze(1), 0.0)
        return out


class RowStopper:
    """Stopping criterion with per-row end-of-turn ids, stop strings and token budgets. Records, per row,
    how many tokens it generated (``done_at``, the end-of-turn token included) and whether it stopped."""

    def __init__(self, prompt_len: int, max_new: list[int], global_ids: list[int],
                 groups: list[tuple[list[int], list[int], object | None]], device):
        import torch

        self.prompt_len = prompt_len
        self.eos_token_id = global_ids        # the attribute makes generate() pad finished rows
        self.max_new = torch.tensor(max_new, device=device)
        self.global_ids = torch.tensor(global_ids or [-1], device=device)
        self.groups = []
        for rows, ids, criterion in groups:
            mask = torch.zeros(len(max_new), dtype=torch.bool, device=device)
            mask[rows] = True
            self.groups.append((mask, torch.tensor(ids or [-1], device=device), criterion))
        self.done_at = torch.full((len(max_new),), -1, dtype=torch.long, device=device)
        self.stopped = torch.zeros(len(max_new), dtype=torch.bool, device=device)

    def __call__(self, input_ids, scores=None, **kwargs):
        import torch

        n = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1]
        hit = torch.isin(last, self.global_ids)
        for mask, ids, criterion in self.groups:
            row_hit = torch.isin(last, ids)
            if criterion is not None:
                row_hit = row_hit | criterion(input_ids, scores).to(row_hit.device)
            hit = hit | (row_hit & mask)
        open_rows = self.done_at < 0
        new_stop = hit & open_rows
        self.stopped |= new_stop
        finished = new_stop | (open_rows & (n >= self.max_new))
        self.done_at = torch.where(finished, torch.full_like(self.done_at, n), self.done_at)
        return self.done_at >= 0


@dataclass
class Row:
    """One request in flight."""

    request: GenerationRequest
    ids: list[int]                           # prompt token ids
    budget: int                              # max new tokens for this row
    end_ids: set[int]                        # token ids that end the turn
    criterion: object | None                 # StopStringCriteria for the row's other stop strings
    deliver: Callable[[GenerationResult], None]
    generator: object = None
    tokens: list[int] = field(default_factory=list)
    stop_hit: bool = False

    def __post_init__(self):
        if self.generator is None:
            self.generator = make_generator(self.request.params.seed)

    def step(self, token: int) -> bool:
        """Append ``token``; True when the row is finished (``stop_hit``: an end of turn, else its budget)."""
        import torch

        self.tokens.append(token)
        if token in self.end_ids or (self.criterion is not None and
                                     bool(self.criterion(torch.tensor([self.tokens[-64:]]), None)[0])):
            self.stop_hit = True
            return True
        return len(self.tokens) >= self.budget


class ContinuousBatcher:
    """Continuous batching over a model whose KV cache is a ``DynamicCache`` of plain ``DynamicLayer``s.

    ``run(inbox)`` loops until it reads ``None`` from ``inbox`` (a ``queue.SimpleQueue`` of :class:`Row`),
    calling ``finish(row)`` for every finished row."""

    def __init__(self, model, *, batch_size: int, pad_id: int, max_wait: float, admit_min: int | None = None):
        self.model, self.batch_size, self.pad_id, self.max_wait = model, batch_size, pad_id, max_wait
        self.admit_min = admit_min or max(1, batch_size // 4)
        self.steps = self.prefills = self.row_steps = 0

    @staticmethod
    def supported(model) -> bool:
        """True when a one-token forward builds a cache of plain DynamicLayers (no sliding windows)."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=model.device), cache=cache,
                  use_cache=True)
        layers = getattr(cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def run(self, inbox: queue.SimpleQueue, finish: Callable[[Row], None]) -> None:
        import torch

        with torch.inference_mode():
            self._loop(inbox, finish)

    def _loop(self, inbox, finish) -> None:
        import torch

        rows: list[Row] = []
        waiting: list[Row] = []
        cache = mask = logits = None
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
                    cache, mask, logits = self._admit(new, rows, cache, mask, logits)
                    rows = rows + new
            if not rows:
                continue
            # 2. one token for every row; finished rows leave the batch
            tokens = sample_rows(logits, [r.request.params.temperature for r in rows],
                                 [r.request.params.top_p for r in rows], [r.generator for r in rows])
            token_list = tokens.tolist()
            keep = []
            for i, (row, token) in enumerate(zip(rows, token_list, strict=True)):
                if row.step(token):
                    finish(row)
                else:
                    keep.append(i)
            self.row_steps += len(rows)
            self.steps += 1
            if len(keep) < len(rows):
                rows = [rows[i] for i in keep]
                if not rows:
                    cache = mask = logits = None
                    continue
                index = torch.tensor(keep, device=mask.device)
                cache.batch_select_indices(index)
                mask, tokens = mask[index], tokens[index]
                cache, mask = self._trim(cache, mask)
            # 3. forward the new tokens
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            positions = (mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
            out = self.model(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=positions,
                             cache=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].float()

    def _admit(self, new: list[Row], rows: list[Row], cache, mask, logits):
        """Prefill ``new`` (left-padded) and merge it into the running batch."""
        import torch
        from transformers import DynamicCache

        device = self.model.device
        length = max(len(r.ids) for r in new)
        ids = torch.full((len(new), length), self.pad_id, dtype=torch.long)
        new_mask = torch.zeros((len(new), length), dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, length - len(r.ids):] = torch.tensor(r.ids)
            new_mask[i, length - len(r.ids):] = 1
        ids, new_mask = ids.to(device), new_mask.to(device)
        positions = (new_mask.cumsum(dim=1) - 1).clamp(min=0)
        new_cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=new_mask, position_ids=positions, cache=new_cache,
                         use_cache=True, logits_to_keep=1)
        new_logits = out.logits[:, -1].float()
        self.prefills += 1
        if not rows:
            return new_cache, new_mask, new_logits
        total = max(mask.shape[1], length)
        for old_layer, new_layer in zip(cache.layers, new_cache.layers, strict=True):
            old_layer.keys = torch.cat([_left_pad(old_layer.keys, total), _left_pad(new_layer.keys, total)])
            old_layer.values = torch.cat([_left_pad(old_layer.values, total), _left_pad(new_layer.values, total)])
        mask = torch.cat([_left_pad(mask, total, dim=1), _left_pad(new_mask, total, dim=1)])
        return cache, mask, torch.cat([logits, new_logits])

    @staticmethod
    def _trim(cache, mask):
        """Drop leading cache columns that are padding for every remaining row."""
        import torch

        used = torch.nonzero(mask.any(dim=0))
        start = int(used[0]) if used.numel() else 0
        if start > 0:
            for layer in cache.layers:
                layer.keys = layer.keys[..., start:, :]
                layer.values = layer.values[..., start:, :]
            mask = mask[:, start:]
        return cache, mask


def _left_pad(tensor, total: int, dim: int = -2):
    """Zero-pad ``tensor`` on the left of ``dim`` up to ``total`` positions."""
    import torch

    missing = total - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
