"""The engine interface the chat app talks to, a scripted fake, and the kimi_mlx adapter.

The TUI only ever sees :class:`Engine`.  ``FakeEngine`` implements it with small
sleeps so the app can be tested headlessly; ``KimiEngine`` is a thin adapter over
``kimi_mlx`` (imported lazily, so ``import tui`` works without mlx or a model).

Threading contract: the app calls ``load``, ``prefill_documents``,
``open_documents`` and iterates ``stream_reply`` from worker threads, never from
the UI thread, and never two of them at once.  Cancellation is cooperative via a
``threading.Event`` the engine polls between tokens / prefill chunks.
"""
from __future__ import annotations

import json
import math
import os
import queue
import re
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, runtime_checkable

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_SYSTEM_PROMPT",
    "DOC_RESERVE_TOKENS",
    "ChatMessage",
    "Delta",
    "DocumentInfo",
    "DocumentSource",
    "DocumentTooLargeError",
    "Engine",
    "EngineError",
    "EngineStats",
    "FakeEngine",
    "KimiEngine",
    "ModelLoadError",
    "ModelNotFoundError",
    "PrefillCancelled",
    "PrefillProgress",
    "SamplingSettings",
    "SessionUnavailableError",
    "conversation_ids",
    "resolve_model_path",
]

DEFAULT_MODEL = "moonshotai/Kimi-Linear-48B-A3B-Instruct"
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
# Room kept free after the documents so a question and a reply still fit.
DOC_RESERVE_TOKENS = 1024


# ---------------------------------------------------------------------------
# data passed across the interface
# ---------------------------------------------------------------------------


@dataclass
class SamplingSettings:
    """Per-chat sampling settings (persisted as JSON with the chat)."""

    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    max_tokens: int = 4096
    seed: Optional[int] = None

    # name -> (type, check, what is allowed); the one place settings are validated
    LIMITS = {
        "temperature": (float, lambda v: 0 <= v <= 100, "a number from 0 to 100 (0 = greedy)"),
        "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "top_k": (int, lambda v: v >= 0, "a whole number ≥ 0 (0 = off)"),
        "min_p": (float, lambda v: 0 <= v < 1, "a number in [0, 1) (0 = off)"),
        "max_tokens": (int, lambda v: 1 <= v <= 1_048_576, "a whole number from 1 to 1,048,576"),
        "seed": (int, lambda v: 0 <= v < 2**63, "a whole number ≥ 0, or empty / none for random"),
    }

    @classmethod
    def parse(cls, name: str, raw: str):
        """``raw`` typed by the user as the value of ``name``; ValueError says what is allowed."""
        typ, ok, allowed = cls.LIMITS[name]
        raw = raw.strip()
        if name == "seed" and raw.lower() in ("", "none", "random", "-"):
            return None
        try:
            value = typ(raw)
        except ValueError:
            value = None
        if value is None or (typ is float and not math.isfinite(value)) or not ok(value):
            raise ValueError(f"{name} must be {allowed}, not {raw!r}")
        return value

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SamplingSettings":
        # Tolerate keys from newer/older releases instead of failing to open a chat.
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str

    def as_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


@dataclass
class Delta:
    """One step of a streamed reply (mirrors kimi_mlx's GenerationResponse)."""

    text: str = ""
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    # Tokens in the context after this step: documents + prompt + generated.
    context_tokens: int = 0
    finish_reason: Optional[str] = None  # None | "stop" | "length" | "cancelled"


@dataclass
class EngineStats:
    model_name: str = ""
    max_context: int = 0
    context_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0


@dataclass(frozen=True)
class PrefillProgress:
    stage: str  # "reading" | "prefill" | "saving"
    done: int
    total: int
    # The engine's estimate (kimi_mlx.session's ProgressFn), when it has one.
    tokens_per_s: float = 0.0
    eta_s: Optional[float] = None


@dataclass(frozen=True)
class DocumentSource:
    """One thing the user attached (a file or a directory), shown as one chip."""

    path: str  # absolute path as attached
    label: str  # short display name
    tokens: int
    files: int = 1
    kind: str = "file"  # "file" | "dir"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DocumentSource":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class DocumentInfo:
    """The documents of one chat and where their prefilled snapshot lives."""

    sources: list = field(default_factory=list)  # list[DocumentSource]
    token_count: int = 0
    session_path: str = ""
    warnings: list = field(default_factory=list)  # list[str]
    # The system prompt is part of the document prefix: a different one needs a new prefill.
    system_prompt: str = ""
    # Engine-specific in-memory session (never persisted); None until opened.
    handle: Any = None


class EngineError(Exception):
    """Anything the user should be told about; the message is shown as is."""


class ModelNotFoundError(EngineError):
    # What is wrong, for the advice shown: "no_path" | "not_model_dir" | "not_downloaded"
    def __init__(self, message: str, kind: str = "no_path"):
        super().__init__(message)
        self.kind = kind


class ModelLoadError(EngineError):
    pass


class SessionUnavailableError(EngineError):
    """A saved document session is missing or stale; prefill again."""


class PrefillCancelled(EngineError):
    def __init__(self, done: int, total: int):
        self.done, self.total = done, total
        super().__init__(f"Prefill cancelled at {done:,} / {total:,} tokens; documents not attached.")


class DocumentTooLargeError(EngineError):
    def __init__(self, tokens: int, max_context: int, reserve: int = DOC_RESERVE_TOKENS, what: str = "The documents"):
        self.tokens, self.max_context, self.reserve = tokens, max_context, reserve
        super().__init__(
            f"{what} are {tokens:,} tokens, but the model's context holds {max_context:,} "
            f"({reserve:,} of them kept free for the conversation, so at most "
            f"{max(0, max_context - reserve):,} for documents)."
        )


ProgressFn = Callable[[PrefillProgress], None]


@runtime_checkable
class Engine(Protocol):
    model_name: str
    max_context: int
    stats: EngineStats

    def load(self) -> None:
        """Load the model. Raises ModelNotFoundError / ModelLoadError."""

    def count_tokens(self, text: str) -> int: ...

    def prefill_documents(
        self,
        paths: Sequence[str],
        session_path: str,
        progress: ProgressFn,
        cancel: threading.Event,
        system_prompt: str = "",
    ) -> DocumentInfo:
        """Read ``paths``, prefill them (after ``system_prompt``) and save the
        snapshot at ``session_path``.

        Raises EngineError (unreadable input), DocumentTooLargeError,
        PrefillCancelled.  On failure any previous file at ``session_path`` is
        left untouched.
        """

    def open_documents(self, info: DocumentInfo) -> DocumentInfo:
        """Load the snapshot saved at ``info.session_path``; returns ``info`` with
        ``handle`` set.  Raises SessionUnavailableError if it can't be used."""

    def close(self) -> None:
        """The app is quitting: make blocked calls return soon (no cleanup needed)."""

    def stream_reply(
        self,
        messages: Sequence[ChatMessage],
        settings: SamplingSettings,
        documents: Optional[DocumentInfo],
        cancel: threading.Event,
    ) -> Iterator[Delta]:
        """Stream the assistant's reply to ``messages`` (system prompt first).

        With ``documents`` (opened), the reply continues from their snapshot,
        whose system prompt must be the one in ``messages``.
        Stops promptly once ``cancel`` is set.  The last Delta has a finish_reason.
        """


def short_label(path: str) -> str:
    p = Path(path)
    name = p.name or str(p)
    return name + "/" if p.is_dir() else name


def write_atomic(path: str, data: str) -> None:
    # Write-then-rename so a crash or cancel never leaves a half-written file.
    tmp = f"{path}.tmp-{os.getpid()}"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# FakeEngine: scripted, deterministic, used by the tests and --fake-engine
# ---------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\s*\S+|\s+")


class FakeEngine:
    """Implements :class:`Engine` without a model.

    Replies are deterministic Markdown (with a code block) streamed one
    word-ish token at a time with ``token_delay`` seconds between tokens.
    A user message containing ``[[error]]`` makes the reply fail half-way;
    ``[[long]]`` makes it long (for cancel tests).
    """

    def __init__(
        self,
        model_name: str = "fake-kimi",
        max_context: int = 32_768,
        token_delay: float = 0.002,
        prefill_step: int = 64,
        prefill_delay: float = 0.002,
        load_delay: float = 0.0,
        missing: bool = False,
        fail_load: Optional[str] = None,
        reply: Optional[Callable[[Sequence[ChatMessage], Optional[DocumentInfo]], str]] = None,
    ):
        self.model_name = model_name
        self.max_context = max_context
        self.token_delay = token_delay
        self.prefill_step = prefill_step
        self.prefill_delay = prefill_delay
        self.load_delay = load_delay
        self.missing = missing
        self.fail_load = fail_load
        self._reply = reply
        self.stats = EngineStats(model_name=model_name, max_context=max_context)
        self.loaded = False
        self.prefill_count = 0
        self.open_count = 0
        self.reply_count = 0
        self.last_messages: list = []
        self.last_settings: Optional[SamplingSettings] = None
        self.closed = False

    def load(self) -> None:
        if self.load_delay:
            time.sleep(self.load_delay)
        if self.missing:
            raise ModelNotFoundError(f"No model found at {self.model_name!r}.")
        if self.fail_load:
            raise ModelLoadError(self.fail_load)
        self.loaded = True

    def close(self) -> None:
        self.closed = True

    def count_tokens(self, text: str) -> int:
        # About one token per word or punctuation run: cheap and deterministic.
        return len(re.findall(r"\w+|[^\w\s]+", text))

    # -- documents ---------------------------------------------------------

    def _read(self, path: str) -> tuple:
        p = Path(path).expanduser()
        if not p.exists():
            raise EngineError(f"{path}: no such file or directory")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        texts = []
        for f in files:
            try:
                texts.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                if not p.is_dir():
                    raise EngineError(f"{path}: not a text file") from None
            except OSError as e:
                raise EngineError(f"{path}: cannot read ({e.strerror or e})") from None
        if not texts:
            raise EngineError(f"{path}: no readable text found")
        return "\n".join(texts), len(texts), ("dir" if p.is_dir() else "file")

    def prefill_documents(self, paths, session_path, progress, cancel, system_prompt: str = "") -> DocumentInfo:
        sources = []
        for i, path in enumerate(paths):
            progress(PrefillProgress("reading", i, len(paths)))
            text, n, kind = self._read(path)
            sources.append(
                DocumentSource(str(Path(path).expanduser().resolve()), short_label(path), self.count_tokens(text), n, kind)
            )
        total = sum(s.tokens for s in sources)
        if total + DOC_RESERVE_TOKENS > self.max_context:
            raise DocumentTooLargeError(total, self.max_context)
        done = 0
        progress(PrefillProgress("prefill", 0, total))
        t0 = time.monotonic()
        while done < total:
            if cancel.is_set():
                raise PrefillCancelled(done, total)
            time.sleep(self.prefill_delay)
            done = min(total, done + self.prefill_step)
            tps = done / max(time.monotonic() - t0, 1e-9)
            progress(PrefillProgress("prefill", done, total, tps, (total - done) / tps))
        if cancel.is_set():
            raise PrefillCancelled(done, total)
        progress(PrefillProgress("saving", total, total))
        payload = {"fake_session": 1, "model": self.model_name, "tokens": total, "system_prompt": system_prompt}
        write_atomic(session_path, json.dumps(payload))
        self.prefill_count += 1
        return DocumentInfo(sources, total, session_path, [], system_prompt=system_prompt, handle=payload)

    def open_documents(self, info: DocumentInfo) -> DocumentInfo:
        try:
            payload = json.loads(Path(info.session_path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SessionUnavailableError(f"saved document session unreadable ({e.__class__.__name__})") from None
        if payload.get("model") != self.model_name or payload.get("tokens") != info.token_count:
            raise SessionUnavailableError("saved document session was made with another model")
        if payload.get("system_prompt", "") != info.system_prompt:
            raise SessionUnavailableError("saved document session has another system prompt")
        self.open_count += 1
        return replace(info, handle=payload)

    # -- replies -----------------------------------------------------------

    def _reply_text(self, messages, documents) -> str:
        if self._reply is not None:
            return self._reply(messages, documents)
        question = next((m.content for m in reversed(messages) if m.role == "user"), "")
        short = " ".join(question.split())
        short = short if len(short) <= 60 else short[:57] + "..."
        parts = [f"You asked: *{short}*\n\n"]
        if documents is not None:
            names = ", ".join(s.label for s in documents.sources)
            parts.append(f"I read {documents.token_count:,} tokens of documents ({names}).\n\n")
        parts.append('Here is an example:\n\n```python\ndef hello():\n    return "hi"\n```\n\n')
        if "[[long]]" in question:
            parts.append(" ".join(f"word{i}" for i in range(2000)) + "\n\n")
        parts.append("Done.")
        return "".join(parts)

    def stream_reply(self, messages, settings, documents, cancel) -> Iterator[Delta]:
        self.reply_count += 1
        self.last_messages = list(messages)
        self.last_settings = settings
        if documents is not None:
            # Like the real engine: the documents' snapshot includes the system prompt.
            system = next((m.content for m in messages if m.role == "system"), "")
            if documents.handle is None or system != documents.system_prompt:
                raise EngineError("documents not opened, or opened with another system prompt")
        text = self._reply_text(messages, documents)
        question = next((m.content for m in reversed(messages) if m.role == "user"), "")
        pieces = _TOKEN_RE.findall(text)
        prompt_tokens = sum(self.count_tokens(m.content) + 4 for m in messages)
        base = prompt_tokens + (documents.token_count if documents else 0)
        finish = "stop"
        if len(pieces) > settings.max_tokens:
            pieces, finish = pieces[: settings.max_tokens], "length"
        for i, piece in enumerate(pieces, 1):
            if cancel.is_set():
                return
            if "[[error]]" in question and i == 6:
                raise EngineError("fake engine failure mid-reply")
            if self.token_delay:
                time.sleep(self.token_delay)
            d = Delta(
                text=piece,
                prompt_tokens=prompt_tokens,
                prompt_tps=1234.5,
                generation_tokens=i,
                generation_tps=42.0,
                peak_memory_gb=1.5,
                context_tokens=base + i,
                finish_reason=finish if i == len(pieces) else None,
            )
            self._update_stats(d)
            yield d
        if not pieces:
            yield Delta(finish_reason=finish, context_tokens=base)

    def _update_stats(self, d: Delta) -> None:
        self.stats = replace(
            self.stats,
            context_tokens=d.context_tokens,
            prompt_tps=d.prompt_tps,
            generation_tps=d.generation_tps,
            peak_memory_gb=d.peak_memory_gb,
        )


# ---------------------------------------------------------------------------
# KimiEngine: the real adapter over kimi_mlx (kept thin on purpose)
# ---------------------------------------------------------------------------


def resolve_model_path(model: str) -> str:
    """A local directory, or a Hugging Face repo id already in the local cache.

    Never downloads: fetching ~100 GB silently from a chat app would be rude.
    """
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFoundError(f"{p} has no config.json; is it a model directory?", "not_model_dir")
        return str(p)
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(f"No model directory at {model}.")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True)
    except Exception:
        raise ModelNotFoundError(f"{model} is not in the local Hugging Face cache.", "not_downloaded") from None


class _MLXThread:
    """One long-lived thread that runs every MLX call of the engine.

    MLX (>= 0.31.2) streams are thread-local; Textual starts a fresh thread per
    worker, so instead of making a stream per worker we funnel all model work
    through this thread and its single stream.  This also serialises prefill
    and generation, which must not run at the same time anyway (memory).
    """

    def __init__(self):
        self.closing = threading.Event()  # the app is quitting: stop waiting
        self._jobs: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kimi-mlx", daemon=True)
        self._thread.start()

    def _run(self):
        import mlx.core as mx

        stream = mx.new_thread_local_stream(mx.default_device())
        with mx.stream(stream):
            while True:
                job = self._jobs.get()
                if job is None:  # close(): end the thread (and its stream) cleanly
                    return
                fn, box, done = job
                try:
                    box["result"] = fn()
                except BaseException as e:  # handed back to the caller's thread
                    box["error"] = e
                done.set()

    def should_stop(self, cancel: threading.Event) -> Callable[[], bool]:
        """For kimi_mlx's should_stop: the caller's cancel, or the app quitting."""
        return lambda: cancel.is_set() or self.closing.is_set()

    def close(self) -> None:
        """Stop the running job at its next step and join the thread.

        MLX's threads must have ended before the interpreter shuts down, or the
        process aborts ("terminate called without an active exception").
        A model load can't be interrupted: this waits for it.
        """
        self.closing.set()
        self._jobs.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join()

    def call(self, fn):
        box: dict = {}
        done = threading.Event()
        self._jobs.put((fn, box, done))
        # Poll so quitting never waits for a long load or prefill to finish:
        # the app's worker threads must end for the process to exit.
        while not done.wait(0.1):
            if self.closing.is_set():
                raise EngineError("kimi-chat is quitting")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def iterate(self, make_iter, cancel: threading.Event):
        """Run ``make_iter()`` on the MLX thread, yielding its items here."""
        out: "queue.Queue" = queue.Queue()  # unbounded: deltas are tiny, never block MLX
        stop = threading.Event()  # consumer went away (closed generator, error)
        end = object()

        def produce():
            try:
                for item in make_iter():
                    out.put(item)
                    if cancel.is_set() or stop.is_set() or self.closing.is_set():
                        break
            except BaseException as e:
                out.put(_Failure(e))
                return
            out.put(end)

        self._jobs.put((produce, {}, threading.Event()))
        try:
            while True:
                try:
                    item = out.get(timeout=0.1)
                except queue.Empty:
                    if self.closing.is_set():
                        return
                    continue
                if item is end:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()


@dataclass
class _Failure:
    error: BaseException


_MSG_SENTINEL = "\ue000kimi-msg-{}\ue001"  # private-use: never in real text


def conversation_ids(tokenizer, messages, after_documents: bool = False) -> list:
    """Token ids of a whole conversation, ending with the generation prompt.

    With ``after_documents``, only what follows a document prefix (see
    ``kimi_mlx.session.document_prompt``: the template up to the first user
    message, then the documents): the first user message onwards.  The
    template is rendered with sentinels in place of the contents so message
    text is encoded as plain text (no special tokens from user input) and the
    template's own markup with special tokens, as ``question_prompt`` does;
    for one question this is exactly ``question_prompt``.
    """
    msgs = [{"role": m.role, "content": _MSG_SENTINEL.format(i)} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), None)
    if after_documents and first_user is None:
        raise EngineError("a question is needed after the documents")
    ids, pos = [], 0
    for i, m in enumerate(messages):
        mark = _MSG_SENTINEL.format(i)
        if rendered.count(mark) != 1:
            raise EngineError("the chat template does not place every message exactly once")
        j = rendered.index(mark, pos)
        skip = after_documents and i <= first_user  # in the document prefix already
        if not skip and rendered[pos:j]:
            ids += tokenizer.encode(rendered[pos:j], allow_special=True)
        if not (after_documents and i < first_user):
            ids += tokenizer.encode(m.content)
        pos = j + len(mark)
    if rendered[pos:]:
        ids += tokenizer.encode(rendered[pos:], allow_special=True)
    return list(ids)


class KimiEngine:
    """Adapter from :class:`Engine` to kimi_mlx.  Names used from kimi_mlx:

    ``kimi_mlx.generate.load`` / ``stream_generate`` / ``ModelLoadError``,
    ``kimi_mlx.documents.load_documents`` / ``DocumentError``,
    ``kimi_mlx.session.DocumentSession`` (``create``, ``save``, ``load``,
    ``fork``), ``document_prompt``, ``PrefillCancelled``, ``SessionError``.
    """

    prefill_step_size = 2048

    def __init__(self, model: str = DEFAULT_MODEL):
        self.model_path = model
        self.model_name = Path(model.rstrip("/")).name or model
        self.max_context = 1_048_576
        self.stats = EngineStats(model_name=self.model_name, max_context=self.max_context)
        self.load_log: list = []
        self._model = None
        self._tokenizer = None
        self._mlx: Optional[_MLXThread] = None

    def load(self) -> None:
        path = resolve_model_path(self.model_path)
        self._mlx = self._mlx or _MLXThread()

        def _load():
            from kimi_mlx.generate import load

            # log=: never print under the TUI (it would scribble over the screen)
            return load(path, log=self.load_log.append)

        try:
            self._model, self._tokenizer = self._mlx.call(_load)
        except EngineError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{type(e).__name__}: {e}") from e
        cfg = getattr(self._model, "config", None)
        self.max_context = int(getattr(cfg, "model_max_length", 0) or self.max_context)
        self.stats = EngineStats(model_name=self.model_name, max_context=self.max_context)

    def close(self) -> None:
        if self._mlx is not None:
            self._mlx.close()
            self._mlx = None
        self._model = self._tokenizer = None  # the weights can be freed (switching models)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text))

    def prefill_documents(self, paths, session_path, progress, cancel, system_prompt: str = "") -> DocumentInfo:
        from kimi_mlx.documents import DocumentError, load_documents
        from kimi_mlx import session as S

        mlx = self._mlx
        sources, texts, warnings = [], [], []
        for i, path in enumerate(paths):
            progress(PrefillProgress("reading", i, len(paths)))
            if cancel.is_set():
                raise PrefillCancelled(0, 0)
            try:
                ds = load_documents([path])
            except DocumentError as e:
                raise EngineError(str(e)) from None
            texts.append(ds.render())
            warnings += list(ds.warnings)
            p = Path(path).expanduser().resolve()
            kind = "dir" if p.is_dir() else "file"
            sources.append(DocumentSource(str(p), short_label(str(p)), self.count_tokens(ds.render()), len(ds.files), kind))
        ids = S.document_prompt(self._tokenizer, "".join(texts), system_prompt or None)
        if len(ids) + DOC_RESERVE_TOKENS > self.max_context:
            raise DocumentTooLargeError(len(ids), self.max_context)

        def _prefill():
            session = S.DocumentSession.create(
                self._model,
                self._tokenizer,
                ids,
                progress=lambda done, total, tps, eta: progress(PrefillProgress("prefill", done, total, tps, eta)),
                step=self.prefill_step_size,
                should_stop=mlx.should_stop(cancel),
            )
            progress(PrefillProgress("saving", len(ids), len(ids)))
            session.save(session_path)  # atomic (temp file + rename)
            return session

        progress(PrefillProgress("prefill", 0, len(ids)))
        try:
            session = mlx.call(_prefill)
        except S.PrefillCancelled as e:
            raise PrefillCancelled(e.done, e.total) from None
        return DocumentInfo(sources, len(ids), session_path, warnings, handle=session, system_prompt=system_prompt)

    def open_documents(self, info: DocumentInfo) -> DocumentInfo:
        from kimi_mlx.session import DocumentSession

        mlx = self._mlx

        def _open():
            return DocumentSession.load(info.session_path, self._model, self._tokenizer)

        try:
            session = mlx.call(_open)
        except Exception as e:  # SessionError, OSError: stale or damaged
            raise SessionUnavailableError(str(e)) from e
        return replace(info, handle=session)

    def stream_reply(self, messages, settings, documents, cancel) -> Iterator[Delta]:
        with_docs = documents is not None and documents.handle is not None
        if with_docs:
            # the system prompt is baked into the document prefix
            messages = [m for m in messages if m.role != "system"]
        prompt = conversation_ids(self._tokenizer, messages, after_documents=with_docs)
        doc_tokens = documents.token_count if with_docs else 0
        mlx = self._mlx

        def make_iter():
            from kimi_mlx.generate import stream_generate

            return stream_generate(
                self._model,
                self._tokenizer,
                prompt,
                max_tokens=settings.max_tokens,
                temp=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                min_p=settings.min_p,
                seed=settings.seed,
                prompt_cache=documents.handle.fork() if with_docs else None,
                prefill_step_size=self.prefill_step_size,
                should_stop=mlx.should_stop(cancel),
            )

        try:
            for r in mlx.iterate(make_iter, cancel):
                d = Delta(
                    text=r.text,
                    prompt_tokens=r.prompt_tokens,
                    prompt_tps=r.prompt_tps,
                    generation_tokens=r.generation_tokens,
                    generation_tps=r.generation_tps,
                    peak_memory_gb=r.peak_memory,
                    context_tokens=doc_tokens + r.prompt_tokens + r.generation_tokens,
                    finish_reason=r.finish_reason,
                )
                self.stats = replace(
                    self.stats,
                    context_tokens=d.context_tokens,
                    prompt_tps=d.prompt_tps,
                    generation_tps=d.generation_tps,
                    peak_memory_gb=d.peak_memory_gb,
                )
                yield d
        except ValueError as e:  # stream_generate's context / argument checks
            raise EngineError(str(e)) from None
