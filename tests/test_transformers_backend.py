"""The local transformers backend on the tiny models: batching, per-row stop, BOS, per-row determinism,
shared-prefix reuse, the dtype choice.

Rows that must not depend on the batch they land in are compared in float32: bf16 matmul kernels round
differently for different batch shapes (on GPUs and on CPUs alike), so ``auto`` (bf16 where the hardware
has it) promises the same rows only up to that rounding."""

from __future__ import annotations

import asyncio

import pytest

from magpie_hub.errors import BackendError, ModelError, RecipeError
from magpie_hub.generate.backends import get_backend
from magpie_hub.generate.backends.base import GenerationRequest, SamplingParams
from magpie_hub.generate.backends.local import continuous, device
from magpie_hub.generate.backends.local.device import pick_dtype
from magpie_hub.generate.backends.local.transformers import TransformersBackend
from magpie_hub.generate.engine import CleanupOptions, ConversationEngine, ConversationSpec

MIXES = [(1.0, 1.0), (1.1, 0.995), (1.25, 0.99), (0.0, 1.0)]   # sampled (plain, nucleus) and greedy rows


@pytest.fixture(scope="module")
def llama_backend(tiny_llama3):
    """The ``model.generate`` batching path (the fallback for models whose cache cannot be merged)."""
    backend = TransformersBackend(str(tiny_llama3), batch_size=8, max_wait_ms=5, continuous=False, dtype="float32")
    backend._load()
    assert backend._batcher is None
    return backend


def requests_for_llama(backend, path, n: int, **kw) -> list[GenerationRequest]:
    from magpie_hub.chat.format import load_chat_format

    backend.chat_format = backend.chat_format or load_chat_format(str(path))
    return requests_for(backend, n, **kw)


def requests_for(backend, n: int, *, max_new: int = 48, stop=None) -> list[GenerationRequest]:
    fmt = backend.chat_format
    out = []
    for i in range(n):
        temp, top_p = MIXES[i % len(MIXES)]
        role = "user" if i % 2 == 0 else "assistant"
        prompt = fmt.user_prompt([]) if role == "user" else fmt.assistant_prompt([], f"question number {i}?")
        out.append(GenerationRequest(prompt=prompt, params=SamplingParams(temp, top_p, max_new, seed=1000 + i),
                                     stop=stop or (fmt.user_stop if role == "user" else fmt.assistant_stop),
                                     role=role))
    return out


async def _gather(backend, reqs):
    async with backend:
        return await asyncio.gather(*(backend.generate(r) for r in reqs))


def test_rows_do_not_depend_on_the_batch_they_land_in(llama_backend):
    reqs = requests_for(llama_backend, 12)
    alone = [llama_backend._run_batch([r])[0] for r in reqs]
    together = llama_backend._run_batch(reqs)
    reversed_batch = llama_backend._run_batch(reqs[::-1])[::-1]
    assert alone == together == reversed_batch
    assert len({r.text for r in alone}) > 6                   # different seeds/prompts -> different texts
    again = llama_backend._run_batch([GenerationRequest(r.prompt, SamplingParams(r.params.temperature, r.params.top_p,
                                      r.params.max_new_tokens, seed=r.params.seed + 1), r.stop, r.role)
                                      for r in reqs if r.params.temperature > 0])
    assert [a.text for a in again] != [a.text for a, r in zip(alone, reqs, strict=True) if r.params.temperature > 0]
    # the continuous-batching path gives the very same rows, whatever its batch size
    for batch_size in (1, 5):
        backend = TransformersBackend(llama_backend.model_id, batch_size=batch_size, max_wait_ms=5, dtype="float32")
        assert asyncio.run(_gather(backend, reqs)) == alone
        assert backend._batcher is not None and backend.stats()["rows"] == len(reqs)
        assert backend.stats()["mean_batch"] <= batch_size


def test_cache_growth_and_compaction_keep_rows_exact(llama_backend, monkeypatch):
    """A KV cache that starts 8 columns wide must grow, shift and compact while rows come and go."""
    monkeypatch.setattr(continuous, "CACHE_COLUMNS", 8)
    reqs = requests_for(llama_backend, 14, max_new=40)
    reqs = [GenerationRequest(r.prompt, SamplingParams(r.params.temperature, r.params.top_p, 5 + 7 * (i % 6),
                                                       r.params.seed), r.stop, r.role) for i, r in enumerate(reqs)]
    want = llama_backend._run_batch(reqs)
    backend = TransformersBackend(llama_backend.model_id, batch_size=4, max_wait_ms=5, dtype="float32")
    assert asyncio.run(_gather(backend, reqs)) == want
    cache = backend._batcher.cache
    assert cache.grows > 1 and cache.shifts > 1 and cache.capacity > 8


def test_continuous_batching_refills_finished_slots(tiny_llama3):
    backend = TransformersBackend(str(tiny_llama3), batch_size=4, max_wait_ms=5)
    reqs = requests_for_llama(backend, tiny_llama3, 16, max_new=24)
    short = [GenerationRequest(r.prompt, SamplingParams(r.params.temperature, r.params.top_p, 2 + i % 5,
                                                        r.params.seed), r.stop, r.role) for i, r in enumerate(reqs)]
    results = asyncio.run(_gather(backend, short))
    stats = backend.stats()
    assert all(r.generated_tokens <= 2 + i % 5 for i, r in enumerate(results))
    assert all(r.finish_reason == "stop" or r.generated_tokens == 2 + i % 5 for i, r in enumerate(results))
    # rows of different budgets share the batch: slots are refilled as rows finish (mean batch near 4)
    assert stats["row_steps"] == sum(r.generated_tokens for r in results)
    assert stats["mean_batch"] > 2.5 and stats["prefills"] < len(reqs)


def test_per_sequence_stop_and_budgets_in_one_batch(llama_backend):
    fmt = llama_backend.chat_format
    prompt = fmt.user_prompt([])
    eot = llama_backend.tokenizer.convert_tokens_to_ids(fmt.user_stop[0])
    reqs = [GenerationRequest(prompt, SamplingParams(1.0, 1.0, 64, seed=i), fmt.user_stop, "user") for i in range(8)]
    reqs.append(GenerationRequest(prompt, SamplingParams(1.0, 1.0, 3, seed=99), fmt.user_stop, "user"))
    reqs.append(GenerationRequest(prompt, SamplingParams(1.0, 1.0, 64, seed=5), (*fmt.user_stop, "e"), "user"))
    calls = []
    original = llama_backend.model.generate

    def spy(**kwargs):
        out = original(**kwargs)
        calls.append((kwargs["input_ids"].clone(), out.clone()))
        return out

    llama_backend.model.generate = spy
    try:
        results = llama_backend._run_batch(reqs)
    finally:
        llama_backend.model.generate = original
    assert len(calls) == 1                                            # one batched generate call
    stopped = [r for r in results[:8] if r.finish_reason == "stop"]
    assert len(stopped) >= 4 and len({r.generated_tokens for r in stopped}) > 1   # rows end at their own turn end
    _, out = calls[0]
    prompt_len = calls[0][0].shape[1]
    for row, result in enumerate(results[:8]):
        tokens = out[row, prompt_len:].tolist()
        if result.finish_reason == "stop":
            assert tokens[result.generated_tokens - 1] in llama_backend.stop_ids
            assert eot not in tokens[:result.generated_tokens - 1]
            pad = llama_backend.tokenizer.pad_token_id
            assert all(t == pad for t in tokens[result.generated_tokens:])       # finished rows padded
        else:
            assert result.generated_tokens == 64
        assert "<|eot_id|>" not in result.text
    assert results[8].generated_tokens <= 3
    assert results[8].finish_reason == "stop" or results[8].generated_tokens == 3          # its own budget
    assert results[9].finish_reason == "stop" and "e" not in results[9].text      # a row's own stop string
    assert results[9].text == results[5].text.split("e")[0]                      # same seed: same tokens until "e"
    backend = TransformersBackend(llama_backend.model_id, batch_size=10, max_wait_ms=5, dtype="float32")
    assert asyncio.run(_gather(backend, reqs)) == results                       # continuous path: same rows


def test_no_doubled_bos_in_input_ids(llama_backend):
    tok = llama_backend.tokenizer
    fmt = llama_backend.chat_format
    assert fmt.bos_in_template and tok.bos_token == "<|begin_of_text|>"
    for prompt in (fmt.user_prompt([]), fmt.assistant_prompt([("hi", "hello")], "and then?"),
                   fmt.user_prompt([("hi", "hello")], system="Be brief.")):
        ids = llama_backend._encode(prompt)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids == tok(prompt, add_special_tokens=False)["input_ids"]


def test_engine_end_to_end_batched_and_deterministic(tiny_llama3):
    def specs():
        for i in range(16):
            temp, top_p = MIXES[i % 3]
            yield ConversationSpec(
                config="multi_turn", index=i, uuid=f"uuid-{i}", turns=2, category=None,
                system_prompt="You are an AI assistant for math." if i % 4 == 0 else None,
                instruction_params=SamplingParams(temp, top_p, 96, seed=3),
                response_params=SamplingParams(1.0, 1.0, 96, seed=4))

    async def run(batch_size: int, concurrency: int, continuous: bool = True):
        backend = TransformersBackend(str(tiny_llama3), batch_size=batch_size, max_wait_ms=5, continuous=continuous,
                                      dtype="float32")
        async with backend:
            engine = ConversationEngine(backend, backend.chat_format, cleanup=CleanupOptions(),
                                        multi_turn_system_prompt="You are a helpful assistant.",
                                        concurrency=concurrency, max_attempts=20)
            convs = {c.spec.uuid: c async for c in engine.run(specs())}
        return convs, backend, engine

    batched, backend, engine = asyncio.run(run(batch_size=8, concurrency=16))
    assert len(batched) == 16 and not engine.exhausted
    assert backend.info().extra["continuous_batching"] and 4 < backend.stats()["mean_batch"] <= 8
    assert all(len(c.turns) == 2 and all(u and a for u, a in c.turns) for c in batched.values())
    assert sum(engine.dropped.values()) == sum(c.attempts - 1 for c in batched.values())
    small, _, _ = asyncio.run(run(batch_size=3, concurrency=5, continuous=False))
    assert {k: (c.turns, c.attempts) for k, c in small.items()} == {k: (c.turns, c.attempts)
                                                                    for k, c in batched.items()}


def test_qwen_prompts_get_no_bos_and_stop_at_im_end(tiny_qwen):
    backend = TransformersBackend(str(tiny_qwen), batch_size=4, max_wait_ms=5)
    fmt_reqs = None

    async def main():
        nonlocal fmt_reqs
        async with backend:
            fmt = backend.chat_format
            fmt_reqs = [GenerationRequest(fmt.user_prompt([]), SamplingParams(1.0, 1.0, 32, seed=s),
                                          fmt.user_stop, "user") for s in range(4)]
            return await asyncio.gather(*(backend.generate(r) for r in fmt_reqs))

    results = asyncio.run(main())
    fmt = backend.chat_format
    assert fmt.user_stop[0] == "<|im_end|>" and not fmt.bos_in_template
    ids = backend._encode(fmt_reqs[0].prompt)
    assert ids == backend.tokenizer(fmt_reqs[0].prompt, add_special_tokens=False)["input_ids"]
    assert any(r.finish_reason == "stop" for r in results)
    assert all("<|im_end|>" not in r.text and "<|im_start|>" not in r.text for r in results)
    assert backend.info().extra["dtype"] == pick_dtype("auto", False)[0] and backend.info().model_id == str(tiny_qwen)
    assert backend.info().extra["continuous_batching"] and backend.stats()["rows"] == 4


def test_bad_options_and_missing_model(tmp_path):
    with pytest.raises(RecipeError, match="unknown transformers backend option 'bogus'; valid keys: batch_size,"):
        get_backend("transformers", "tiny:llama3", bogus=1)
    with pytest.raises(RecipeError, match="batch_size"):
        TransformersBackend("tiny:llama3", batch_size=0)
    with pytest.raises(RecipeError, match="dtype"):
        TransformersBackend("tiny:llama3", dtype="int3")
    backend = TransformersBackend(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError):
        asyncio.run(backend.start())

    async def not_started():
        return await backend.generate(GenerationRequest("x", SamplingParams()))

    with pytest.raises(BackendError, match="not started"):
        asyncio.run(not_started())


def test_shared_prefix_reuse_gives_the_same_tokens(tiny_llama3):
    """Instruction prompts (one pre-query, repeated), category system prompts and response prompts: the
    shared prefix is prefilled once and copied into each row, and every row's tokens stay the same (float32:
    like batching itself, reuse moves logits only by shape-dependent rounding, ~1e-6)."""
    system = "You are an AI assistant designed to provide helpful, step-by-step guidance on coding problems."

    async def run(prefix_cache: bool):
        backend = TransformersBackend(str(tiny_llama3), batch_size=6, max_wait_ms=5, dtype="float32",
                                      prefix_cache=prefix_cache)
        async with backend:
            fmt = backend.chat_format
            reqs = []
            for i in range(30):
                temp, top_p = MIXES[i % len(MIXES)]
                if i % 3 == 0:
                    prompt, stop = fmt.user_prompt([]), fmt.user_stop
                elif i % 3 == 1:
                    prompt, stop = fmt.user_prompt([], system=system), fmt.user_stop
                else:
                    prompt, stop = fmt.assistant_prompt([], f"how do I sort {i} numbers in place?"), fmt.assistant_stop
                reqs.append(GenerationRequest(prompt, SamplingParams(temp, top_p, 6 + i % 7 * 3, seed=50 + i), stop))
            results = await asyncio.gather(*(backend.generate(r) for r in reqs))
        return results, backend

    plain, off = asyncio.run(run(False))
    reused, on = asyncio.run(run(True))
    assert reused == plain and len({r.text for r in plain}) > 20
    assert off.info().extra["prefix_cache"] is False and on.info().extra["prefix_cache"] is True
    assert off.stats()["prefilled_tokens"] == off.stats()["prompt_tokens"]
    stats = on.stats()
    assert stats["prefixes"] >= 2                              # the pre-query and the system prompt's block
    assert stats["prompt_tokens"] == off.stats()["prompt_tokens"]
    assert stats["prefilled_tokens"] < stats["prompt_tokens"] / 2       # most prompt tokens were not recomputed


def test_thread_policy(monkeypatch):
    for var in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1})
    assert device.pick_threads(None)[0] == 1                       # 2 cores: one thread (see device.py)
    assert device.pick_threads(3) == (3, "set in backend_options.num_threads")
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert device.pick_threads(None)[0] == 7                       # one core left for the event loop
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert device.pick_threads(None)[0] == 3                       # two ranks share the eight cores
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert device.pick_threads(None) == (None, "OMP_NUM_THREADS")


def test_dtype_choice_is_recorded(tiny_qwen, monkeypatch):
    monkeypatch.setattr(device, "cpu_bf16", lambda: "AMX-BF16")
    assert pick_dtype("auto", False) == ("bfloat16", "auto: the CPU has AMX-BF16")
    monkeypatch.setattr(device, "cpu_bf16", lambda: None)
    assert pick_dtype("auto", False)[0] == "float32"
    assert pick_dtype("bf16", False) == ("bfloat16", "set in backend_options.dtype")
    for isa, want in (("AVX512-BF16", "bfloat16"), (None, "float32")):
        monkeypatch.setattr(device, "cpu_bf16", lambda isa=isa: isa)
        backend = TransformersBackend(str(tiny_qwen), batch_size=2)
        backend._load()
        extra = backend.info().extra
        assert extra["dtype"] == want == str(backend.model.dtype).removeprefix("torch.")
        assert extra["choices"]["dtype"].startswith(f"{want} (auto: ") and "threads" in extra["choices"]
