"""Shared-prompt-prefix reuse for the continuous batcher.

MAGPIE's requests share long prompt prefixes: every first-turn instruction prompt of a config is the very
same pre-query (or category system prompt) text, and every response prompt starts with the model's default
system block. :class:`PrefixCache` learns these prefixes from the prompts it sees (the longest token prefix
shared with two recent prompts, when it is at least ``min_tokens`` longer than what is already cached for
that prompt, or when it is the whole prompt; a prefix shared with one prompt only, such as a conversation's
own earlier turn, is not worth a forward of its own) and keeps, per prefix, its keys/values for one row and the logits after its last token. The
batcher prefills a prefix once, copies its keys/values into every new row that starts with it and prefills
only the rest; a prompt that *is* a cached prefix (the instruction prompts) needs no forward at all.

Token-exact: a prefix's keys/values depend only on its own tokens (causal attention, positions from 0), so
reuse changes no row's tokens beyond floating-point rounding of differently shaped matmuls.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass
class Prefix:
    ids: tuple[int, ...]
    kv: list                        # per layer: (keys, values), each [kv_heads, len(ids), head_dim]
    logits: object                  # [vocab] float: the next-token logits after the prefix


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Least-recently-used cache of shared prompt prefixes (at most ``max_entries``)."""

    def __init__(self, *, min_tokens: int = 16, max_entries: int = 16, history: int = 32):
        self.min_tokens, self.max_entries = min_tokens, max_entries
        self.entries: OrderedDict[tuple[int, ...], Prefix] = OrderedDict()
        self.recent: deque[tuple[int, ...]] = deque(maxlen=history)
        self.created = self.reused_tokens = self.prefilled_tokens = 0     # statistics

    def longest(self, ids: tuple[int, ...]) -> Prefix | None:
        """The longest cached prefix of ``ids`` (it may be all of ``ids``)."""
        best = None
        for key, entry in self.entries.items():
            if len(key) <= len(ids) and (best is None or len(key) > len(best.ids)) and ids[:len(key)] == key:
                best = entry
        if best is not None:
            self.entries.move_to_end(best.ids)
        return best

    def propose(self, ids: tuple[int, ...]) -> tuple[int, ...] | None:
        """A prefix of ``ids`` worth caching (shared with two recent prompts and ``min_tokens`` longer than the
        cached one, or all of ``ids``), or None. Remembers ``ids`` as a recent prompt."""
        have = self.longest(ids)
        have_len = len(have.ids) if have is not None else 0
        shared = sorted((common_prefix(ids, other) for other in self.recent), reverse=True)[1:2]
        shared = shared[0] if shared else 0
        self.recent.append(ids)
        worth = shared - have_len >= self.min_tokens or (shared == len(ids) and shared > have_len)
        if worth and ids[:shared] not in self.entries:       # a repeated whole prompt needs no forward at all
            return ids[:shared]
        return None

    def add(self, entry: Prefix) -> None:
        self.entries[entry.ids] = entry
        self.created += 1
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def stats(self) -> dict:
        return {"prefixes": self.created, "reused_tokens": self.reused_tokens,
                "prefilled_tokens": self.prefilled_tokens}
