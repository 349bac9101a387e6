"""The engine interface the chat app talks to (types.py), a scripted fake (fake.py) and the
kimi_mlx adapter (kimi.py). The TUI only ever sees :class:`Engine`."""
from kimi_mlx.runtime.model import DEFAULT_MODEL

from .fake import FakeEngine
from .kimi import KimiEngine, resolve_model_path
from .types import (DEFAULT_SYSTEM_PROMPT, DOC_RESERVE_TOKENS, ChatMessage, Delta, DocumentInfo, DocumentSource,
                    DocumentTooLargeError, Engine, EngineError, EngineStats, ModelLoadError, ModelNotFoundError,
                    PrefillCancelled, PrefillProgress, ProgressFn, SamplingSettings, SessionUnavailableError,
                    short_label, write_atomic)

__all__ = ["DEFAULT_MODEL", "DEFAULT_SYSTEM_PROMPT", "DOC_RESERVE_TOKENS", "ChatMessage", "Delta", "DocumentInfo",
           "DocumentSource", "DocumentTooLargeError", "Engine", "EngineError", "EngineStats", "FakeEngine",
           "KimiEngine", "ModelLoadError", "ModelNotFoundError", "PrefillCancelled", "PrefillProgress", "ProgressFn",
           "SamplingSettings", "SessionUnavailableError", "resolve_model_path", "short_label", "write_atomic"]
