"""The buckets of a config with mix targets: exact target counts per bucket (one joint table, or one per
dimension) and what has been accepted into them (:mod:`magpie_hub.build.mix` replays candidates into them)."""

from __future__ import annotations

from collections import Counter

from magpie_hub.recipe.mix import MixTarget, bucket_targets


class Buckets:
    """Target and filled counts per bucket table (one joint table, or one per dimension)."""

    def __init__(self, mix: MixTarget, rows: int):
        self.mix, self.rows = mix, rows
        self.dims = list(mix.dims())
        self.targets = bucket_targets(mix, rows)
        self.filled = [Counter() for _ in self.targets]
        self.seen: Counter = Counter()    # (category, difficulty) bucket pairs met so far

    def _entries(self, key: tuple) -> list[tuple | None]:
        if self.mix.joint:
            return [key if key in self.targets[0] else None]
        return [next((k for k in table if k[pos] == key[pos]), None) for pos, table in enumerate(self.targets)]

    def offer(self, key: tuple) -> str:
        """Accept ``key`` ("accepted") or say why not ("unlabelled", "overflow", "held": its slots are kept
        for a rarer combination, see :meth:`shortfall`)."""
        if None in key:
            return "unlabelled"
        self.seen[key] += 1
        entries = self._entries(key)
        if any(e is None or self.filled[i][e] >= self.targets[i][e] for i, e in enumerate(entries)):
            return "overflow"
        if not self.mix.joint and len(self.dims) == 2:
            before = self.shortfall()
            for i, e in enumerate(entries):
                self.filled[i][e] += 1
            if self.shortfall() > before:
                for i, e in enumerate(entries):
                    self.filled[i][e] -= 1
                return "held"
            return "accepted"
        for i, e in enumerate(entries):
            self.filled[i][e] += 1
        return "accepted"

    def shortfall(self) -> int:
        """Rows the remaining needs of the two dimensions cannot share, pairing labels only as candidates so
        far were paired (the max-flow deficiency, by Hall's theorem: the worst subset of buckets of the
        smaller side needs more than its observed partners still take; a pair counts as observed once it was
        met 1 + candidates/50 times, so a rare pairing does not count on being met again soon). Accepting a row that raises it
        would use up slots a rarer pair needs (e.g. the last "easy" slots when the only category still short
        was never seen "easy"): such a row is held, so the marginals can still be filled together."""
        need = self.need()
        left, right = (need[d] for d in self.dims)
        pos = 0
        if sum(n > 0 for n in right.values()) < sum(n > 0 for n in left.values()):
            left, right, pos = right, left, 1
        names = [k for k, n in left.items() if n > 0]
        floor = 1 + sum(self.seen.values()) // 50     # a pair met once in 200 candidates is not a partner
        support = [k for k, n in self.seen.items() if n >= floor]
        worst = 0
        for mask in range(1, 2 ** len(names)):
            group = {names[i] for i in range(len(names)) if mask >> i & 1}
            partners = {k[1 - pos] for k in support if k[pos] in group}
            worst = max(worst, sum(left[k] for k in group) - sum(right[k] for k in partners if right.get(k, 0) > 0))
        return worst

    @property
    def accepted(self) -> int:
        return sum(self.filled[0].values())

    def full(self) -> bool:
        return self.accepted >= self.rows

    def need(self) -> dict[str, Counter]:
        if self.mix.joint:
            return {"joint": Counter({k: n - self.filled[0][k] for k, n in self.targets[0].items()})}
        return {dim: Counter({k[pos]: n - self.filled[pos][k] for k, n in self.targets[pos].items()})
                for pos, dim in enumerate(self.dims)}


__all__ = ["Buckets"]
