"""The serving core of the TGI stand-in (tests/tgi_server.py): what happens behind its HTTP routes.

The tokenizer (as TGI's router uses it: special tokens added), TGI's request validation (422 messages of
router/src/validation.rs), generation in model mode (a transformers model, one request at a time) or in
simulated mode (``--slots`` concurrent pseudo-sequences at ``--ms-per-token``, deterministic in prompt and
seed), the counters behind ``GET /metrics``, and the injected faults (503, 429, dropped connection,
stall). ``tgi_server.Server`` adds the HTTP handlers on top of :class:`TGIServingCore`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import time
from pathlib import Path

from aiohttp import web

WORDS = (
    "how can I write a short python function that sorts list of numbers and explain each step please "
    "what is the best way to plan trip budget for family with two kids in summer give me examples "
    "compare solar wind energy costs over ten years why does the river flow north describe history "
    "of music theory chord progression in jazz solve this equation integral derivative prove theorem"
).split()


def validation_error(message: str) -> web.Response:
    return error_response(422, f"Input validation error: {message}", "validation")


def error_response(status: int, message: str, error_type: str) -> web.Response:
    return web.json_response({"error": message, "error_type": error_type}, status=status)


def stop_on_text(tokenizer, stops: list[str], start: int):
    """A transformers stopping criterion: stop once the last 16 new tokens contain a stop string
    (transformers' own ``stop_strings`` rebuilds vocabulary tables on every call: too slow here)."""
    import torch
    from transformers import StoppingCriteria

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            tail = tokenizer.decode(input_ids[0, max(start, input_ids.shape[1] - 16):].tolist())
            return torch.tensor([any(s in tail for s in stops)] * input_ids.shape[0])

    return StopOnText()


class Tok:
    """The model's tokenizer through the ``tokenizers`` library, as TGI's router uses it (encodes with
    special tokens added). Simulated mode reads ``tokenizer.json`` directly (starts in well under a
    second); model mode takes transformers' backend tokenizer."""

    def __init__(self, model_dir: str, *, light: bool):
        path = Path(model_dir)
        config = self._json(path / "tokenizer_config.json")
        if light and (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        else:
            from transformers import AutoTokenizer

            self.backend = AutoTokenizer.from_pretrained(model_dir).backend_tokenizer
        self.special_ids = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        eos = self._json(path / "generation_config.json").get("eos_token_id")
        self.eos_ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
        eos_text = config.get("eos_token")
        eos_text = eos_text.get("content") if isinstance(eos_text, dict) else eos_text
        if eos_text and self.backend.token_to_id(eos_text) not in (None, *self.eos_ids):
            self.eos_ids.append(self.backend.token_to_id(eos_text))

    @staticmethod
    def _json(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    def encode(self, text: str):
        return self.backend.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id) or ""


class TGIServingCore:
    """State of one stand-in server: tokenizer (+ model), limits, slots, faults, counters; validation,
    generation and fault injection (the HTTP routes are in ``tgi_server.Server``)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model_dir = args.model
        self.tokenizer = Tok(args.model, light=args.simulate)
        self.eos_ids = self.tokenizer.eos_ids
        self.model = None
        if not args.simulate:
            import torch
            from transformers import AutoModelForCausalLM

            torch.set_num_threads(max(1, args.threads))
            self.model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        self.model_lock = asyncio.Lock()
        self.slots = asyncio.Semaphore(args.slots)
        self.in_flight = 0
        self.faults = random.Random(args.fault_seed)
        self.metrics = {"requests": 0, "success": 0, "generated_tokens": 0, "input_tokens": 0,
                        "faults_503": 0, "faults_429": 0, "overloaded_429": 0, "drops": 0, "stalls": 0,
                        "validation_422": 0, "unauthorized_401": 0, "busy_slot_seconds": 0.0,
                        "first_request_s": 0.0, "last_response_s": 0.0}
        self.started = time.monotonic()
        self.started_unix = time.time()       # the same instant on the wall clock (to line servers up)

    # ----------------------------------------------------------------------------------- protocol
    def info(self) -> dict:
        a = self.args
        return {
            "model_id": a.model_id or a.model, "model_sha": a.model_sha, "model_dtype": "torch.float32",
            "model_device_type": "cpu", "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": a.max_concurrent_requests, "max_best_of": 2,
            "max_stop_sequences": 4, "max_input_tokens": a.max_input_tokens,
            "max_total_tokens": a.max_total_tokens, "validation_workers": 2, "max_client_batch_size": 4,
            "router": "text-generation-router", "version": "2.4.1-standin", "sha": None, "docker_label": None,
        }

    def validate(self, body: object) -> tuple[dict, list[int]] | web.Response:
        """TGI's validation (router/src/validation.rs): 422 with TGI's messages."""
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            return error_response(422, "Failed to deserialize the JSON body into the target type: "
                                  "missing field `inputs`", "validation")
        p = body.get("parameters") or {}
        if not isinstance(p, dict):
            return validation_error("`parameters` must be an object")
        temperature, top_p, top_k = p.get("temperature"), p.get("top_p"), p.get("top_k")
        if temperature is not None and temperature <= 0:
            return validation_error("`temperature` must be strictly positive")
        if top_p is not None and not 0.0 < top_p < 1.0:
            return validation_error("`top_p` must be > 0.0 and < 1.0")
        if top_k is not None and top_k <= 0:
            return validation_error("`top_k` must be strictly positive")
        if p.get("repetition_penalty") is not None and p["repetition_penalty"] <= 0:
            return validation_error("`repetition_penalty` must be strictly positive")
        stop = p.get("stop") or []
        if len(stop) > 4:
            return validation_error(f"`stop` supports up to 4 stop sequences. Given: {len(stop)}")
        max_new = p.get("max_new_tokens")
        if max_new is not None and max_new <= 0:
            return validation_error("`max_new_tokens` must be strictly positive")
        if not body["inputs"]:
            return validation_error("`inputs` cannot be empty")
        ids = self.tokenizer.encode(body["inputs"]).ids
        if len(ids) > self.args.max_input_tokens:
            return validation_error(f"`inputs` must have less than {self.args.max_input_tokens} tokens. "
                                    f"Given: {len(ids)}")
        if max_new is None:
            max_new = min(100, self.args.max_total_tokens - len(ids))
        if len(ids) + max_new > self.args.max_total_tokens:
            return validation_error(f"`inputs` tokens + `max_new_tokens` must be <= {self.args.max_total_tokens}. "
                                    f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`")
        params = {"max_new_tokens": int(max_new), "stop": list(stop), "do_sample": bool(p.get("do_sample")),
                  "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": p.get("seed"),
                  "return_full_text": bool(p.get("return_full_text")), "details": bool(p.get("details"))}
        # like TGI's NextTokenChooser: any warper turns sampling on
        params["do_sample"] = params["do_sample"] or temperature not in (None, 1.0) or top_p is not None \
            or top_k is not None
        if params["do_sample"] and params["seed"] is None:
            params["seed"] = random.getrandbits(63)
        return params, ids

    # ----------------------------------------------------------------------------------- generation
    async def generate(self, params: dict, ids: list[int], prompt: str) -> dict:
        if self.model is None:
            tokens, finish = await self._simulate(params, prompt)
        else:
            async with self.model_lock:
                tokens, finish = await asyncio.to_thread(self._run_model, params, ids)
        text = self.tokenizer.decode([t["id"] for t in tokens], skip_special_tokens=True) \
            if self.model is not None else "".join(t["text"] for t in tokens if not t["special"])
        if params["return_full_text"]:
            text = prompt + text
        self.metrics["success"] += 1
        self.metrics["last_response_s"] = round(time.monotonic() - self.started, 4)
        self.metrics["generated_tokens"] += len(tokens)
        self.metrics["input_tokens"] += len(ids)
        details = {"finish_reason": finish, "generated_tokens": len(tokens),
                   "seed": params["seed"] if params["do_sample"] else None, "prefill": [], "tokens": tokens,
                   "top_tokens": None, "best_of_sequences": None}
        return {"generated_text": text, "details": details}

    async def _simulate(self, params: dict, prompt: str) -> tuple[list[dict], str]:
        key = f"{params['seed']}\x00{prompt}".encode()
        rng = random.Random(hashlib.sha256(key).digest())
        mean = max(1.0, self.args.mean_tokens)
        n = 1
        while rng.random() > 1.0 / mean:  # geometric length, mean `mean` tokens (eos included)
            n += 1
        limit = params["max_new_tokens"]
        tokens = []
        for i in range(min(n - 1, limit)):
            word = rng.choice(WORDS)
            tokens.append({"id": 1000 + WORDS.index(word), "text": (" " if i else "") + word,
                           "logprob": -round(rng.random() * 3, 4), "special": False})
        finish, text = "length", ""
        for i, token in enumerate(tokens):  # TGI's stop-sequence criterion: the stop string stays in the text
            text += token["text"]
            if any(s in text for s in params["stop"]):
                del tokens[i + 1:]
                finish = "stop_sequence"
                break
        if finish == "length" and len(tokens) < limit:
            eos = self.eos_ids[0] if self.eos_ids else 0
            tokens.append({"id": eos, "text": self.tokenizer.token_text(eos), "logprob": -0.1,
                           "special": True})
            finish = "eos_token"
        async with self.slots:
            started = time.monotonic()
            await asyncio.sleep(len(tokens) * self.args.ms_per_token / 1000.0)
            self.metrics["busy_slot_seconds"] += time.monotonic() - started
        return tokens, finish

    def _run_model(self, params: dict, ids: list[int]) -> tuple[list[dict], str]:
        import torch
        from transformers import StoppingCriteriaList

        gen = {"max_new_tokens": params["max_new_tokens"], "eos_token_id": self.eos_ids or None,
               "pad_token_id": self.eos_ids[0] if self.eos_ids else 0, "do_sample": params["do_sample"]}
        if params["do_sample"]:
            torch.manual_seed(params["seed"] % (2**63))
            gen.update(temperature=params["temperature"] or 1.0, top_p=params["top_p"] or 1.0,
                       top_k=params["top_k"] or 0)
        if params["stop"]:
            gen["stopping_criteria"] = StoppingCriteriaList([stop_on_text(self.tokenizer, params["stop"], len(ids))])
        started = time.monotonic()
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      output_logits=True, return_dict_in_generate=True, **gen)
        self.metrics["busy_slot_seconds"] += time.monotonic() - started
        new = out.sequences[0, len(ids):].tolist()
        tokens, finish = [], "length"
        special = self.tokenizer.special_ids
        for i, tid in enumerate(new):
            logprob = torch.log_softmax(out.logits[i][0].float(), dim=-1)[tid].item()
            tokens.append({"id": tid, "text": self.tokenizer.decode([tid]), "logprob": round(logprob, 4),
                           "special": tid in special})
            if tid in self.eos_ids:
                finish = "eos_token"
                break
            so_far = self.tokenizer.decode(new[max(0, i - 15): i + 1])
            if any(s in so_far for s in params["stop"]):
                finish = "stop_sequence"
                break
        return tokens, finish

    # ----------------------------------------------------------------------------------- faults
    async def inject_fault(self, request: web.Request) -> web.Response | None:
        a, roll, name = self.args, self.faults.random(), None
        for rate, kind in ((a.fail_503, "503"), (a.fail_429, "429"), (a.drop, "drop"), (a.stall, "stall")):
            if roll < rate:
                name = kind
                break
            roll -= rate
        if name is None:
            return None
        if name == "503":
            self.metrics["faults_503"] += 1
            return error_response(503, "Service Unavailable (injected)", "unavailable")
        if name == "429":
            self.metrics["faults_429"] += 1
            return error_response(429, "Model is overloaded", "overloaded")
        if name == "drop":
            self.metrics["drops"] += 1
            await request.read()
            request.transport.abort()  # reset the connection without an answer
            raise asyncio.CancelledError
        self.metrics["stalls"] += 1
        await asyncio.sleep(a.stall_s)
        return error_response(504, "Gateway Timeout (injected stall)", "timeout")
