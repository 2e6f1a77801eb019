"""The conversation engine: drop-and-regenerate, concurrency, no lockstep, seeds, rows, byte-exact prompts."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from magpie_hub.errors import BackendError
from magpie_hub.generate.backends.base import (
    Backend,
    BackendInfo,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from magpie_hub.generate.engine import (
    CleanupOptions,
    Conversation,
    ConversationEngine,
    ConversationSpec,
    conversation_to_row,
    request_seed,
)

MT_SYSTEM = ("You are a helpful Al assistant. The user will engage in a multi-round conversation with you, "
             "asking initial questions and following up with additional related questions.")
SEED = 7


class FakeFormat:
    """A minimal chat format: enough for the engine's semantics (prompt bytes are tested on real ones)."""

    pre_query = "<s>[U]"
    user_stop = ("[/U]",)
    assistant_stop = ("[/A]",)
    stop = ("[/U]", "[/A]")

    def pre_query_system(self, system):
        return f"<s>[S]{system}[/S][U]"

    def user_prompt(self, history, system=None):
        text = self.pre_query if system is None else self.pre_query_system(system)
        for user, reply in history:
            text += f"{user}[/U][A]{reply}[/A][U]"
        return text

    def assistant_prompt(self, history, user, system=None):
        return self.user_prompt(history, system) + f"{user}[/U][A]"


def spec(i: int, turns: int = 3, *, uuid: str | None = None, system: str | None = None,
         category: str | None = None, newline: bool = False) -> ConversationSpec:
    return ConversationSpec(
        config="c", index=i, uuid=uuid or f"u{i}", turns=turns, category=category, system_prompt=system,
        instruction_params=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=32, seed=SEED),
        response_params=SamplingParams(temperature=0.0, max_new_tokens=64, seed=SEED),
        instruction_stop_newline=newline)


class ScriptedBackend(Backend):
    """Decodes (uuid, turn, role, attempt) from the request seed; ``script`` may override the result."""

    name = "scripted"

    def __init__(self, specs, *, script=None, delay=None, max_attempts: int = 10):
        self.lookup = {}
        for s in specs:
            for turn in range(1, s.turns + 1):
                for role in ("user", "assistant"):
                    for attempt in range(1, max_attempts + 1):
                        self.lookup[request_seed(SEED, s.uuid, turn, role, attempt)] = (s.uuid, turn, role, attempt)
        self.script = script or {}
        self.delay = delay
        self.requests: list[tuple[float, tuple, GenerationRequest]] = []
        self.results: list[GenerationResult] = []
        self.in_flight = self.max_in_flight = 0

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        key = self.lookup[request.params.seed]
        self.requests.append((time.monotonic(), key, request))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay is not None:
                await asyncio.sleep(self.delay(key))
            uuid, turn, role, attempt = key
            text = f"{'Q' if role == 'user' else 'A'} {uuid} t{turn} a{attempt}"
            result = GenerationResult(f"  {text}  ", "stop", 5)
            override = self.script.get(key)
            result = override(text) if callable(override) else (override or result)
            self.results.append(result)
            return result
        finally:
            self.in_flight -= 1

    def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, model_id="fake")


async def collect(engine: ConversationEngine, specs) -> list[Conversation]:
    return [conv async for conv in engine.run(specs)]


def make_engine(backend, fmt=None, **kw) -> ConversationEngine:
    kw.setdefault("cleanup", CleanupOptions())
    kw.setdefault("multi_turn_system_prompt", MT_SYSTEM)
    return ConversationEngine(backend, fmt or FakeFormat(), **kw)


def test_a_failed_turn_is_regenerated_and_the_finished_turns_before_it_stay():
    specs = [spec(0, uuid="a"), spec(1, uuid="b"), spec(2, uuid="c"), spec(3, uuid="d")]
    trunc = GenerationResult("Q half", "length", 32)
    script = {
        ("a", 2, "user", 1): trunc,                                         # truncated follow-up
        ("b", 1, "assistant", 1): GenerationResult("", "error", 0, error="boom"),
        ("b", 1, "user", 2): GenerationResult(" \n ", "stop", 2),            # empty
        ("b", 2, "user", 3): lambda t: GenerationResult(f"{t} as follows:", "stop", 6),   # colon ending
        ("b", 3, "assistant", 4): GenerationResult("A long reply", "length", 64),  # truncated response
        ("d", 1, "assistant", 1): GenerationResult("[/A][U]What next?", "stop", 4),  # role marker inside
        **{("c", 3, "assistant", k): trunc for k in range(1, 6)},          # never succeeds
    }
    backend = ScriptedBackend(specs, script=script)
    engine = make_engine(backend, max_attempts=5, cleanup=CleanupOptions(truncated_response="drop"))
    convs = {c.spec.uuid: c for c in asyncio.run(collect(engine, specs))}

    assert set(convs) == {"a", "b", "d"}                     # "c" exhausted: never yielded half-made
    assert [s.uuid for s in engine.exhausted] == [s.uuid for s in engine.failed] == ["c"]
    assert (convs["a"].attempts, convs["b"].attempts, convs["d"].attempts) == (2, 5, 2)
    assert engine.dropped == {"truncated": 1 + 1 + 5, "error": 1, "empty": 1, "colon": 1, "role_leak": 1}
    made_by = {"a": [1, 2, 2], "b": [3, 4, 5], "d": [2, 2, 2]}   # the attempt that wrote each kept turn
    for conv in convs.values():
        assert len(conv.turns) == 3
        for turn, (user, reply) in enumerate(conv.turns, 1):   # every text from its kept attempt, stripped
            attempt = made_by[conv.spec.uuid][turn - 1]
            assert user == f"Q {conv.spec.uuid} t{turn} a{attempt}"
            assert reply == f"A {conv.spec.uuid} t{turn} a{attempt}"
    # a dropped attempt sends nothing after the failed turn; the next one starts again at the failed turn
    sent_b = [key for _, key, _ in backend.requests if key[0] == "b"]
    assert sent_b == [("b", 1, "user", 1), ("b", 1, "assistant", 1), ("b", 1, "user", 2), ("b", 1, "user", 3),
                      ("b", 1, "assistant", 3), ("b", 2, "user", 3), ("b", 2, "user", 4), ("b", 2, "assistant", 4),
                      ("b", 3, "user", 4), ("b", 3, "assistant", 4), ("b", 3, "user", 5), ("b", 3, "assistant", 5)]
    assert [c.finish_reasons for c in convs.values()] == [["stop"] * 6] * 3
    # tokens: the engine counts every attempt, a conversation only its kept turns
    assert convs["a"].generated_tokens == 6 * 5
    assert engine.generated_tokens == sum(r.generated_tokens for r in backend.results) > 3 * 6 * 5


def test_cleanup_options_and_newline_stop():
    s_plain, s_nl = spec(0, turns=1), spec(1, turns=1, newline=True)
    script = {("u0", 1, "user", 1): GenerationResult("Write a poem:", "stop", 4),
              ("u1", 1, "user", 1): GenerationResult("First line?\nSecond line", "length", 32)}
    backend = ScriptedBackend([s_plain, s_nl], script=script)
    keep_all = CleanupOptions(strip=False, drop_colon_ending=False)
    convs = {c.spec.uuid: c for c in asyncio.run(collect(make_engine(backend, cleanup=keep_all), [s_plain, s_nl]))}
    assert convs["u0"].turns[0][0] == "Write a poem:"                      # colon kept when disabled
    assert convs["u0"].turns[0][1] == "  A u0 t1 a1  "                      # no strip when disabled
    assert convs["u1"].turns[0][0] == "First line?"                        # newline stop cut it: not truncated
    user_requests = [req for _, key, req in backend.requests if key[2] == "user"]
    assert {req.stop for req in user_requests} == {("[/U]",), ("[/U]", "\n")}
    assert all(req.stop == ("[/A]",) for _, key, req in backend.requests if key[2] == "assistant")

    backend = ScriptedBackend([s_plain], script=script)
    engine = make_engine(backend, max_attempts=2)
    convs = asyncio.run(collect(engine, [s_plain]))
    assert convs[0].attempts == 2 and engine.dropped == {"colon": 1}      # default: colon endings dropped


def test_concurrency_is_bounded_and_reached():
    specs = [spec(i, turns=2) for i in range(40)]
    backend = ScriptedBackend(specs, delay=lambda key: 0.002)
    engine = make_engine(backend, concurrency=7)
    convs = asyncio.run(collect(engine, specs))
    assert sorted(c.spec.index for c in convs) == list(range(40))
    assert backend.max_in_flight == 7


def test_no_lockstep_a_slow_conversation_does_not_delay_others():
    specs = [spec(i, turns=3) for i in range(10)]
    slow = 1.0   # u0's every turn; the others need ~6 x 5 ms in all (wide margin for a loaded machine)
    backend = ScriptedBackend(specs, delay=lambda key: slow if key[0] == "u0" else 0.005)
    engine = make_engine(backend, concurrency=10)
    started = time.monotonic()

    async def run():
        order = []
        async for conv in engine.run(specs):
            order.append((conv.spec.uuid, time.monotonic() - started))
        return order

    order = asyncio.run(run())
    assert order[-1][0] == "u0"
    assert max(t for uuid, t in order if uuid != "u0") < slow    # all others done before u0's first turn
    first_u0_return = started + slow
    later_turns = [t for t, key, _ in backend.requests if key[0] != "u0" and key[1] == 3]
    assert later_turns and max(later_turns) < first_u0_return


def test_rows_do_not_depend_on_scheduling():
    specs = [spec(i, turns=2) for i in range(30)]

    def outcome(concurrency: int, jitter: int):
        rng = random.Random(jitter)
        delays = {}
        script = {("u3", 1, "user", 1): GenerationResult("cut", "length", 32),
                  ("u5", 2, "assistant", 1): GenerationResult("", "error", 0)}
        backend = ScriptedBackend(specs, script=script,
                                  delay=lambda key: delays.setdefault(key, rng.random() * 0.004))
        convs = asyncio.run(collect(make_engine(backend, concurrency=concurrency), specs))
        return {c.spec.uuid: (c.turns, c.attempts) for c in convs}, backend

    a, backend_a = outcome(1, 0)
    b, _ = outcome(16, 1)
    assert a == b and len(a) == 30
    seeds = [req.params.seed for _, _, req in backend_a.requests]
    assert len(set(seeds)) == len(seeds)                       # every request its own seed
    assert request_seed(SEED, "u1", 1, "user", 1) != request_seed(SEED + 1, "u1", 1, "user", 1)


def test_permanent_backend_error_stops_the_run_and_cancels_the_rest():
    specs = [spec(i, turns=2) for i in range(20)]

    class Failing(ScriptedBackend):
        async def generate(self, request):
            if self.lookup[request.params.seed][0] == "u4":
                raise BackendError("bad endpoint: fix --endpoint")
            return await super().generate(request)

    backend = Failing(specs, delay=lambda key: 0.01)
    engine = make_engine(backend, concurrency=8)
    with pytest.raises(BackendError, match="bad endpoint"):
        asyncio.run(collect(engine, specs))
    assert backend.in_flight == 0


def test_consumer_stopping_early_cancels_pending_conversations():
    specs = [spec(i, turns=3) for i in range(50)]
    backend = ScriptedBackend(specs, delay=lambda key: 0.001)
    engine = make_engine(backend, concurrency=5)

    async def first():
        gen = engine.run(iter(specs))
        conv = await gen.__anext__()
        await gen.aclose()
        return conv

    conv = asyncio.run(first())
    assert len(conv.turns) == 3 and backend.in_flight == 0
    assert len({key[0] for _, key, _ in backend.requests}) < 15          # specs are pulled lazily


def test_conversation_to_row_matches_the_schema():
    from datasets import Dataset

    from magpie_hub.dataset.schema import BUILD_FEATURES

    s = spec(0, turns=2, system="You solve math.", category="math")
    conv = Conversation(spec=s, turns=[("Q1", "A1"), ("Q2", "A2")], generated_tokens=20, attempts=1,
                        finish=["stop", "stop", "stop", "length"])
    row = conversation_to_row(conv, model="org/model", chat_format=FakeFormat(), seed=SEED)
    ds = Dataset.from_list([row], features=BUILD_FEATURES)
    got = ds[0]
    assert got["uuid"] == "u0" and got["model"] == "org/model" and got["turns"] == 2 and got["category"] == "math"
    assert (got["instruction"], got["response"]) == ("Q1", "A1")
    assert [m["from"] for m in got["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert [m["role"] for m in got["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in got["messages"]] == ["Q1", "A1", "Q2", "A2"]
    cfg = got["gen_input_configs"]
    assert cfg == {"temperature": 1.0, "top_p": 1.0, "seed": SEED, "pre_query_template":
                   "<s>[S]You solve math.[/S][U]", "input_generator": "org/model"}
    assert got["truncated"] is True and got["finish_reasons"] == ["stop", "stop", "stop", "length"]
    plain = conversation_to_row(Conversation(spec(1, turns=1), [("Q", "A")], 2, 1), model="m",
                                chat_format=FakeFormat(), seed=SEED)
    assert plain["gen_input_configs"]["pre_query_template"] == "<s>[U]" and plain["category"] is None
    assert plain["truncated"] is False and plain["finish_reasons"] == ["stop", "stop"]


# -- byte-exact prompts on real chat templates ------------------------------------------------------------------

def _sentinel_prefix(tok, messages) -> str:
    text = tok.apply_chat_template([*messages, {"role": "user", "content": "SENTINELXYZ"}], tokenize=False,
                                   add_generation_prompt=False)
    return text[:text.index("SENTINELXYZ")]


def _llama3_by_hand(messages, next_role):
    """Llama-3's format written out (its template always appends an assistant header: MAGPIE must not)."""
    body = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                   for m in messages)
    return f"<|begin_of_text|>{body}<|start_header_id|>{next_role}<|end_header_id|>\n\n"


def _qwen_by_hand(messages, next_role):
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": QWEN_DEFAULT_SYSTEM}, *messages]
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return f"{body}<|im_start|>{next_role}\n"


QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
HAND = {"llama3": _llama3_by_hand, "qwen": _qwen_by_hand}


@pytest.mark.parametrize("family", ["llama3", "qwen"])
@pytest.mark.parametrize("system", [None, "You are an AI assistant designed to help with math problems."])
def test_prompts_are_byte_exact_for_three_turns(family, system, request):
    from magpie_hub.chat.format import load_chat_format

    path = request.getfixturevalue("tiny_llama3" if family == "llama3" else "tiny_qwen")
    fmt = load_chat_format(str(path))
    tok = fmt.tokenizer
    s = spec(0, turns=3, system=system)
    backend = ScriptedBackend([s])
    convs = asyncio.run(collect(make_engine(backend, fmt), [s]))
    assert len(convs) == 1
    turns = convs[0].turns
    prompts = [(key, req) for _, key, req in backend.requests]
    assert [(k[1], k[2]) for k, _ in prompts] == [(t, r) for t in (1, 2, 3) for r in ("user", "assistant")]

    sys_msgs = [] if system is None else [{"role": "system", "content": system}]
    mt_msgs = [{"role": "system", "content": MT_SYSTEM}]
    for (key, req) in prompts:
        turn, role = key[1], key[2]
        history = []
        for user, reply in turns[:turn - 1]:
            history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        if role == "user":
            expected = _sentinel_prefix(tok, sys_msgs if turn == 1 else [*mt_msgs, *history])
            assert req.stop == fmt.user_stop
            by_hand = HAND[family]([*(sys_msgs if turn == 1 else [*mt_msgs, *history])], "user")
        else:
            expected = tok.apply_chat_template([*history, {"role": "user", "content": turns[turn - 1][0]}],
                                               tokenize=False, add_generation_prompt=True)
            assert req.stop == fmt.assistant_stop
            by_hand = HAND[family]([*history, {"role": "user", "content": turns[turn - 1][0]}], "assistant")
            assert MT_SYSTEM not in req.prompt and (system is None or system not in req.prompt)
        assert req.prompt == expected == by_hand, (turn, role)
        assert not req.prompt.endswith(fmt.post_query + fmt.follow_up)
    if family == "llama3":
        first = prompts[0][1].prompt
        header = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        if system is None:
            assert first == header                       # the official Llama-3 pre-query template
        else:
            assert first == (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
                             "<|start_header_id|>user<|end_header_id|>\n\n")
        for _, req in prompts:
            assert req.prompt.count("<|begin_of_text|>") == 1 and req.prompt.startswith("<|begin_of_text|>")
            assert "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>" not in req.prompt
        assert fmt.encode(first).count(tok.bos_token_id) == 1
    else:
        qwen_default = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                        "<|im_end|>\n<|im_start|>user\n")
        if system is None:
            assert prompts[0][1].prompt == qwen_default
        assert "<|im_start|>assistant\n<|im_end|>" not in "".join(req.prompt for _, req in prompts)


def test_stop_strings_are_cut_by_one_helper():
    from magpie_hub.generate.backends.base import cut_at_stop

    assert cut_at_stop("Hello<|eot_id|>tail", ("<|eot_id|>",)) == ("Hello", True)
    assert cut_at_stop("a STOP b END c", ("END", "STOP", "")) == ("a ", True)   # the earliest stop wins
    assert cut_at_stop("no stop here", ("<|eot_id|>",)) == ("no stop here", False)
    assert cut_at_stop("", ()) == ("", False)
