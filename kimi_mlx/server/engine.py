"""The server's model side: one MLX thread, a FIFO queue of jobs, and the prefix cache.

The prefix cache is the runtime's CheckpointStore (states found again by token prefix, LRU
bounded in bytes). A KDA state can't be rewound, so a state is only useful at the exact length a
later prompt shares; besides the state after each prompt and after each reply (what a follow-up
turn continues), a job keeps states on the way at:
  - where each message's content begins (a shared system prompt, earlier turns, a document
    message followed by different questions);
  - where its prompt departs from the longest kept one (two completions of the same long text
    with different endings: the third continues from there).
Saved document sessions (`--session`) are held apart from the LRU bound and continue every
prompt that starts with their tokens.

Everything that touches MLX or the store runs on the MLX thread; the event loop gets plain Python
values through its queue (`Job.events`) and reads `status()`, a dict the thread replaces.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..runtime.mlx_thread import MLXThread
from .protocol import APIError, GenRequest, usage

KEEP_GAP = 512  # tokens a state kept on the way must add over the one before it (each costs a KDA state)
KEEP_MAX = 4  # states kept on the way per prompt (the last ones)
REPLY_IDS = 1024  # replies whose sampled token ids are remembered (their text re-encodes differently)

Loader = Callable[[str], tuple]  # path or repo id -> (model, tokenizer); runtime.load by default


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class StopMatcher:
    """Text as it streams, cut before the first stop string; text that may begin one is held back."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.held, self.hit = list(stops), "", False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        buf = self.held + text
        at = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if at >= 0:
            self.held, self.hit = "", True
            return buf[:at]
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass(eq=False)
class Job:
    """One queued generation. `events` gets ("start", info), ("delta", text), then one of ("done", finish,
    usage, timings), ("error", APIError) or ("cancelled",), each put there from the MLX thread."""

    ids: list
    starts: list  # where message contents begin (chat), candidate states to keep
    max_tokens: int
    sampling: dict
    stop: list
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    seq: int = 0
    ahead: int = 0  # jobs queued or running when it arrived
    started: int = 0  # its place in the order jobs started in
    queued_at: float = 0.0

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutting down)
            self.cancel.set()


class Engine:
    """The model, its tokenizer, the prefix cache and the job queue (one generation at a time, FIFO).

    loader: the one function that gives the model the server drives (see kimi_mlx.server)."""

    def __init__(self, model: str, loader: Optional[Loader] = None, cache_bytes: Optional[int] = None,
                 sessions: Sequence[str] = (), prefill_step: int = 2048, default_max_tokens: int = 2048):
        from ..settings import settings

        self.model_arg = model
        self.model_id = model if not Path(model).expanduser().exists() else Path(model.rstrip("/")).name
        self._loader = loader
        self.cache_bytes = settings().checkpoint_bytes if cache_bytes is None else int(cache_bytes)
        self.session_paths = list(sessions)
        self.prefill_step, self.default_max_tokens = prefill_step, default_max_tokens
        self.model = self.tokenizer = self.prompts = self.store = None
        self.sessions: list = []  # (path, DocumentSession)
        self.session_info: list = []  # what /v1/sessions lists
        self.context_length: Optional[int] = None
        self._mlx: Optional[MLXThread] = None
        self._seq = itertools.count(1)  # arrival order
        self._starts = itertools.count(1)  # start order (first come first served: the same order)
        self._lock = threading.Lock()  # the counters and the remembered reply ids
        self._waiting = 0
        self._running: Optional[dict] = None
        self._counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self._cache_status: dict = {}
        self._reply_ids: "OrderedDict[str, tuple]" = OrderedDict()

    # -- life ----------------------------------------------------------------
    def start(self) -> "Engine":
        """Load the model and the sessions on the MLX thread (errors are raised here)."""
        from ..runtime import CheckpointStore, PromptBuilder

        self._mlx = MLXThread()
        self.model, self.tokenizer = self._mlx.call(lambda: (self._loader or _runtime_load)(self.model_arg))
        self.prompts = PromptBuilder(self.tokenizer)
        self.store = CheckpointStore(self.cache_bytes)
        cfg = getattr(self.model, "config", None)
        self.context_length = getattr(cfg, "model_max_length", None) or None
        for path in self.session_paths:
            self.sessions.append((str(path), self._mlx.call(lambda p=path: self._load_session(p))))
        self.session_info = [self._describe(path, s) for path, s in self.sessions]
        self._mlx.call(self._publish)
        return self

    def _load_session(self, path):
        from ..session import DocumentSession

        sess = DocumentSession.load(path, self.model, self.tokenizer)
        self.store.held_elsewhere(f"session:{path}", sess.cache)  # kept anyway: not in the LRU bound
        return sess

    def close(self) -> None:
        if self._mlx is not None:
            self._mlx.close()
            self._mlx = None

    # -- prompts (any thread) --------------------------------------------------
    def _chat_ids(self, messages, starts: list) -> list[int]:
        from ..runtime import Message

        with self._lock:
            msgs = [Message(r, c, self._reply_ids.get(c) if r == "assistant" else None) for r, c in messages]
        return self.prompts.chat(msgs, starts=starts)

    def prompt(self, req: GenRequest) -> tuple[list[int], list[int]]:
        """(token ids, where message contents begin) of a request; APIError when it doesn't fit."""
        starts: list = []
        if req.kind == "chat":
            ids = self._chat_ids(req.messages, starts)
        elif isinstance(req.prompt, str):
            ids = list(self.tokenizer.encode(req.prompt, allow_special=True))  # raw text: a template by hand
        else:
            ids = req.prompt
            if any(not 0 <= t < self.tokenizer.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {self.tokenizer.vocab_size})", "prompt")
        bias = req.sampling.get("logit_bias") or {}
        if any(t >= self.tokenizer.vocab_size for t in bias):
            raise APIError(400, f"logit_bias token ids must be below {self.tokenizer.vocab_size}", "logit_bias")
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt" if req.kind == "completion" else "messages")
        limit = self.context_length
        if limit and len(ids) >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your "
                                f"{'messages' if req.kind == 'chat' else 'prompt'} resulted in {len(ids)} tokens "
                                f"(at least one more is needed for the reply).", "messages" if req.kind == "chat"
                           else "prompt", "context_length_exceeded")
        return ids, starts

    def max_tokens(self, req: GenRequest, n_prompt: int) -> int:
        room = (self.context_length - n_prompt) if self.context_length else None
        want = req.max_tokens if req.max_tokens is not None else self.default_max_tokens
        return max(1, min(want, room) if room is not None else want)

    def _describe(self, path: str, sess) -> dict:
        """A session: its tokens, and the text a first user message must begin with to continue it (None when
        it was made with a system prompt)."""
        starts: list = []
        before = self._chat_ids([("user", "")], starts)[:starts[0]]
        n, tokens = len(before), list(sess.tokens)
        text = self.tokenizer.decode(tokens[n:]) if tokens[:n] == before else None
        return {"id": Path(path).name, "path": path, "tokens": sess.num_tokens, "user_text_prefix": text}

    # -- queue (event loop) ------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._lock:
            job.seq, job.queued_at = next(self._seq), time.perf_counter()
            job.ahead = self._waiting + (self._running is not None)
            self._waiting += 1
        self._mlx.submit(lambda: self._run(job))

    def status(self) -> dict:
        with self._lock:
            return {"waiting": self._waiting, "running": self._running, "requests": dict(self._counts),
                    "prefix_cache": self._cache_status}

    # -- the MLX thread ----------------------------------------------------------
    def _publish(self) -> None:
        s = self.store
        self._cache_status = {"bytes": s.nbytes, "max_bytes": s.max_bytes, "states": len(s), "evicted": s.evicted,
                              "session_tokens": sum(x.num_tokens for _, x in self.sessions)}

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    def _documents(self, ids: np.ndarray):
        """The longest session whose tokens start `ids`."""
        fits = [s for _, s in self.sessions if s.num_tokens < ids.size and np.array_equal(ids[:s.num_tokens],
                                                                                         s.tokens)]
        return max(fits, key=lambda s: s.num_tokens, default=None)

    def _keep_points(self, ids: np.ndarray, starts: list, docs) -> list[int]:
        """Prompt lengths to keep states at on the way (see the module docstring)."""
        best = self.store.best(ids)
        have = max(best.num_tokens if best is not None else 0, docs.num_tokens if docs is not None else 0)
        split = max((_lcp(ids, c.ids) for c in self.store), default=0)
        points, last = [], have
        for k in sorted(set(starts) | {split}):
            if k - last >= KEEP_GAP and k < ids.size:
                points.append(k)
                last = k
        return points[-KEEP_MAX:]

    def _set_running(self, job: Job, **kw) -> None:
        with self._lock:
            self._running = {"seq": job.seq, **kw}

    def _run(self, job: Job) -> None:
        from ..session import PrefillCancelled

        with self._lock:
            self._waiting -= 1
        if job.cancel.is_set() or self._mlx.closing.is_set():
            self._count("cancelled")
            job.emit("cancelled")
            return
        started, job.started = time.perf_counter(), next(self._starts)
        self._set_running(job, phase="prefill", done=0, total=len(job.ids))
        try:
            self._generate(job, self._mlx.should_stop(job.cancel), started)
        except PrefillCancelled:
            self._count("cancelled")
            job.emit("cancelled")
        except ValueError as e:  # the runtime's checks (context, sampling)
            self._count("failed")
            job.emit("error", APIError(400, str(e)))
        except Exception as e:  # noqa: BLE001  a bug or out of memory: the server goes on
            self._count("failed")
            job.emit("error", APIError(500, f"{type(e).__name__}: {e}"))
        finally:
            with self._lock:
                self._running = None
            self._publish()

    def _generate(self, job: Job, stop, started: float):
        from ..runtime import Conversation

        ids = np.asarray(job.ids, dtype=np.int32)
        docs = self._documents(ids)
        keep = self._keep_points(ids, job.starts, docs)
        conv = Conversation(self.model, self.tokenizer, documents=docs, store=self.store, key="server",
                            prefill_step=self.prefill_step)

        def progress(done, total, tps, eta):
            self._set_running(job, phase="prefill", done=int(done), total=int(total))

        matcher = StopMatcher(job.stop)
        t_first, r, n_fed = None, None, 0
        replies = conv.reply(ids=job.ids, keep_at=keep, progress=progress, should_stop=stop,
                             max_tokens=job.max_tokens, **job.sampling)
        try:
            for r in replies:
                if t_first is None:
                    t_first = time.perf_counter()
                    job.emit("start", {"cached_tokens": r.cached_tokens})
                    self._set_running(job, phase="generate", tokens=0)
                n_fed = r.generation_tokens
                text = matcher.feed(r.text)
                if text:
                    job.emit("delta", text)
                if matcher.hit:
                    break
                if r.generation_tokens % 16 == 0:
                    self._set_running(job, phase="generate", tokens=r.generation_tokens)
        finally:
            replies.close()  # the states after the prompt and the reply are kept now
        if r is None:
            return
        if r.finish_reason == "cancelled":
            self._count("cancelled")
            job.emit("cancelled")
            return
        finish = "stop" if matcher.hit or r.finish_reason == "stop" else "length"
        if not matcher.hit:
            tail = matcher.flush()
            if tail:
                job.emit("delta", tail)
            self._remember_reply(conv)
        n_out = n_fed - (r.finish_reason == "stop" and not matcher.hit)
        end = time.perf_counter()
        timings = {"seq": job.seq, "started": job.started, "queue_position": job.ahead,
                   "queue_ms": (started - job.queued_at) * 1e3, "prompt_ms": (t_first - started) * 1e3,
                   "generation_ms": (end - t_first) * 1e3, "prefilled_tokens": len(job.ids) - r.cached_tokens}
        self._count("completed")
        job.emit("done", finish, usage(len(job.ids), n_out, r.cached_tokens), timings)

    def _remember_reply(self, conv) -> None:
        """The reply's sampled ids, so a follow-up that sends its text back continues the state after it."""
        m = conv.messages[-1] if conv.messages and conv.messages[-1].role == "assistant" else None
        if m is None or not m.ids:
            return
        with self._lock:
            self._reply_ids[m.content] = tuple(m.ids)
            self._reply_ids.move_to_end(m.content)
            while len(self._reply_ids) > REPLY_IDS:
                self._reply_ids.popitem(last=False)


def _runtime_load(path: str):
    from ..runtime import load

    return load(path)
