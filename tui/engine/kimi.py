"""KimiEngine: the chat app's adapter over kimi_mlx (imported lazily, so ``import tui`` works
without mlx or a model). Conversations are kimi_mlx.runtime.Conversation objects, one per chat,
sharing one checkpoint store, so a turn prefills only the new message."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

from kimi_mlx.runtime.mlx_thread import MLXThread

from .types import (DOC_RESERVE_TOKENS, Delta, DocumentInfo, DocumentSource, DocumentTooLargeError, EngineError,
                    EngineStats, ModelLoadError, ModelNotFoundError, PrefillCancelled, PrefillProgress,
                    SessionUnavailableError, short_label)


class _MLXThread(MLXThread):
    """kimi_mlx's MLX thread; a job waited for while the app quits raises EngineError."""

    def closed_error(self) -> BaseException:
        return EngineError("kimi-chat is quitting")


def resolve_model_path(model: str) -> str:
    """A local model directory, or a Hugging Face repo id already in the local cache.

    Never downloads: fetching tens of GB silently from a chat app would be rude.
    """
    from kimi_mlx.runtime import ModelLoadError as RuntimeLoadError, resolve_model_path as resolve

    try:
        return str(resolve(model, download=False, require_config=True))
    except RuntimeLoadError as e:
        raise ModelNotFoundError(str(e), e.kind) from None


class KimiEngine:
    """Adapter from :class:`Engine` to kimi_mlx: ``runtime.load`` / ``Conversation`` /
    ``CheckpointStore``, ``documents.load_documents``, ``session.DocumentSession``."""

    prefill_step_size = 2048

    def __init__(self, model: Optional[str] = None):
        from kimi_mlx.runtime.model import DEFAULT_MODEL

        model = model or DEFAULT_MODEL
        self.model_path = model
        self.model_name = Path(model.rstrip("/")).name or model
        self.max_context = 1_048_576
        self.stats = EngineStats(model_name=self.model_name, max_context=self.max_context)
        self.load_log: list = []
        self._model = None
        self._tokenizer = None
        self._mlx: Optional[_MLXThread] = None
        self._store = None  # runtime.CheckpointStore, shared by the chats
        self._chats: dict = {}  # chat key -> runtime.Conversation
        self._restore_tried: set = set()
        self._forget: set = set()

    def load(self) -> None:
        path = resolve_model_path(self.model_path)
        self._mlx = self._mlx or _MLXThread()

        def _load():
            from kimi_mlx.runtime import load

            # log=: never print under the TUI (it would scribble over the screen)
            return load(path, log=self.load_log.append, download=False)

        try:
            self._model, self._tokenizer = self._mlx.call(_load)
        except EngineError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{type(e).__name__}: {e}") from e
        from kimi_mlx.runtime import CheckpointStore
        from kimi_mlx.settings import settings

        self._store, self._chats = CheckpointStore(settings().checkpoint_bytes), {}
        cfg = getattr(self._model, "config", None)
        self.max_context = int(getattr(cfg, "model_max_length", 0) or self.max_context)
        self.stats = EngineStats(model_name=self.model_name, max_context=self.max_context)

    def close(self) -> None:
        if self._mlx is not None:
            self._mlx.close()
            self._mlx = None
        self._model = self._tokenizer = self._store = None  # the weights can be freed (switching models)
        self._chats = {}

    def flush(self) -> None:
        """Wait for the MLX thread's queued work (a chat state being saved)."""
        if self._mlx is not None:
            self._mlx.call(lambda: None)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text))

    def prefill_documents(self, paths, session_path, progress, cancel, system_prompt: str = "") -> DocumentInfo:
        from kimi_mlx import session as S
        from kimi_mlx.documents import DocumentError, load_documents
        from kimi_mlx.runtime import PromptBuilder

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
            sources.append(DocumentSource(str(p), short_label(str(p)), self.count_tokens(texts[-1]), len(ds.files), kind))
        ids = PromptBuilder(self._tokenizer).document_prefix("".join(texts), system_prompt or None)
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

        def _open():
            return DocumentSession.load(info.session_path, self._model, self._tokenizer)

        try:
            session = self._mlx.call(_open)
        except Exception as e:  # SessionError, OSError: stale or damaged
            raise SessionUnavailableError(str(e)) from e
        return replace(info, handle=session)

    # -- conversations -------------------------------------------------------
    def forget_chat(self, chat_state: str) -> None:
        """The chat's checkpoints can't be used again (it was deleted). Applied on the MLX thread,
        which alone touches the store, at the next reply."""
        self._forget.add(chat_state)

    def _conversation(self, key: str, system: str, documents):
        from kimi_mlx.runtime import Conversation

        while self._forget:
            gone = self._forget.pop()
            self._restore_tried.discard(gone)
            if self._chats.pop(gone, None) is not None:
                self._store.forget(gone)
        for other, c in list(self._chats.items()):
            # another chat's documents (and its states, which share their arrays) would stay in memory
            # unbounded once the app let go of them: that chat continues from its saved state instead
            if other != key and c.documents is not None:
                self._store.forget(other)
                del self._chats[other]
                self._restore_tried.discard(other)
        conv = self._chats.get(key)
        if conv is None:
            conv = self._chats[key] = Conversation(self._model, self._tokenizer, store=self._store, key=key,
                                                   prefill_step=self.prefill_step_size)
        conv.set_system_prompt(system)  # a changed one drops this chat's checkpoints
        conv.set_documents(documents)
        return conv

    def _restore(self, conv, chat_state: Optional[str]) -> None:
        """After a restart: continue from the chat's saved checkpoint instead of prefilling it again."""
        if not chat_state or chat_state in self._restore_tried or conv.last_checkpoint() is not None:
            return
        self._restore_tried.add(chat_state)
        if Path(chat_state).is_file():
            from kimi_mlx.session import SessionError

            try:
                conv.restore(chat_state)
            except SessionError as e:  # damaged or from another model: prefill instead
                self.load_log.append(f"chat checkpoint not used: {e}")

    def _save(self, conv, chat_state: Optional[str]) -> None:
        # runs queued on the MLX thread after the reply: the chat may have been deleted meanwhile
        if chat_state and chat_state not in self._forget:
            from kimi_mlx.session import SessionError

            try:
                conv.save(chat_state)
            except SessionError as e:  # e.g. disk full: the chat works on, the next start prefills
                self.load_log.append(f"chat checkpoint not saved: {e}")
            if chat_state in self._forget:  # deleted while it was being written: don't leave it behind
                Path(chat_state).unlink(missing_ok=True)

    def stream_reply(self, messages, settings, documents, cancel, chat_state: Optional[str] = None) -> Iterator[Delta]:
        """chat_state: the file that keeps this chat's last checkpoint across restarts (also its key)."""
        handle = documents.handle if documents is not None else None
        system = next((m.content for m in messages if m.role == "system"), "")
        turns = [m for m in messages if m.role != "system"]
        mlx = self._mlx
        key = chat_state or "chat"

        def make_iter():  # on the MLX thread: the store is only touched there
            conv = self._conversation(key, system, handle)
            self._restore(conv, chat_state)
            last = None
            for r in conv.respond(
                turns,
                max_tokens=settings.max_tokens,
                temp=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                min_p=settings.min_p,
                seed=settings.seed,
                should_stop=mlx.should_stop(cancel),
            ):
                if r.finish_reason is None:
                    yield r, (0, None)
                last = r
            # the last step once the reply's state is kept; saved after it, before the next job
            mlx.submit(lambda: self._save(conv, chat_state))
            if last is not None:
                reply = conv.messages[-1] if conv.messages and conv.messages[-1].role == "assistant" else None
                yield last, (self._store.nbytes, list(reply.ids) if reply is not None and reply.ids else None)

        try:
            for r, (kept, reply_ids) in mlx.iterate(make_iter, cancel):
                d = Delta(
                    text=r.text,
                    prompt_tokens=r.prompt_tokens,
                    prompt_tps=r.prompt_tps,
                    generation_tokens=r.generation_tokens,
                    generation_tps=r.generation_tps,
                    peak_memory_gb=r.peak_memory,
                    context_tokens=r.cached_tokens + r.prompt_tokens + r.generation_tokens,
                    finish_reason=r.finish_reason,
                    cached_tokens=r.cached_tokens,
                    checkpoint_bytes=kept,
                    reply_ids=reply_ids,
                )
                self.stats = self.stats.updated(d)
                yield d
        except ValueError as e:  # the context / argument / template checks
            raise EngineError(str(e)) from None
