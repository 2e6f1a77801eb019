"""Dtype and thread choices of the local backend, each with the reason recorded in its info (manifest).

* dtype ``auto``: bfloat16 on a GPU that supports it and on a CPU with bf16 matrix instructions (AMX-BF16
  or AVX512-BF16: SmolLM2-135M generates 1.3-1.65x more tokens/s than in float32 there, B=32, one thread,
  ``scripts/bench_local.py --breakdown``), float32 otherwise (float16 only when asked for: it can
  overflow). bf16 kernels round differently for different batch shapes, so a row is reproducible across
  batch compositions only up to that rounding (as on GPUs); ``dtype: float32`` keeps rows bit-stable.
* threads: ``num_threads`` when set, else ``OMP_NUM_THREADS`` when set, else this process's share of the
  cores (data-parallel ranks split them) minus one for the event loop, tokenizer and writer when that
  leaves at least two, else one thread. Measured on SmolLM2-135M (``scripts/bench_local.py --threads 1,2``,
  2 cores shared with other sessions): 2 threads gave 1.08-1.19x the tokens/s of 1 thread while the box
  was calm (load 0.5-1.7) and 0.90x at load ~2.6, and raw ``generate`` with 2 threads collapsed to 14
  tok/s (10x slower) while a test suite ran beside it: an OpenMP pool as wide as the box spins at every
  barrier once anything else runs (the 600k-parameter test models were 10-30x slower). One thread on
  1-2 cores is the safe default; ``num_threads: 2`` is for a dedicated 2-core machine.
"""

from __future__ import annotations

import os

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


def cpu_bf16() -> str | None:
    """The CPU's bf16 matrix instructions ("AMX-BF16", "AVX512-BF16") as torch sees them, or None."""
    import torch

    checks = (("_is_amx_tile_supported", "AMX-BF16"), ("_is_avx512_bf16_supported", "AVX512-BF16"))
    for name, label in checks:
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None and check():
                return label
        except RuntimeError:
            continue
    return None


def pick_dtype(option: str, cuda: bool) -> tuple[str, str]:
    """(dtype name, why) for the ``dtype`` option ("auto" or a name)."""
    if option != "auto":
        return DTYPES[option], "set in backend_options.dtype"
    if cuda:
        import torch

        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: the GPU supports bfloat16"
        return "float32", "auto: the GPU has no bfloat16 (float16 only when set: it can overflow)"
    isa = cpu_bf16()
    if isa is not None:
        return "bfloat16", f"auto: the CPU has {isa}"
    return "float32", "auto: the CPU has no bfloat16 matrix instructions"


def pick_threads(option: int | None) -> tuple[int | None, str]:
    """(torch threads to set or None to leave torch's default, why)."""
    if option:
        return int(option), "set in backend_options.num_threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, ranks))
    if share > 2:
        return share - 1, f"auto: {share} cores for this process, one left for the event loop"
    return 1, f"auto: {share} core(s) for this process (a wider OpenMP pool stalls when anything else runs)"
