"""FakeEngine: scripted, deterministic, used by the tests and --fake-engine."""
from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from .types import (DOC_RESERVE_TOKENS, ChatMessage, Delta, DocumentInfo, DocumentSource, DocumentTooLargeError,
                    EngineError, EngineStats, ModelLoadError, ModelNotFoundError, PrefillCancelled, PrefillProgress,
                    SamplingSettings, SessionUnavailableError, short_label, write_atomic)


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
        self.last_chat_state: Optional[str] = None
        self.forgotten: list = []

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

    def forget_chat(self, chat_state: str) -> None:
        self.forgotten.append(chat_state)

    def stream_reply(self, messages, settings, documents, cancel, chat_state=None) -> Iterator[Delta]:
        self.reply_count += 1
        self.last_chat_state = chat_state
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
            self.stats = self.stats.updated(d)
            yield d
        if not pieces:
            yield Delta(finish_reason=finish, context_tokens=base)

