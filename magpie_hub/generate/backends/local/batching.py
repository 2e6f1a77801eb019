"""Per-row sampling and stopping for :mod:`magpie_hub.generate.backends.local.transformers`.

* :func:`sample_rows` draws each row's next token with that row's temperature / top-p and its own
  ``torch.Generator`` (one uniform number per step, inverse CDF): a row's text depends only on its seed
  and its logits, never on the other rows of the batch.
* :class:`Row` is one request in flight in the continuous batcher
  (:mod:`magpie_hub.generate.backends.local.continuous`).
* :class:`RowSampler` and :class:`RowStopper` are the per-row sampling and stopping of the
  ``model.generate`` fallback path.
* :class:`RowPenalty` applies a row's ``repetition_penalty`` / ``no_repeat_ngram_size`` (transformers'
  semantics: prompt and generated tokens count) before sampling (:func:`penalize` in the continuous
  batcher, :class:`RowSampler` in the fallback path); a row with ``loop_stop`` ends at a degenerate loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from magpie_hub.generate.backends.base import GenerationRequest, GenerationResult, SamplingParams


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
    greedy = [r for r, t in enumerate(temperatures) if t <= 0.0]
    if len(greedy) == scores.shape[0]:
        return scores.argmax(dim=-1)
    choice = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    if greedy:                                  # (an argmax over the whole vocabulary costs: greedy rows only)
        choice[greedy] = scores[greedy].argmax(dim=-1)
    plain = [r for r, (t, p) in enumerate(zip(temperatures, top_ps, strict=True)) if t > 0.0 and p >= 1.0]
    nucleus = [r for r, (t, p) in enumerate(zip(temperatures, top_ps, strict=True)) if t > 0.0 and p < 1.0]
    for rows, is_nucleus in ((plain, False), (nucleus, True)):
        if not rows:
            continue
        u = torch.stack([torch.rand((), generator=generators[r], dtype=torch.float64) for r in rows])
        idx = torch.tensor(rows, device=scores.device)
        picked = scores if len(rows) == scores.shape[0] else scores[idx]       # (no copy when all rows sample)
        if any(temperatures[r] != 1.0 for r in rows):                         # x / 1.0 == x: skip it
            picked = picked / torch.tensor([temperatures[r] for r in rows], device=scores.device).unsqueeze(1)
        probs = torch.softmax(picked, dim=-1).double()
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


class RowPenalty:
    """One row's ``repetition_penalty`` and ``no_repeat_ngram_size``, as transformers'
    ``RepetitionPenaltyLogitsProcessor`` / ``NoRepeatNGramLogitsProcessor`` over prompt + generated tokens;
    the generated tokens are indexed incrementally (a step costs O(1) python work, not O(length))."""

    def __init__(self, prompt_ids: list[int], repetition_penalty: float | None, no_repeat_ngram_size: int | None):
        self.penalty = repetition_penalty if repetition_penalty not in (None, 1.0) else None
        self.n = int(no_repeat_ngram_size or 0)
        self.seq: list[int] = []
        self.seen: set[int] = set()
        self.ngrams: dict[tuple[int, ...], set[int]] = {}
        self.prompt_len = len(prompt_ids)
        self._extend(prompt_ids)

    @classmethod
    def of(cls, params: SamplingParams, prompt_ids: list[int]) -> RowPenalty | None:
        if params.repetition_penalty in (None, 1.0) and not params.no_repeat_ngram_size:
            return None
        return cls(prompt_ids, params.repetition_penalty, params.no_repeat_ngram_size)

    def _extend(self, tokens) -> None:
        n, seq = self.n, self.seq
        for token in tokens:
            seq.append(token)
            self.seen.add(token)
            if n and len(seq) >= n:
                self.ngrams.setdefault(tuple(seq[len(seq) - n:-1]), set()).add(token)

    def __call__(self, scores, generated: list[int]):
        """``scores`` (one row of logits, V) adjusted for the prompt and ``generated`` (all tokens so far)."""
        import torch

        self._extend(generated[len(self.seq) - self.prompt_len:])
        if self.penalty is not None:
            idx = torch.tensor(sorted(self.seen), device=scores.device)
            picked = scores.index_select(0, idx)
            scores = scores.index_copy(0, idx, torch.where(picked < 0, picked * self.penalty, picked / self.penalty))
        if self.n and len(self.seq) >= self.n - 1:
            banned = self.ngrams.get(tuple(self.seq[len(self.seq) - self.n + 1:]))
            if banned:
                scores = scores.index_fill(0, torch.tensor(sorted(banned), device=scores.device), float("-inf"))
        return scores


def penalize(logits, rows: list[Row]):
    """``logits`` (B x V) with each row's :class:`RowPenalty` applied (unchanged when no row has one)."""
    if all(row.penalty is None for row in rows):
        return logits
    logits = logits.clone()
    for i, row in enumerate(rows):
        if row.penalty is not None:
            logits[i] = row.penalty(logits[i], row.tokens)
    return logits


class RowSampler:
    """Logits processor for the ``model.generate`` path: picks each row's next token with
    :func:`sample_rows` (returns 0 there and -inf elsewhere, so the greedy step of ``generate`` takes it).
    ``penalties`` (one :class:`RowPenalty` or None per row) see the tokens after ``prompt_len``."""

    def __init__(self, temperatures: list[float], top_ps: list[float], seeds: list[int | None],
                 penalties: list[RowPenalty | None] | None = None, prompt_len: int = 0):
        self.temperatures, self.top_ps = temperatures, top_ps
        self.generators = [make_generator(seed) for seed in seeds]
        self.penalties, self.prompt_len = penalties or [], prompt_len

    def __call__(self, input_ids, scores):
        import torch

        if any(p is not None for p in self.penalties):
            scores = scores.float().clone()
            for r, penalty in enumerate(self.penalties):
                if penalty is not None:
                    scores[r] = penalty(scores[r], input_ids[r, self.prompt_len:].tolist())
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
    penalty: RowPenalty | None = None        # from the request's params (repetition_penalty, no_repeat_ngram_size)

    def __post_init__(self):
        if self.generator is None:
            self.generator = make_generator(self.request.params.seed)
        if self.penalty is None:
            self.penalty = RowPenalty.of(self.request.params, self.ids)

    def step(self, token: int) -> bool:
        """Append ``token``; True when the row is finished (``stop_hit``: an end of turn, else its budget)."""
        import torch

        self.tokens.append(token)
        if token in self.end_ids or (self.criterion is not None and
                                     bool(self.criterion(torch.tensor([self.tokens[-64:]]), None)[0])):
            self.stop_hit = True
            return True
        loop = self.request.params.loop_stop     # a degenerate loop ends the row like its budget would:
        if loop is not None and loop.in_tokens(self.tokens):   # the engine labels it "loop" from the text
            return True
        return len(self.tokens) >= self.budget
