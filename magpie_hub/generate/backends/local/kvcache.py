"""A preallocated, slot-based KV cache for :class:`~magpie_hub.generate.backends.local.continuous.ContinuousBatcher`.

Keys and values of up to ``slots`` rows live in buffers ``[slots, kv_heads, capacity, head_dim]`` per layer.
The active rows are slots ``0 .. n-1``; every row is right-aligned at the shared frontier ``width``: it holds
its tokens in columns ``[width - length, width)`` (``valid`` marks them, ``length`` is its next position).

* a decode step writes column ``width`` of every active row in place (no concatenation of the whole cache
  per step, as ``DynamicCache`` does) and each forward runs on views of the buffers;
* a finished row's slot is refilled by moving the last active row into it (one row copied), so the active
  rows stay a prefix of the batch dimension;
* new rows are placed in the free slots, right-aligned at the frontier (the frontier moves right first when
  a prompt is longer than it); a shared prefix's keys/values are copied in (:meth:`write_prefix`) and only
  the rest of the prompt is prefilled;
* leading columns that no active row uses are dropped (one shift) when they are half of the width or room is
  needed; the capacity grows geometrically otherwise.

The model sees this object as its ``cache`` (it calls ``update(keys, values, layer_idx)`` per layer) and
gets a ready 4D mask (:meth:`decode_step`, :meth:`prefill`), so rows of any length and padding share a batch.
"""

from __future__ import annotations


class SlotCache:
    is_compileable = False

    def __init__(self, shapes: list[tuple[int, int]], *, slots: int, dtype, device, capacity: int = 256,
                 bool_mask: bool = True):
        """``shapes``: (kv_heads, head_dim) per layer; ``bool_mask``: masks for SDPA (else additive, eager)."""
        import torch

        self.shapes, self.slots, self.dtype, self.device = shapes, slots, dtype, device
        self.bool_mask = bool_mask
        self.capacity = 0
        self.k: list = []                   # per layer [slots, kv_heads, capacity, head_dim]
        self.v: list = []
        self.valid = torch.zeros((slots, 0), dtype=torch.bool, device=device)
        self.length = torch.zeros(slots, dtype=torch.long, device=device)
        self.n = 0                          # active rows: slots 0 .. n-1
        self.width = 0                      # columns 0 .. width-1 hold data
        self.shifts = self.grows = 0        # statistics
        self._op: tuple | None = None       # (rows, first column, end column, write mask or None)
        self._grow(capacity)

    # -- the model's side ------------------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        import torch

        rows, c0, c1, write = self._op
        keys, values = self.k[layer_idx], self.v[layer_idx]
        if write is None:
            keys[rows, :, c0:c1] = key_states
            values[rows, :, c0:c1] = value_states
        else:                               # only the real (not padding) query positions are stored
            w = write[:, None, :, None]
            keys[rows, :, c0:c1] = torch.where(w, key_states, keys[rows, :, c0:c1])
            values[rows, :, c0:c1] = torch.where(w, value_states, values[rows, :, c0:c1])
        return keys[rows, :, :c1], values[rows, :, :c1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def reset(self) -> None:
        """No active rows (a decode loop starts afresh)."""
        self.valid[:] = False
        self.n = self.width = 0
        self._op = None

    # -- the batcher's side ----------------------------------------------------------------------------------
    def decode_step(self):
        """(4D mask, position ids) for one new token of every active row, written at column ``width``;
        call :meth:`advance` after the forward."""
        self._room(self.width + 1)
        n, t = self.n, self.width
        self.valid[:n, t] = True
        self._op = (slice(0, n), t, t + 1, None)
        return self._mask(self.valid[:n, None, None, :t + 1]), self.length[:n, None].clone()

    def advance(self) -> None:
        self.length[:self.n] += 1
        self.width += 1
        self._op = None

    def place(self, lengths: list[int]) -> int:
        """Take ``len(lengths)`` free slots for rows of these token counts, right-aligned at the frontier;
        returns the first slot. Their columns are marked valid; fill them with :meth:`write_prefix` and
        :meth:`prefill`."""
        import torch

        k, longest = len(lengths), max(lengths)
        if self.n + k > self.slots:
            raise ValueError(f"{self.n} + {k} rows exceed the cache's {self.slots} slots")
        if self.n == 0:
            self.width = 0
        if longest > self.width:            # move the frontier right: the running rows shift with it
            self._room(longest)
            self._shift(longest - self.width)
        first = self.n
        t = self.width
        self.valid[first:first + k] = False
        for i, length in enumerate(lengths):
            self.valid[first + i, t - length:t] = True
        self.length[first:first + k] = torch.tensor(lengths, dtype=torch.long, device=self.device)
        self.n += k
        return first

    def write_prefix(self, slots: slice, start: int, kv: list) -> None:
        """Copy a cached prefix (per layer: keys, values ``[kv_heads, P, head_dim]``) into ``slots`` at
        columns ``start .. start+P``."""
        for layer, (keys, values) in enumerate(kv):
            end = start + keys.shape[1]
            self.k[layer][slots, :, start:end] = keys
            self.v[layer][slots, :, start:end] = values

    def prefill(self, slots: slice, suffix: list[int], width: int):
        """(4D mask, position ids) for prefilling the last ``suffix[i]`` tokens of each row in ``slots`` with a
        query block of ``width`` columns ending at the frontier (left-padded per row); padding queries write
        nothing. Call :meth:`finish_prefill` after the forward."""
        import torch

        t = self.width
        c0 = t - width
        j = torch.arange(width, device=self.device)
        s = torch.tensor(suffix, device=self.device)
        write = j[None, :] >= (width - s)[:, None]                                   # real query positions
        causal = torch.arange(t, device=self.device)[None, :] <= (c0 + j)[:, None]  # [q, t]
        allowed = self.valid[slots, None, :t] & causal[None]                        # [k, q, t]
        allowed[:, j, c0 + j] |= ~write                        # a padding query sees itself: no empty row
        start = self.length[slots] - s                                             # first suffix position
        positions = (start[:, None] + j[None, :] - (width - s)[:, None]).clamp(min=0)
        self._op = (slots, c0, t, write)
        return self._mask(allowed[:, None]), positions

    def finish_prefill(self) -> None:
        self._op = None

    def remove(self, slot: int) -> int:
        """Free ``slot``: the last active row moves into it. Returns the slot that moved (== ``slot`` when
        it was the last)."""
        last = self.n - 1
        if slot != last:
            t = self.width
            for keys, values in zip(self.k, self.v, strict=True):
                keys[slot, :, :t] = keys[last, :, :t]
                values[slot, :, :t] = values[last, :, :t]
            self.valid[slot] = self.valid[last]
            self.length[slot] = self.length[last]
        self.valid[last] = False
        self.n = last
        if self.n == 0:
            self.width = 0
        return last

    def compact(self) -> None:
        """Drop the leading columns no active row uses once they are half of the width."""
        if self.n and self._unused() * 2 >= max(64, self.width):
            self._shift(-self._unused())

    # -- internals -------------------------------------------------------------------------------------------
    def _mask(self, allowed):
        import torch

        if self.bool_mask:
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min)

    def _unused(self) -> int:
        import torch

        used = torch.nonzero(self.valid[:self.n, :self.width].any(dim=0))
        return int(used[0]) if used.numel() else self.width

    def _room(self, width: int) -> None:
        if width <= self.capacity:
            return
        unused = self._unused() if self.n else self.width
        if unused and width - unused <= self.capacity:
            self._shift(-unused)
            return
        self._grow(max(width - unused, self.capacity + self.capacity // 2, 64))
        if unused:
            self._shift(-unused)

    def _shift(self, d: int) -> None:
        """Move the active rows' columns by ``d`` (right when > 0); the frontier moves with them."""
        n, t = self.n, self.width
        if d == 0:
            return
        if d > 0:
            src, dst = slice(0, t), slice(d, t + d)
        else:
            src, dst = slice(-d, t), slice(0, t + d)
        for keys, values in zip(self.k, self.v, strict=True):
            keys[:n, :, dst] = keys[:n, :, src].clone()
            values[:n, :, dst] = values[:n, :, src].clone()
        self.valid[:n, dst] = self.valid[:n, src].clone()
        if d > 0:
            self.valid[:n, :d] = False
        else:
            self.valid[:n, t + d:t] = False
        self.width = t + d
        self.shifts += 1

    def _grow(self, capacity: int) -> None:
        import torch

        def bigger(old, shape_tail):
            new = torch.zeros((self.slots, *shape_tail), dtype=old.dtype if old is not None else self.dtype,
                              device=self.device)
            if old is not None and self.width:
                new[:, :, :self.width] = old[:, :, :self.width]
            return new

        self.k = [bigger(self.k[i] if self.k else None, (h, capacity, d)) for i, (h, d) in enumerate(self.shapes)]
        self.v = [bigger(self.v[i] if self.v else None, (h, capacity, d)) for i, (h, d) in enumerate(self.shapes)]
        valid = torch.zeros((self.slots, capacity), dtype=torch.bool, device=self.device)
        valid[:, :self.valid.shape[1]] = self.valid
        self.valid = valid
        self.capacity = capacity
        self.grows += 1
