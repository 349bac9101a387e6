"""The HTTP side: Starlette routes over the Engine, served by uvicorn.

Requests are checked (protocol.py) and tokenized off the event loop, then queued on the engine;
the loop only moves bytes, so /health answers while a long prompt is prefilled. A request whose
client goes away is cancelled: a streaming one when its stream is torn down, a non-streaming one
by watching the connection while it waits.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import signal
import socket
import sys
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, Job
from .protocol import APIError, GenRequest, Reply, chat_request, completion_request, parse_json, sse

KEEPALIVE_S = 5.0  # an SSE comment while a request waits in the queue or prefills


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _body(request: Request, limit: int) -> bytes:
    """The body, refused (413) by its Content-Length or once more than `limit` bytes arrived."""
    too_big = APIError(413, f"the request body is larger than {limit:,} bytes", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_big if length.isdigit() else APIError(400, "invalid Content-Length")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Server:
    def __init__(self, engine: Engine, api_key: Optional[str] = None, max_body_bytes: int = 16 * 2**20):
        self.engine, self.api_key, self.max_body_bytes = engine, api_key, max_body_bytes
        routes = [Route("/health", self.health), Route("/v1/models", self.models),
                  Route("/v1/models/{model:path}", self.model), Route("/v1/sessions", self.sessions),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error,
                                                                APIError: self._api_error})

    # -- plumbing ----------------------------------------------------------------
    async def _http_error(self, request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    async def _api_error(self, request, exc: APIError):
        return _error(exc)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _check_model(self, req: GenRequest) -> None:
        e = self.engine
        if req.model is not None and req.model not in (e.model_id, e.model_arg):
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{e.model_id}'.",
                           "model", "model_not_found")

    def _model_card(self) -> dict:
        return {"id": self.engine.model_id, "object": "model", "created": 0, "owned_by": "kimi_mlx",
                "context_length": self.engine.context_length}

    # -- routes --------------------------------------------------------------------
    async def health(self, request: Request):
        e = self.engine
        return JSONResponse({"status": "ok", "model": e.model_id, "context_length": e.context_length,
                             **e.status()})

    async def models(self, request: Request):
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request):
        self._authorize(request)
        name = request.path_params["model"]
        self._check_model(GenRequest("chat", name))
        return JSONResponse(self._model_card())

    async def sessions(self, request: Request):
        self._authorize(request)
        return JSONResponse({"object": "list", "data": self.engine.session_info})

    async def chat(self, request: Request):
        return await self._generate(request, chat_request)

    async def completions(self, request: Request):
        return await self._generate(request, completion_request)

    async def _generate(self, request: Request, parse) -> Response:
        from starlette.concurrency import run_in_threadpool

        from ..sampling import make_logits_processors, make_sampler

        self._authorize(request)
        req = parse(parse_json(await _body(request, self.max_body_bytes)))
        self._check_model(req)
        s = req.sampling
        try:  # the sampler's own checks, before the request waits in the queue
            make_sampler(s["temp"], s["top_p"], s["top_k"], s["min_p"], s["seed"])
            make_logits_processors(s["repetition_penalty"], logit_bias=s["logit_bias"])
        except ValueError as err:
            raise APIError(400, str(err)) from None
        ids, starts = await run_in_threadpool(self.engine.prompt, req)  # tokenizing a long prompt takes a while
        job = Job(ids, starts, self.engine.max_tokens(req, len(ids)), s, req.stop, asyncio.get_running_loop())
        self.engine.submit(job)
        reply = Reply(req, self.engine.model_id)
        if req.stream:
            return StreamingResponse(self._stream(job, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, job, reply)

    async def _events(self, job: Job, gone: Optional[asyncio.Future] = None):
        """The job's events; None every KEEPALIVE_S while nothing happens. Ends early when `gone` (the
        client went away) is done; leaving early, for whatever reason, cancels the job."""
        try:
            while True:
                get = asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({get, gone} if gone else {get}, timeout=KEEPALIVE_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if gone is not None and gone.done():
                        return
                    yield None
                    continue
                ev = get.result()
                yield ev
                if ev[0] in ("done", "error", "cancelled"):
                    return
        finally:
            job.cancel.set()  # a no-op once the job ended; otherwise the client went away

    async def _stream(self, job: Job, reply: Reply):
        first = True
        async for ev in self._events(job):
            if ev is None:
                yield b": waiting\n\n"
            elif ev[0] == "delta":
                yield sse(reply.chunk(ev[1], first=first))
                first = False
            elif ev[0] == "done":
                _, finish, use, timings = ev
                if first:
                    yield sse(reply.chunk("", first=True))
                yield sse(reply.chunk(None, finish))
                if reply.req.include_usage:
                    yield sse(reply.usage_chunk(use, timings))
                yield sse(b"[DONE]")
            elif ev[0] == "error":
                yield sse(ev[1].body())
                yield sse(b"[DONE]")

    async def _whole(self, request: Request, job: Job, reply: Reply) -> Response:
        gone = asyncio.ensure_future(_until_disconnect(request))
        text = []
        try:
            async for ev in self._events(job, gone):
                if ev is None or ev[0] == "start":
                    continue
                if ev[0] == "delta":
                    text.append(ev[1])
                elif ev[0] == "done":
                    _, finish, use, timings = ev
                    return JSONResponse(reply.whole("".join(text), finish, use, timings))
                elif ev[0] == "error":
                    return _error(ev[1])
            return Response(status_code=499)  # the client went away: nobody reads this
        finally:
            gone.cancel()


# -- command line -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from ..runtime.model import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m kimi_mlx.server",
                                description="An OpenAI-compatible HTTP server for Kimi Linear (MLX).")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"local model directory or Hugging Face repo id "
                                                          f"(default: {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: none)")
    p.add_argument("--session", action="append", default=[], metavar="FILE",
                   help="a saved document session to keep as a prefix (repeatable; see kimi_mlx.generate "
                        "--save-session)")
    p.add_argument("--prefix-cache-mb", type=float, default=None,
                   help="memory for kept prompt states, least recently used out first (default: "
                        "KIMI_MLX_CHECKPOINT_MB, 2048); 0 keeps none")
    p.add_argument("--max-tokens", type=int, default=2048,
                   help="reply length when a request gives none (default 2048)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body (default 16)")
    p.add_argument("--prefill-step-size", type=int, default=2048, help="prefill chunk size in tokens (default 2048)")
    p.add_argument("--split", metavar="N,N,...", help="under mlx.launch: decoder layers per rank (default: by each "
                   "rank's memory; see docs/DISTRIBUTED.md)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    return p


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(server: Server, host: str, port: int, log_level: str = "warning", ready=None) -> None:
    """Serve until interrupted. ready(port): called once listening (port 0 picks a free one)."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(server.app, log_level=log_level, timeout_graceful_shutdown=2)
    userver = uvicorn.Server(config)

    async def run():
        task = asyncio.create_task(userver.serve(sockets=[sock]))
        while not userver.started and not task.done():
            await asyncio.sleep(0.02)
        if userver.started and ready is not None:
            ready(sock.getsockname()[1])
        await task

    asyncio.run(run())


def main(argv=None) -> int:
    from .. import distributed
    from ..distributed.link import PipelineError
    from ..runtime.model import ModelLoadError

    args = build_parser().parse_args(argv)
    if args.split and not distributed.launched():
        build_parser().error("--split splits the layers between the ranks of mlx.launch; run under it")
    for name in ("max_tokens", "prefill_step_size"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be >= 1")
    if not _is_loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    cache = None if args.prefix_cache_mb is None else int(max(args.prefix_cache_mb, 0) * 2**20)
    try:  # under mlx.launch: rank 0 serves a pipelined model, the other ranks hold their layers
        pipe = distributed.start(args.split)
        if pipe is not None and not pipe.leader:
            pipe.load(args.model)
            return pipe.follow()
    except (ModelLoadError, ValueError, OSError, PipelineError) as e:
        if not getattr(e, "quiet", False):
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    engine = Engine(args.model, loader=pipe.load if pipe is not None else None, cache_bytes=cache,
                    sessions=args.session, prefill_step=args.prefill_step_size, default_max_tokens=args.max_tokens)
    try:
        return _serve(args, engine)
    finally:
        if pipe is not None:
            pipe.close()


def _serve(args, engine) -> int:
    from ..distributed.link import PipelineError
    from ..runtime.model import ModelLoadError
    from ..session import SessionError

    try:
        engine.start()
    except (ModelLoadError, SessionError, ValueError, OSError, PipelineError) as e:  # config/weights/tokenizer errors
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        engine.close()
        return 1
    server = Server(engine, api_key=args.api_key, max_body_bytes=int(args.max_body_mb * 2**20))

    def ready(port: int) -> None:
        url = f"http://{args.host if ':' not in args.host else f'[{args.host}]'}:{port}"
        print(f"kimi_mlx server: {engine.model_id} on {url}/v1 "
              f"(context {engine.context_length or '?'} tokens)", flush=True)

    def interrupted(signum, frame):  # uvicorn raises the signal again once it has shut down
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        serve(server, args.host, args.port, args.log_level, ready)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port} ({e.strerror or e})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
    return 0
