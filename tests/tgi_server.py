"""A stand-in for Hugging Face text-generation-inference (TGI), for tests and benchmarks.

Speaks the TGI router's HTTP protocol: ``POST /generate`` (object), ``POST /`` (one-element list, or
SSE when ``"stream": true``), ``POST /generate_stream`` (SSE), ``POST /tokenize``, ``GET /info``,
``GET /health``, ``GET /metrics`` (Prometheus text), and the OpenAI-compatible ``GET /v1/models``,
``POST /v1/completions`` (vLLM's shapes; ``--chat-only``: 404 like a chat-only API) and a minimal
``POST /v1/chat/completions``, with TGI's JSON shapes, its validation rules
(422 ``validation``), ``429 overloaded`` beyond ``max_concurrent_requests`` and ``401`` without the
``--token`` Bearer token. Prompts are tokenized with special tokens added, like TGI.

Two serving modes:

* model mode (default): the transformers model in ``--model DIR`` generates (one request at a time,
  in a worker thread; stops at the generation config's eos ids and at stop sequences);
* simulated mode (``--simulate``): no model runs; ``--slots K`` requests are served concurrently at
  ``--ms-per-token`` each, producing deterministic pseudo-words (a function of prompt and seed) whose
  length follows a geometric law of mean ``--mean-tokens`` and that end with the eos token (or hit
  ``max_new_tokens``), so throughput is measurable without a GPU: capacity = K * 1000 / ms tokens/s.

Injected faults on generation routes (rates in [0, 1), drawn from ``--fault-seed``): ``--fail-503``,
``--fail-429``, ``--drop`` (connection closed without an answer), ``--stall`` (sleep ``--stall-s``
before answering). Run: ``python tests/tgi_server.py --model DIR --port 8080 [--simulate ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web
from tgi_sim import TGIServingCore, error_response


def openai_error(status: int, message: str, error_type: str) -> web.Response:
    return web.json_response({"object": "error", "message": message, "type": error_type, "param": None,
                              "code": status}, status=status)


class Server(TGIServingCore):
    """One stand-in server: TGI's and the OpenAI-compatible HTTP routes over :class:`TGIServingCore`."""

    # ----------------------------------------------------------------------------------- handlers
    def authorized(self, request: web.Request) -> bool:
        return not self.args.token or request.headers.get("Authorization") == f"Bearer {self.args.token}"

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        self.metrics["requests"] += 1
        if not self.authorized(request):
            self.metrics["unauthorized_401"] += 1
            return error_response(401, "Unauthorized", "authorization")
        fault = await self.inject_fault(request)
        if fault is not None:
            return fault
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "Failed to parse the request body as JSON", "validation")
        checked = self.validate(body)
        if isinstance(checked, web.Response):
            self.metrics["validation_422"] += 1
            return checked
        params, ids = checked
        result = await self.admit(request, body, params, ids, body["inputs"])
        if isinstance(result, web.Response):
            return result
        stream = request.path == "/generate_stream" or (request.path == "/" and body.get("stream"))
        if stream:
            return await self.send_stream(request, result)
        if not params["details"]:
            result = {"generated_text": result["generated_text"]}
        return web.json_response([result] if request.path == "/" else result)

    async def admit(self, request: web.Request, body: dict, params: dict, ids: list[int], prompt: str):
        """Log, refuse beyond max_concurrent_requests (TGI's 429), generate."""
        if self.args.log_requests:
            with open(self.args.log_requests, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"path": request.path, "body": body, "input_ids": ids[:4],
                                     "auth": request.headers.get("Authorization") is not None}) + "\n")
        if self.in_flight >= self.args.max_concurrent_requests:
            self.metrics["overloaded_429"] += 1
            return error_response(429, "Model is overloaded", "overloaded")
        now = round(time.monotonic() - self.started, 4)
        self.metrics["first_request_s"] = self.metrics["first_request_s"] or now
        self.in_flight += 1
        try:
            return await self.generate(params, ids, prompt)
        finally:
            self.in_flight -= 1

    # ------------------------------------------------------------- OpenAI-compatible routes (vLLM's shapes)
    def served_id(self) -> str:
        return self.args.model_id or self.args.model

    async def handle_models(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return web.json_response({"object": "list", "data": [
            {"id": self.served_id(), "object": "model", "created": int(time.time()), "owned_by": "vllm",
             "root": self.served_id(), "parent": None, "max_model_len": self.args.max_total_tokens}]})

    async def handle_completions(self, request: web.Request) -> web.Response:
        self.metrics["requests"] += 1
        if not self.authorized(request):
            self.metrics["unauthorized_401"] += 1
            return web.json_response({"error": "Unauthorized"}, status=401)
        if self.args.chat_only:
            return openai_error(404, "This is a chat model and not supported in the v1/completions endpoint. "
                                "Did you mean to use v1/chat/completions?", "NotFoundError")
        fault = await self.inject_fault(request)
        if fault is not None:
            return fault
        body = await request.json()
        if body.get("model") != self.served_id():
            return openai_error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        stop = body.get("stop") or []
        params = {"max_new_tokens": body.get("max_tokens", 16), "stop": [stop] if isinstance(stop, str) else stop,
                  "seed": body.get("seed"), "details": True}
        if body.get("temperature", 1.0) > 0:
            params.update(do_sample=True, temperature=body.get("temperature", 1.0))
        if body.get("top_p") is not None and body["top_p"] < 1.0:
            params["top_p"] = body["top_p"]
        checked = self.validate({"inputs": body.get("prompt") or "", "parameters": params})
        if isinstance(checked, web.Response):
            self.metrics["validation_422"] += 1
            message = json.loads(checked.body)["error"].removeprefix("Input validation error: ")
            if "tokens" in message and ("must be <=" in message or "less than" in message):
                message = (f"This model's maximum context length is {self.args.max_total_tokens} tokens. However, "
                           f"you requested more ({message}). Please reduce the length of the prompt or completion.")
            return openai_error(400, message, "BadRequestError")
        result = await self.admit(request, body, *checked, body["prompt"])
        if isinstance(result, web.Response):
            return result
        text, finish = result["generated_text"], result["details"]["finish_reason"]
        if finish == "stop_sequence":  # vLLM leaves the matched stop string out of the text
            text = text[: min((i for i in (text.rfind(x) for x in params["stop"]) if i >= 0), default=len(text))]
        n_in, n_out = len(checked[1]), result["details"]["generated_tokens"]
        return web.json_response({
            "id": f"cmpl-{self.metrics['success']}", "object": "text_completion", "created": int(time.time()),
            "model": self.served_id(), "choices": [{"index": 0, "text": text, "logprobs": None, "stop_reason": None,
                                                    "finish_reason": "length" if finish == "length" else "stop"}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}})

    async def handle_chat(self, request: web.Request) -> web.Response:
        """A minimal chat route (the template is applied server-side: no raw completion possible)."""
        if not self.authorized(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        body = await request.json()
        prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        tokens, _ = await self._simulate({"seed": body.get("seed"), "max_new_tokens": 32, "stop": []}, prompt)
        text = "".join(t["text"] for t in tokens if not t["special"])
        return web.json_response({"id": "chatcmpl-0", "object": "chat.completion", "model": self.served_id(),
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": text}}]})

    async def send_stream(self, request: web.Request, result: dict) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        tokens = result["details"]["tokens"]
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            event = {"index": i + 1, "token": token, "top_tokens": None,
                     "generated_text": result["generated_text"] if last else None,
                     "details": {k: result["details"][k] for k in ("finish_reason", "generated_tokens", "seed")}
                     if last else None}
            await resp.write(f"data:{json.dumps(event)}\n\n".encode())
        await resp.write_eof()
        return resp

    async def handle_tokenize(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return error_response(401, "Unauthorized", "authorization")
        body = await request.json()
        enc = self.tokenizer.encode(body.get("inputs", ""))
        return web.json_response([
            {"id": i, "text": self.tokenizer.decode([i]), "start": s, "stop": e}
            for i, (s, e) in zip(enc.ids, enc.offsets, strict=True)])

    async def handle_info(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return error_response(401, "Unauthorized", "authorization")
        return web.json_response(self.info())

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        m = dict(self.metrics, uptime_seconds=round(time.monotonic() - self.started, 3), in_flight=self.in_flight,
                 slots=self.args.slots, ms_per_token=self.args.ms_per_token, started_unix=round(self.started_unix, 4))
        lines = [f"tgi_standin_{k} {v}" for k, v in m.items()]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.add_routes([web.post("/generate", self.handle_generate), web.post("/", self.handle_generate),
                        web.post("/generate_stream", self.handle_generate),
                        web.post("/tokenize", self.handle_tokenize), web.get("/info", self.handle_info),
                        web.get("/health", self.handle_health), web.get("/metrics", self.handle_metrics),
                        web.get("/v1/models", self.handle_models), web.post("/v1/completions", self.handle_completions),
                        web.post("/v1/chat/completions", self.handle_chat)])
        return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local model/tokenizer directory")
    ap.add_argument("--model-id", default=None, help="model_id reported by /info (default: --model)")
    ap.add_argument("--model-sha", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = a free port (printed on stdout)")
    ap.add_argument("--port-file", type=Path, default=None, help="write the bound port here when ready")
    ap.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (401 otherwise)")
    ap.add_argument("--chat-only", action="store_true", help="POST /v1/completions answers 404 (a chat-only API)")
    ap.add_argument("--max-concurrent-requests", type=int, default=128)
    ap.add_argument("--max-input-tokens", type=int, default=1024)
    ap.add_argument("--max-total-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in model mode")
    ap.add_argument("--simulate", action="store_true", help="simulated serving: no model runs")
    ap.add_argument("--slots", type=int, default=32, help="simulated concurrent sequences")
    ap.add_argument("--ms-per-token", type=float, default=5.0)
    ap.add_argument("--mean-tokens", type=float, default=48.0, help="simulated mean length (eos included)")
    ap.add_argument("--fail-503", type=float, default=0.0)
    ap.add_argument("--fail-429", type=float, default=0.0)
    ap.add_argument("--drop", type=float, default=0.0)
    ap.add_argument("--stall", type=float, default=0.0)
    ap.add_argument("--stall-s", type=float, default=30.0)
    ap.add_argument("--fault-seed", type=int, default=0)
    ap.add_argument("--log-requests", type=Path, default=None, help="append each valid request body (JSON lines)")
    args = ap.parse_args(argv)
    if args.fail_503 + args.fail_429 + args.drop + args.stall >= 1.0:
        ap.error("fault rates must sum to less than 1")
    return args


async def serve(args: argparse.Namespace) -> None:
    server = Server(args)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=True, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    if args.port_file:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
    print(f"tgi stand-in serving {args.model} on http://{args.host}:{port}", flush=True)
    await asyncio.Event().wait()


def spawn(model: str | Path, args: tuple[str, ...], tmp: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Start this server as a subprocess (port 0 = a free one, written to a port file when it is ready)."""
    tmp.mkdir(parents=True, exist_ok=True)
    port_file, log_path = tmp / "port", tmp / "server.log"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--model", str(model),
                                 "--port-file", str(port_file), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, port_file, log_path


def wait_ready(proc: subprocess.Popen, port_file: Path, log_path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"TGI stand-in did not start (rc={proc.poll()}):\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    return f"http://127.0.0.1:{int(port_file.read_text())}"


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started here, by its PID (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        os.kill(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait(10)


@contextlib.contextmanager
def launched(model: str | Path, *args: str, timeout: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start this server as a subprocess on a free 127.0.0.1 port; yield (base URL, process); stop it by PID."""
    with launched_many(model, 1, *args, timeout=timeout) as servers:
        yield servers[0]


@contextlib.contextmanager
def launched_many(model: str | Path, count: int, *args: str, timeout: float = 120.0
                  ) -> Iterator[list[tuple[str, subprocess.Popen]]]:
    """``count`` servers started side by side (they load in parallel); yield [(base URL, process)]."""
    with tempfile.TemporaryDirectory(prefix="tgi-standin-") as tmp:
        started = [spawn(model, args, Path(tmp) / str(i)) for i in range(count)]
        try:
            yield [(wait_ready(*s, timeout), s[0]) for s in started]
        finally:
            for proc, _, _ in started:
                stop(proc)


def main(argv: list[str] | None = None) -> None:
    try:
        asyncio.run(serve(parse_args(argv)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
