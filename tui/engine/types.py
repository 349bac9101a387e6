"""What passes between the chat app and an engine: settings, messages, deltas, documents, errors,
and the Engine protocol itself.

Threading contract: the app calls ``load``, ``prefill_documents``, ``open_documents`` and
iterates ``stream_reply`` from worker threads, never from the UI thread, and never two of them
at once.  Cancellation is cooperative via a ``threading.Event`` the engine polls between
tokens / prefill chunks.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, runtime_checkable

# role, content, and a reply's token ids as generated (Delta.reply_ids, kept in the message's meta): the
# engine continues from the state after them even where the text would re-encode differently
from kimi_mlx.runtime.prompt import Message as ChatMessage

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
    # Of the prompt, the tokens continued from a kept state (not prefilled again).
    cached_tokens: int = 0
    # Memory held by the engine's kept conversation states (set on the last step).
    checkpoint_bytes: int = 0
    # On the last step: the reply's token ids (ChatMessage.ids).
    reply_ids: Optional[list] = None


@dataclass
class EngineStats:
    model_name: str = ""
    max_context: int = 0
    context_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0

    def updated(self, d: "Delta") -> "EngineStats":
        """These stats after the reply step ``d``."""
        return replace(self, context_tokens=d.context_tokens, prompt_tps=d.prompt_tps,
                       generation_tps=d.generation_tps, peak_memory_gb=d.peak_memory_gb)


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
        chat_state: Optional[str] = None,
    ) -> Iterator[Delta]:
        """Stream the assistant's reply to ``messages`` (system prompt first).

        With ``documents`` (opened), the reply continues from their snapshot,
        whose system prompt must be the one in ``messages``.
        ``chat_state``: a file for the chat's last state (kept across restarts,
        so an old chat continues without prefilling it again); it names the chat.
        Stops promptly once ``cancel`` is set.  The last Delta has a finish_reason.
        """

    def forget_chat(self, chat_state: str) -> None:
        """The chat's kept states are stale (system prompt changed, chat deleted)."""


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

