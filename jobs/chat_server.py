"""An OpenAI-compatible chat server over the ContinuousBatcher (FastAPI + uvicorn).

    python -m jobs.chat_server --store ~/.cache/vibechat --run <run_id> --source sft      # 127.0.0.1:8000
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "sft", "messages": [{"role": "user", "content": "Hi!"}]}'

Endpoints: POST /v1/chat/completions (streamed as server-sent events with "stream": true), GET /v1/models,
GET /health (the process is up), GET /ready (model loaded and its decode steps warmed up), GET /metrics
(Prometheus; with --metrics-port N also alone on port N, for a scraper that must not reach the API). A calculator
call shows in the reply's text as the model writes it and the tool answers:
`<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>`, then the reply goes on. Sent back as an
assistant message, each such call renders to the special tokens the model produced. A marker outside a well-formed
call (one unclosed because max_tokens cut the reply, an output without its call, a call inside a call) stays plain
text, so every reply the server wrote is accepted back; in user and system messages every marker is plain text.
Every limit is a 400 with an OpenAI-style error body ({"error": {"message", "type", "param", "code"}});
a full queue is a 503 with Retry-After.
"""

import argparse
import asyncio
import errno
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from vibechat.checkpoint_manager import load_model
from vibechat.common import VibechatError, autocast_dtype, compute_init, nonnegative_int, positive_int, run_main
from vibechat.engine import ContinuousBatcher, Sequence

# nanochat's request limits, plus n and the model's context (checked per request)
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MAX_TOP_K = 200
MAX_NEW_TOKENS = 4_096
MAX_N = 8
DEFAULT_MAX_TOKENS = 512  # when a request names none (and the context has room)
DEFAULT_TOP_K = 50  # when a request samples (temperature > 0) and names none, as the chat CLI
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
SUPPORTED = {"model", "messages", "temperature", "top_k", "max_tokens", "max_completion_tokens", "n", "seed",
             "stop", "stream", "stream_options", "user"}
RETRY_AFTER_S = 1


# a calculator call as the server writes it into a reply, no marker inside it: any other marker is plain text
_NO_MARKER = r"((?:(?!<\|(?:python|output)_(?:start|end)\|>).)*)"
TOOL_CALL = re.compile(rf"<\|python_start\|>{_NO_MARKER}<\|python_end\|>"
                       rf"(?:<\|output_start\|>{_NO_MARKER}<\|output_end\|>)?", re.S)


class ApiError(Exception):
    """A request the server refuses: answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status in (429, 503) else None
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


@dataclass
class Completion:
    """A checked request: the prompt's tokens and how to sample it."""
    tokens: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    n: int
    seed: int
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default, low: float, high: float, integer: bool):
    value = body.get(name, default)
    if value is None:
        return default
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok or not (low <= value <= high):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{name} must be {kind} from {low} to {high}, not {value!r}", name, "invalid_value")
    return value


def assistant_parts(content: str) -> list[dict]:
    """An assistant message's text as the tokenizer's parts: each calculator call as the server writes it becomes
    a python part (and a python_output part), so it renders to the special tokens the model produced."""
    parts, end = [], 0
    for call in TOOL_CALL.finditer(content):
        parts.append({"type": "text", "text": content[end:call.start()]})
        parts.append({"type": "python", "text": call[1]})
        if call[2] is not None:
            parts.append({"type": "python_output", "text": call[2]})
        end = call.end()
    parts.append({"type": "text", "text": content[end:]})
    return [part for part in parts if part["text"] or part["type"] != "text"]


def parse_request(body, tokenizer, context: int) -> Completion:
    """Check a /v1/chat/completions body against every limit; the first violation is an ApiError naming it."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_body")
    unknown = sorted(set(body) - SUPPORTED)
    if unknown:
        raise ApiError(400, f"parameter {unknown[0]!r} is not supported by this server; supported: "
                       f"{', '.join(sorted(SUPPORTED))}", unknown[0], "unsupported_parameter")
    if body.get("stop") not in (None, []):  # null or [] is OpenAI's default, no stop sequences (lm-eval sends [])
        raise ApiError(400, f"stop sequences are not supported by this server, not {body['stop']!r}: leave stop out "
                       "(replies end at the model's end of turn)", "stop", "unsupported_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages", "invalid_value")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"at most {MAX_MESSAGES} messages, not {len(messages)}", "messages", "too_many_messages")
    total = 0
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str) or message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] must be {{role: system|user|assistant, content: str}}",
                           f"messages[{i}]", "invalid_value")
        if len(content) > MAX_MESSAGE_CHARS:
            raise ApiError(400, f"messages[{i}] has {len(content)} characters, more than the limit of "
                           f"{MAX_MESSAGE_CHARS}", f"messages[{i}].content", "message_too_long")
        total += len(content)
    if total > MAX_TOTAL_CHARS:
        raise ApiError(400, f"the messages have {total} characters in all, more than the limit of {MAX_TOTAL_CHARS}",
                       "messages", "messages_too_long")
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's: the model answers it", "messages", "invalid_value")
    messages = [{**m, "content": assistant_parts(m["content"])} if m["role"] == "assistant" else m
                for m in messages]
    try:
        tokens = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    except VibechatError as e:
        raise ApiError(400, str(e), "messages", "invalid_value") from None
    temperature = _number(body, "temperature", DEFAULT_TEMPERATURE, 0, 2, integer=False)
    top_k = _number(body, "top_k", DEFAULT_TOP_K, 1, MAX_TOP_K, integer=True)
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens", "invalid_value")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    room = context - len(tokens)
    if room < 1:
        raise ApiError(400, f"the conversation is {len(tokens)} tokens, which fills the model's context of "
                       f"{context}: shorten it", "messages", "context_length_exceeded")
    max_tokens = _number(body, name, None, 1, MAX_NEW_TOKENS, integer=True)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    elif max_tokens > room:
        raise ApiError(400, f"{name} {max_tokens} and the conversation's {len(tokens)} tokens exceed the model's "
                       f"context of {context}: ask for at most {room}", name, "context_length_exceeded")
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    seed = _number(body, "seed", 42, -2**63, 2**63 - 1 - MAX_N, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, not {stream!r}", "stream", "invalid_value")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "stream_options may only hold include_usage", "stream_options", "invalid_value")
    return Completion(tokens, max_tokens, temperature, top_k, n, seed, stream, bool(options.get("include_usage")))


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("vibechat_serve_requests", "sequences (a request's n choices) by finish reason, "
                                "and requests refused as invalid or overloaded", ["outcome"], registry=registry)
        self.prompt_tokens = Counter("vibechat_serve_prompt_tokens", "prompt tokens prefilled", registry=registry)
        self.generated_tokens = Counter("vibechat_serve_generated_tokens", "tokens generated", registry=registry)
        self.ttft = Histogram("vibechat_serve_time_to_first_token_seconds", "from the request to its first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=registry)
        self.itl = Histogram("vibechat_serve_inter_token_latency_seconds", "between two tokens of a sequence",
                             buckets=(.001, .0025, .005, .01, .02, .05, .1, .25, .5, 1), registry=registry)
        self.running = Gauge("vibechat_serve_running_requests", "sequences in the decode batch", registry=registry)
        self.waiting = Gauge("vibechat_serve_waiting_requests", "sequences queued for a row", registry=registry)
        self.occupancy = Gauge("vibechat_serve_batch_occupancy", "running sequences / rows of the decode batch "
                               "(--max-batch: every step decodes them all)", registry=registry)

    def watch(self, batcher: ContinuousBatcher) -> None:
        self.running.set_function(batcher.num_running)
        self.waiting.set_function(batcher.num_waiting)
        self.occupancy.set_function(lambda: batcher.num_running() / batcher.max_batch)


class Server:
    """The model, its batcher's thread and the metrics, shared by the request handlers."""

    def __init__(self, batcher: ContinuousBatcher, tokenizer, model_id: str, max_waiting: int):
        self.batcher, self.tokenizer, self.model_id = batcher, tokenizer, model_id
        self.max_waiting = max_waiting
        self.metrics = Metrics()
        self.metrics.watch(batcher)
        self.ready = False
        self.stop = threading.Event()

    def start(self) -> None:
        """Warm up (compile and capture the decode step on CUDA) and run the batcher, on a thread: /health
        answers meanwhile, /ready once warm."""
        def run() -> None:
            self.batcher.warmup()
            self.ready = True
            print(f"ready: serving {self.model_id}", flush=True)
            self.batcher.run(self.stop)

        threading.Thread(target=run, name="batcher", daemon=True).start()

    def submit(self, completion: Completion, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
               started: float) -> list[Sequence]:
        """Queue the completion's n sequences; their events arrive on `queue` as (index, token or None, reason)."""
        batcher, metrics = self.batcher, self.metrics
        if batcher.num_waiting() + completion.n > self.max_waiting:
            raise ApiError(503, f"the server is at capacity ({batcher.num_waiting()} requests waiting): retry "
                           f"after {RETRY_AFTER_S} s", None, "overloaded", kind="server_error")
        sequences = []
        for index in range(completion.n):
            last = [None]  # time of the sequence's previous token

            def on_token(token: int, mask: int, index=index, last=last) -> None:
                now = time.perf_counter()
                if last[0] is None:
                    metrics.ttft.observe(now - started)
                else:
                    metrics.itl.observe(now - last[0])
                last[0] = now
                metrics.generated_tokens.inc()
                loop.call_soon_threadsafe(queue.put_nowait, (index, token, None))

            def on_finish(reason: str, index=index) -> None:
                metrics.requests.labels(reason).inc()  # here, so a sequence whose client left counts too
                loop.call_soon_threadsafe(queue.put_nowait, (index, None, reason))

            sequences.append(Sequence(completion.tokens, completion.max_tokens, on_token, on_finish,
                                      completion.temperature, completion.top_k, completion.seed + index))
        for sequence in sequences:
            batcher.submit(sequence)
        metrics.prompt_tokens.inc(len(completion.tokens) * completion.n)
        return sequences


class Detokenizer:
    """A sequence's text as its tokens arrive: a multi-byte character split over tokens waits for its end."""

    def __init__(self, tokenizer, stop_tokens: set[int]):
        self.tokenizer, self.stop_tokens = tokenizer, stop_tokens
        self.pending: list[int] = []
        self.count = 0  # tokens of the reply, the stop token not counted

    def add(self, token: int) -> str:
        if token in self.stop_tokens:
            return self.flush()
        self.count += 1
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text, self.pending = self.tokenizer.decode(self.pending) if self.pending else "", []
        return text


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="vibechat", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        outcome = "overloaded" if error.status in (429, 503) else "invalid"
        server.metrics.requests.labels(outcome).inc()
        return error.response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if server.ready:
            return JSONResponse({"status": "ready", "model": server.model_id})
        return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": 0,
                                            "owned_by": "vibechat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if not server.ready:
            raise ApiError(503, "the model is still warming up: retry shortly (GET /ready says when)", None,
                           "not_ready", kind="server_error")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        batcher = server.batcher
        completion = parse_request(body, server.tokenizer, batcher.model.config.sequence_len)
        if isinstance(body, dict) and body.get("model") not in (None, server.model_id, server.model_id.split("/")[1]):
            raise ApiError(404, f"model {body['model']!r} is not served here: use {server.model_id!r} (GET /v1/models)",
                           "model", "model_not_found")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        started = time.perf_counter()
        sequences = server.submit(completion, loop, queue, started)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_id}
        stop_tokens = batcher.engine.stop_tokens
        texts = [Detokenizer(server.tokenizer, stop_tokens) for _ in sequences]

        def usage() -> dict:
            completion_tokens = sum(t.count for t in texts)
            prompt_tokens = len(completion.tokens) * completion.n
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        def cancel() -> None:
            for sequence in sequences:
                sequence.cancelled = True
            batcher.wake.set()

        if completion.stream:
            async def events():
                def chunk(choices: list, **extra) -> str:
                    return "data: " + json.dumps({**meta, "object": "chat.completion.chunk", "choices": choices,
                                                  **extra}) + "\n\n"

                try:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                                 for i in range(completion.n)])
                    open_count = completion.n
                    while open_count:
                        index, token, reason = await queue.get()
                        if token is not None:
                            text = texts[index].add(token)
                            if text:
                                yield chunk([{"index": index, "delta": {"content": text}, "finish_reason": None}])
                            continue
                        open_count -= 1
                        tail = texts[index].flush()
                        if reason == "error":
                            error = {"message": "generation failed on the server", "type": "server_error"}
                            yield "data: " + json.dumps({"error": error}) + "\n\n"
                            return
                        yield chunk([{"index": index, "delta": {"content": tail} if tail else {},
                                      "finish_reason": reason}])
                    if completion.include_usage:
                        yield chunk([], usage=usage())
                    yield "data: [DONE]\n\n"
                finally:  # the client went away (or all is sent): its rows free at the next step
                    cancel()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        replies, reasons = [""] * completion.n, [None] * completion.n
        try:
            while None in reasons:
                try:
                    index, token, reason = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if token is not None:
                    replies[index] += texts[index].add(token)
                else:
                    replies[index] += texts[index].flush()
                    reasons[index] = reason
        finally:
            cancel()
        if "error" in reasons:
            raise ApiError(500, "generation failed on the server (see its log)", None, "internal_error",
                           kind="server_error")
        choices = [{"index": i, "message": {"role": "assistant", "content": replies[i]}, "finish_reason": reasons[i]}
                   for i in range(completion.n)]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage()}

    return app


def only_metrics_on(app: ASGIApp, port: int) -> ASGIApp:
    """`app` on every listener but the one on `port` (the --metrics-port), which gets GET /metrics and a 404 for
    all else: one uvicorn server on two sockets, and the API stays closed where Prometheus may connect."""
    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        local = scope.get("server")  # the address the connection came in on; lifespan events have none
        if local and local[1] == port and scope["path"] != "/metrics":
            response = PlainTextResponse(f"only /metrics is served on port {port}\n", status_code=404)
            return await response(scope, receive, send)
        await app(scope, receive, send)

    return route


def bind(host: str, port: int, option: str = "--port") -> socket.socket:
    """The listening address, bound before the model loads: an unresolvable --host or a taken port fails at once,
    not after "ready"; uvicorn serves on this socket, so nothing can take the port in between. `option` names the
    port in the error (--port or --metrics-port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise VibechatError(f"--host {host!r} does not resolve ({e.strerror}): give a local address or name, e.g. "
                            "127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port at once
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise VibechatError(f"{option} {port} is in use on {host}: pick another port or stop what listens "
                                "on it") from None
        raise VibechatError(f"cannot listen on --host {host!r} {option} {port} ({e.strerror}): give an address "
                            "of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    return sock


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.chat_server",
                                     description="Serve a vibechat checkpoint over an OpenAI-compatible HTTP API.")
    parser.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"],
                        help="which phase's checkpoint to serve (default: sft)")
    parser.add_argument("--run", default=os.environ.get("VIBECHAT_RUN"), help="run id (default: $VIBECHAT_RUN)")
    parser.add_argument("--store", default=None, help="store URL (default: $VIBECHAT_STORE or ~/.cache/vibechat)")
    parser.add_argument("--step", type=nonnegative_int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--model-tag", default=None, help="model to load, e.g. d20 (default: the largest)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="also serve GET /metrics, and nothing else, on this port of --host, so a network "
                             "policy can open it to Prometheus without opening the API (default: none; /metrics "
                             "is on --port either way)")
    parser.add_argument("--max-batch", type=positive_int, default=32, help="rows of the decode batch (default: 32)")
    parser.add_argument("--max-waiting", type=positive_int, default=256,
                        help="sequences queued for a row before requests get 503 (default: 256)")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu", "mps"],
                        help="where to run (default: the best available)")
    args = parser.parse_args(argv)
    for option, port in (("--port", args.port), ("--metrics-port", args.metrics_port)):
        if port is not None and not 0 <= port <= 65535:
            parser.error(f"{option} {port} is not a port: use 0-65535")
    if args.metrics_port == args.port != 0:  # both bind (SO_REUSEADDR), then the second listen fails after loading
        parser.error(f"--metrics-port {args.port} is --port too: give the metrics another port")
    if args.store and not args.run:  # without a run the checkpoints are read from $VIBECHAT_BASE_DIR or ~/.cache
        parser.error("--store needs --run (or $VIBECHAT_RUN): the run in the store whose checkpoint to serve")
    return args


def main() -> None:
    args = parse_args()
    if args.store:
        os.environ["VIBECHAT_STORE"] = args.store
    if args.run:
        os.environ["VIBECHAT_RUN"] = args.run
    sockets = [bind(args.host, args.port)]
    if args.metrics_port is not None:
        sockets.append(bind(args.host, args.metrics_port, "--metrics-port"))
    _, _, _, _, device = compute_init(args.device)
    model, tokenizer, meta = load_model(args.source, device, "eval", model_tag=args.model_tag, step=args.step)
    model.to(dtype=autocast_dtype(device))  # bf16 weights on GPU: decoding reads every weight once per token
    batcher = ContinuousBatcher(model, tokenizer, max_batch=args.max_batch, max_top_k=MAX_TOP_K)
    model_id = f"{args.run or 'default'}/{args.source}/{meta.get('step', args.step)}"  # run/source/step
    server = Server(batcher, tokenizer, model_id, args.max_waiting)
    server.start()
    app = create_app(server)
    if args.metrics_port is not None:
        app = only_metrics_on(app, sockets[1].getsockname()[1])
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=sockets)
    server.stop.set()


if __name__ == "__main__":
    run_main(main)
