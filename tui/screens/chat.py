"""The main screen: chat list, messages, documents, prompt and status bar.

All model work happens in thread workers which only post messages back here;
every database write happens on the UI thread, in these message handlers.
"""
from __future__ import annotations

import itertools
import os
import shlex
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from textual import on
from textual.actions import SkipAction
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Label

from ..export import chat_markdown, slug, unique_path
from ..engine import (
    ChatMessage,
    Delta,
    DocumentInfo,
    DocumentTooLargeError,
    EngineError,
    PrefillCancelled,
    PrefillProgress,
    SamplingSettings,
    write_atomic,
)
from ..widgets.chat_view import ChatView, GeneratingIndicator
from ..widgets.documents import DocumentBar
from ..widgets.message import MessageWidget, extract_code_blocks
from ..widgets.progress import PrefillPanel
from ..widgets.prompt import PromptInput
from ..widgets.sidebar import Sidebar
from ..widgets.status_bar import StatusBar
from .dialogs import ConfirmDialog, FilePickerDialog, SearchDialog, SettingsDialog, TextPromptDialog

_ids = itertools.count(1)
NEW_CHAT_TITLE = "New chat"


# -- messages from workers ----------------------------------------------------


class ReplyFlush(Message):
    """Time to show what the worker has streamed since the last flush."""

    def __init__(self, gen_id: int):
        super().__init__()
        self.gen_id = gen_id


class ReplyDone(Message):
    def __init__(self, gen_id: int, error: Optional[BaseException]):
        super().__init__()
        self.gen_id, self.error = gen_id, error


class PrefillUpdate(Message):
    def __init__(self, job_id: int, progress: PrefillProgress):
        super().__init__()
        self.job_id, self.progress = job_id, progress


class PrefillDone(Message):
    def __init__(self, job_id: int, info: Optional[DocumentInfo], error: Optional[BaseException]):
        super().__init__()
        self.job_id, self.info, self.error = job_id, info, error


class DocsRestored(Message):
    def __init__(self, job_id: int, info: Optional[DocumentInfo], error: Optional[BaseException]):
        super().__init__()
        self.job_id, self.info, self.error = job_id, info, error


# Seconds between screen updates while a reply streams: one Markdown append and
# one status update per interval, however fast tokens come (rendering each token
# made the app ~5x slower than the engine: the UI thread held the GIL the model's
# thread needs).  When updates get expensive (a long reply, a slow terminal) the
# interval stretches so they take at most UI_BUDGET of the UI thread's time.
RENDER_INTERVAL = 0.1
MAX_RENDER_INTERVAL = 1.0
UI_BUDGET = 0.1


@dataclass
class _Generation:
    id: int
    chat_id: int
    widget: Optional[MessageWidget]  # None only while the reply's bubble is being mounted
    cancel: threading.Event = field(default_factory=threading.Event)
    last: Optional[Delta] = None
    # Deltas streamed by the worker, not shown yet (deque: append/popleft are thread-safe).
    pending: deque = field(default_factory=deque)
    timer: Optional[Timer] = None
    interval: float = RENDER_INTERVAL
    mark: tuple = (0.0, 0.0)  # (monotonic, UI thread CPU) when the last flush began

    def flush_due(self) -> bool:
        return bool(self.pending) and time.monotonic() - self.mark[0] >= self.interval

    def pace(self) -> None:
        """Called as a flush begins: stretch or shrink the interval to the UI's CPU share since the last one."""
        now, cpu = time.monotonic(), time.thread_time()
        if self.mark[0]:
            share = (cpu - self.mark[1]) / max(now - self.mark[0], 1e-3)
            self.interval = min(MAX_RENDER_INTERVAL, max(RENDER_INTERVAL, self.interval * share / UI_BUDGET))
        self.mark = (now, cpu)

    def take(self) -> list:
        out = []
        while self.pending:
            out.append(self.pending.popleft())
        return out


@dataclass
class _DocJob:
    id: int
    chat_id: int
    kind: str  # "prefill" | "restore"
    cancel: threading.Event = field(default_factory=threading.Event)
    last: Optional[PrefillProgress] = None
    # A re-prefill for a new system prompt: the one to go back to if it is cancelled or fails.
    previous_system_prompt: Optional[str] = None


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "interrupt", "Stop", priority=True),
        Binding("ctrl+c", "interrupt_or_copy", "Stop", show=False, priority=True),
        Binding("ctrl+n", "new_chat", "New chat", priority=True),
        Binding("ctrl+o", "attach", "Attach", priority=True),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+b", "toggle_sidebar", "Chats", show=False),
        Binding("ctrl+l", "focus_chat_list", "Chat list", show=False),
        Binding("ctrl+f", "search", "Search", show=False),
        Binding("ctrl+s", "export", "Export", show=False),
        Binding("f2", "rename_chat", "Rename", show=False),
        Binding("f3", "settings", "Settings", show=False),
        Binding("f4", "app.switch_model", "Model", show=False),
        Binding("f8", "delete_chat", "Delete", show=False),
    ]

    def __init__(self):
        super().__init__()
        self.chat = None
        self.docs: Optional[DocumentInfo] = None
        self.generation: Optional[_Generation] = None
        self.doc_job: Optional[_DocJob] = None
        self.editing_id: Optional[int] = None
        self.replies_done = 0  # finished/cancelled/failed replies (tests wait on it)

    def notify(self, message, *, title="", severity="information", timeout=None, markup=False):
        # markup off: messages quote paths and user text, which may contain "[...]"
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    # -- layout --------------------------------------------------------------

    def compose(self):
        with Horizontal(id="body"):
            yield Sidebar(id="sidebar")
            with Vertical(id="main"):
                yield DocumentBar(id="docs")
                yield PrefillPanel(id="prefill")
                yield ChatView(id="chat")
                yield GeneratingIndicator(id="indicator")
                yield Label("", id="edit-hint")
                yield PromptInput(id="prompt")
        yield StatusBar(id="status")
        yield Footer()

    @property
    def store(self):
        return self.app.store

    @property
    def engine(self):
        return self.app.engine

    @property
    def chat_view(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def status_bar(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def indicator(self) -> GeneratingIndicator:
        return self.query_one(GeneratingIndicator)

    @property
    def busy(self) -> bool:
        return self.generation is not None or self.doc_job is not None

    async def on_mount(self) -> None:
        self.query_one("#edit-hint").display = False
        self.refresh_engine_state()
        chats = self.store.list_chats()
        chat = chats[0] if chats else self.store.create_chat()
        await self.open_chat(chat.id)
        self.prompt.focus()

    def on_unmount(self) -> None:
        # Quitting mid-reply: keep the partial reply, and stop the worker
        # threads so the process can exit promptly.
        gen = self.generation
        if gen is not None:
            gen.cancel.set()
            self.generation = None
            content = (gen.widget.content if gen.widget else "") + "".join(d.text for d in gen.take())
            try:
                if content:
                    self.store.add_message(gen.chat_id, "assistant", content, "cancelled")
            except Exception:
                pass  # never block quitting
        if self.doc_job is not None:
            self.doc_job.cancel.set()
            self.doc_job = None

    def refresh_engine_state(self) -> None:
        try:
            sb = self.status_bar
        except NoMatches:  # not composed yet; on_mount calls this again
            return
        sb.model = self.engine.model_name
        sb.state = self.app.engine_state
        sb.max_context = self.engine.max_context if self.app.engine_state == "ready" else 0

    def engine_ready(self) -> None:
        """Called by the app once the model has loaded."""
        self.refresh_engine_state()
        if self.chat is None:
            return  # open_chat() restores documents itself
        if self.docs is not None and self.docs.handle is None and self.doc_job is None:
            self._start_restore()

    # -- chats ---------------------------------------------------------------

    def _refuse_if_busy(self) -> bool:
        if self.generation is not None:
            self.notify("A reply is being generated; press Esc to stop it first.", severity="warning")
            return True
        if self.doc_job is not None:
            if self.doc_job.kind == "restore":
                self.notify("The documents are being restored; one moment.", severity="warning")
            else:
                self.notify("Documents are being prefilled; press Esc to cancel first.", severity="warning")
            return True
        return False

    async def refresh_sidebar(self) -> None:
        await self.query_one(Sidebar).set_chats(self.store.list_chats(), self.chat.id if self.chat else None)

    async def open_chat(self, chat_id: int) -> None:
        chat = self.store.get_chat(chat_id)
        if chat is None:
            return
        self.chat = chat
        self._stop_editing()
        await self.chat_view.set_messages(self.store.list_messages(chat.id))
        self.docs = self.store.get_documents(chat.id)
        restoring = self.docs is not None and self.app.engine_state != "failed"
        await self.query_one(DocumentBar).set_documents(self.docs, restoring=restoring)
        await self.refresh_sidebar()
        self._update_context_from_history()
        self.sub_title = chat.title
        if self.docs is not None and self.app.engine_state == "ready" and self.doc_job is None:
            self._start_restore()

    def _update_context_from_history(self) -> None:
        sb = self.status_bar
        used = self.docs.token_count if self.docs else 0
        for m in reversed(self.store.list_messages(self.chat.id)):
            if m.role == "assistant" and m.meta.get("context_tokens"):
                used = m.meta["context_tokens"]
                break
        sb.context_tokens = used

    async def action_new_chat(self) -> None:
        if self._refuse_if_busy():
            return
        # Reuse an untouched "New chat" rather than piling up empty ones.
        current = self.chat
        if current is not None and current.title == NEW_CHAT_TITLE and not self.store.list_messages(current.id) and self.docs is None:
            self.prompt.focus()
            return
        chat = self.store.create_chat()
        await self.open_chat(chat.id)
        self.prompt.focus()

    @on(Sidebar.ChatSelected)
    async def _chat_selected(self, event: Sidebar.ChatSelected) -> None:
        if self.chat and event.chat_id == self.chat.id:
            self.prompt.focus()
            return
        if self._refuse_if_busy():
            await self.refresh_sidebar()
            return
        await self.open_chat(event.chat_id)
        self.prompt.focus()

    def _target_chat_id(self) -> Optional[int]:
        """The chat highlighted in the sidebar if it has focus, else the open one."""
        sidebar = self.query_one(Sidebar)
        if sidebar.list_view.has_focus:
            return sidebar.highlighted_chat_id() or (self.chat.id if self.chat else None)
        return self.chat.id if self.chat else None

    def action_rename_chat(self) -> None:
        chat_id = self._target_chat_id()
        chat = self.store.get_chat(chat_id) if chat_id else None
        if chat is None:
            return

        async def done(title: Optional[str]) -> None:
            if title:
                await self.rename_chat(chat.id, title)

        self.app.push_screen(TextPromptDialog("Rename chat", chat.title), done)

    async def rename_chat(self, chat_id: int, title: str) -> None:
        self.store.rename_chat(chat_id, title)
        if self.chat and self.chat.id == chat_id:
            self.chat = self.store.get_chat(chat_id)
            self.sub_title = title
        await self.refresh_sidebar()

    def action_delete_chat(self) -> None:
        chat_id = self._target_chat_id()
        chat = self.store.get_chat(chat_id) if chat_id else None
        if chat is None:
            return
        if self.chat and chat.id == self.chat.id and self._refuse_if_busy():
            return

        async def done(yes: Optional[bool]) -> None:
            if yes:
                await self.delete_chat(chat.id)

        self.app.push_screen(ConfirmDialog(f"Delete the chat “{chat.title}”? This cannot be undone."), done)

    async def delete_chat(self, chat_id: int) -> None:
        self._remove_session(self.store.delete_chat(chat_id))
        state = self.store.checkpoint_path_for(chat_id)
        self.engine.forget_chat(state)
        self.store.remove_session(state)
        if self.chat and self.chat.id == chat_id:
            chats = self.store.list_chats()
            chat = chats[0] if chats else self.store.create_chat()
            await self.open_chat(chat.id)
        else:
            await self.refresh_sidebar()
        self.notify("Chat deleted.")

    def _remove_session(self, path: Optional[str]) -> None:
        if not self.store.remove_session(path):
            self.notify(f"Left {path} in place: it is not a session file of kimi-chat.", severity="warning", timeout=12)

    def action_focus_chat_list(self) -> None:
        sidebar = self.query_one(Sidebar)
        sidebar.display = True
        sidebar.list_view.focus()

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one(Sidebar)
        sidebar.display = not sidebar.display
        if sidebar.display:
            sidebar.list_view.focus()
        else:
            self.prompt.focus()

    def action_settings(self) -> None:
        if self._refuse_if_busy():
            return
        chat = self.chat

        def done(result) -> None:
            if result:
                system_prompt, settings = result
                self.change_settings(system_prompt, settings, "Chat settings saved.")

        self.app.push_screen(SettingsDialog(chat.system_prompt, chat.settings), done)

    def change_settings(self, system_prompt: str, settings: SamplingSettings, saved: str) -> None:
        """Save the open chat's settings.  The system prompt is part of the
        documents' snapshot, so changing it in a document chat asks first."""
        chat_id = self.chat.id
        docs = self.docs
        if docs is None or system_prompt == docs.system_prompt:
            self._save_settings(chat_id, system_prompt, settings)
            self.notify(saved)
            return

        def answered(yes: Optional[bool]) -> None:
            if self.chat is None or self.chat.id != chat_id:
                return
            if not yes:  # keep the prompt the documents were read with; the rest is saved
                self._save_settings(chat_id, docs.system_prompt, settings)
                self.notify("The system prompt was not changed.")
                return
            if self._refuse_if_busy():
                return
            self._save_settings(chat_id, system_prompt, settings)
            self.notify(saved + " Prefilling the documents again with the new system prompt.")
            self._start_prefill([s.path for s in docs.sources], previous_system_prompt=docs.system_prompt)

        self.app.push_screen(
            ConfirmDialog(
                f"The system prompt is part of the documents' snapshot: changing it reads and "
                f"prefills the documents ({docs.token_count:,} tokens) again. Change it?",
                yes="Change and prefill",
            ),
            answered,
        )

    def _save_settings(self, chat_id: int, system_prompt: str, settings: SamplingSettings) -> None:
        self.store.update_chat_settings(chat_id, system_prompt, settings)
        if self.chat and self.chat.id == chat_id:
            self.chat = self.store.get_chat(chat_id)

    # -- sending ---------------------------------------------------------------

    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text:
            return
        if text.startswith("//"):  # a message that starts with "/"
            text = text[1:]
        elif text.startswith("/"):
            # An unknown or malformed command keeps the input, to fix or send with "//".
            if await self.run_command(text):
                self.prompt.clear()
            return
        if await self.send(text):
            self.prompt.clear()

    def _check_can_generate(self) -> bool:
        if self._refuse_if_busy():
            return False
        state = self.app.engine_state
        if state == "loading":
            self.notify("The model is still loading; your message is kept in the input.", severity="warning")
            return False
        if state != "ready":
            self.notify("No model is loaded, so there is nobody to answer. Start with --model PATH.", severity="error")
            return False
        if self.docs is not None and self.docs.handle is None:
            self.notify("The documents are not ready yet (being restored).", severity="warning")
            return False
        if self.docs is not None and self.docs.system_prompt != self.chat.system_prompt:
            # Only from an older release's data: settle which prompt to use first.
            self.change_settings(self.chat.system_prompt, self.chat.settings, "System prompt kept.")
            return False
        return True

    async def send(self, text: str) -> bool:
        """Add a user message and stream the reply. Returns False if refused."""
        if not self._check_can_generate():
            return False
        chat_id = self.chat.id
        if self.editing_id is not None:
            # Edit and resend: drop the edited message and everything after it.
            self.store.delete_messages_from(chat_id, self.editing_id)
            widget = next((w for w in self.chat_view.messages if w.message_id == self.editing_id), None)
            if widget is not None:
                await self.chat_view.remove_from(widget)
            self._stop_editing()
        history = self._history()
        history.append(ChatMessage("user", text))
        if not self._fits_context(history):
            return False
        msg = self.store.add_message(chat_id, "user", text)  # committed before the reply starts
        await self.chat_view.add_message("user", text, "ok", msg.id)
        if self.chat.title == NEW_CHAT_TITLE:
            await self.rename_chat(chat_id, _title_from(text))
        else:
            await self.refresh_sidebar()
        await self._start_reply(history)
        return True

    def _history(self) -> list:
        out = []
        if self.chat.system_prompt.strip():
            out.append(ChatMessage("system", self.chat.system_prompt))
        for m in self.store.list_messages(self.chat.id):
            # Failed replies are not part of the conversation; cancelled ones are.
            if m.status != "error" and m.content:
                ids = m.meta.get("reply_ids") if m.role == "assistant" else None
                out.append(ChatMessage(m.role, m.content, tuple(ids) if isinstance(ids, list) else None))
        return out

    def _fits_context(self, history: list) -> bool:
        doc_tokens = self.docs.token_count if self.docs else 0
        used = doc_tokens + sum(self.engine.count_tokens(m.content) + 4 for m in history)
        limit = self.engine.max_context
        if used + 16 > limit:
            self.notify(
                f"This conversation needs about {used:,} tokens ({doc_tokens:,} of documents), "
                f"but the model's context holds {limit:,}. Start a new chat (Ctrl+N) or remove documents.",
                severity="error",
                timeout=12,
            )
            return False
        return True

    async def _start_reply(self, history: list) -> None:
        # Registered before the bubble is mounted: an Esc pressed while it mounts stops this reply
        # (it used to find no generation and was lost).
        gen = self.generation = _Generation(next(_ids), self.chat.id, None)
        gen.widget = await self.chat_view.add_message("assistant", "", "streaming")
        gen.widget.start_stream()
        self.indicator.start("Stopping…" if gen.cancel.is_set() else "Kimi is thinking… · Esc stops")
        settings = SamplingSettings.from_dict(self.chat.settings.to_dict())
        docs = self.docs
        engine = self.engine
        state = self.store.checkpoint_path_for(self.chat.id)

        def work() -> None:
            try:
                for delta in engine.stream_reply(history, settings, docs, gen.cancel, chat_state=state):
                    if gen.cancel.is_set():  # stopped: what comes after Esc isn't shown
                        break
                    gen.pending.append(delta)  # shown by the next flush, not per token
            except BaseException as e:  # reported on the UI thread
                self.post_message(ReplyDone(gen.id, e))
            else:
                self.post_message(ReplyDone(gen.id, None))

        # The flush runs as a message so it is ordered with ReplyDone.
        gen.timer = self.set_interval(
            RENDER_INTERVAL / 2, lambda: gen.flush_due() and self.post_message(ReplyFlush(gen.id)), name="reply-flush"
        )
        self.run_worker(work, thread=True, group="generate", exit_on_error=False, name="generate")

    @on(ReplyFlush)
    async def _reply_flush(self, event: ReplyFlush) -> None:
        gen = self.generation
        if gen is not None and gen.id == event.gen_id:
            await self._show_pending(gen)

    async def _show_pending(self, gen: _Generation) -> None:
        deltas = gen.take()
        if not deltas:
            return
        gen.pace()
        d = gen.last = deltas[-1]
        text = "".join(x.text for x in deltas)
        if text:
            await gen.widget.append(text)
        if not gen.cancel.is_set():
            self.indicator.set_text(f"Generating… {d.generation_tokens:,} tokens · {d.generation_tps:,.1f} tok/s · Esc stops")
        self.status_bar.update_from(d)

    @on(ReplyDone)
    async def _reply_done(self, event: ReplyDone) -> None:
        gen = self.generation
        if gen is None or gen.id != event.gen_id:
            return
        if gen.timer is not None:
            gen.timer.stop()
        await self._show_pending(gen)
        if gen.cancel.is_set() or (gen.last is not None and gen.last.finish_reason == "cancelled"):
            status = "cancelled"
        elif event.error is not None:
            status = "error"
        elif gen.last is not None and gen.last.finish_reason == "length":
            status = "length"
        else:
            status = "ok"
        meta = {}
        if gen.last is not None:
            last = gen.last
            meta = {
                "finish_reason": last.finish_reason,
                "prompt_tokens": last.prompt_tokens,
                "generation_tokens": last.generation_tokens,
                "prompt_tps": round(last.prompt_tps, 2),
                "generation_tps": round(last.generation_tps, 2),
                "context_tokens": last.context_tokens,
                "cached_tokens": last.cached_tokens,
            }
            if last.reply_ids:
                meta["reply_ids"] = last.reply_ids
        if event.error is not None:
            meta["error"] = _describe(event.error)
        try:
            if status == "cancelled" and not gen.widget.content:
                # Stopped while thinking: nothing to keep, no empty bubble.
                await gen.widget.finish(status)
                await gen.widget.remove()
                self.chat_view.refresh_empty()
                self.indicator.stop()
                self.notify("Stopped before the reply began.")
                return
            # Saved first: whatever happens to the display, the reply is kept.
            msg = self.store.add_message(gen.chat_id, "assistant", gen.widget.content, status, meta)
            gen.widget.message_id = msg.id
            await gen.widget.finish(status)
            self.indicator.stop()
            if status == "cancelled":
                self.notify("Reply stopped; the partial reply was kept.")
            elif status == "error":
                self.notify(f"The reply failed: {_describe(event.error)}", severity="error", timeout=12)
        finally:
            # Cleared last, so "not busy" means the reply is fully saved and shown.
            self.generation = None
            self.replies_done += 1

    def action_interrupt(self) -> None:
        if self.doc_job is not None and self.doc_job.kind == "prefill":
            self.doc_job.cancel.set()
            self.query_one(PrefillPanel).query_one("#prefill-detail", Label).update("Cancelling…")
            return
        if self.generation is not None:
            self.generation.cancel.set()
            self.indicator.set_text("Stopping…")
            return
        if self.editing_id is not None:
            self._stop_editing()
            self.prompt.clear()
            return
        if not self.prompt.has_focus:
            self.prompt.focus()
            return
        raise SkipAction()

    def action_interrupt_or_copy(self) -> None:
        # Ctrl+C while the model works stops it (what a terminal user expects);
        # otherwise fall through to copy / Textual's "press Ctrl+Q to quit" hint.
        if self.busy and (self.generation is not None or self.doc_job.kind == "prefill"):
            self.action_interrupt()
            return
        raise SkipAction()

    # -- regenerate / edit ---------------------------------------------------

    async def action_regenerate(self) -> None:
        if not self._check_can_generate():
            return
        msgs = self.store.list_messages(self.chat.id)
        if not msgs:
            self.notify("Nothing to regenerate yet.", severity="warning")
            return
        last = msgs[-1]
        if last.role == "assistant":
            self.store.delete_messages_from(self.chat.id, last.id)
            widget = next((w for w in self.chat_view.messages if w.message_id == last.id), None)
            if widget is not None:
                await self.chat_view.remove_from(widget)
        history = self._history()
        if not history or history[-1].role != "user":
            self.notify("Nothing to regenerate yet.", severity="warning")
            return
        await self._start_reply(history)

    @on(MessageWidget.RegenerateRequested)
    async def _regen_requested(self, event: MessageWidget.RegenerateRequested) -> None:
        msgs = self.chat_view.messages
        if msgs and event.widget is msgs[-1]:
            await self.action_regenerate()
        else:
            self.notify("Only the last reply can be regenerated.", severity="warning")

    @on(PromptInput.EditLast)
    def _edit_last(self) -> None:
        self.edit_last()

    def edit_last(self) -> None:
        users = [w for w in self.chat_view.messages if w.role == "user" and w.message_id is not None]
        if users:
            self.start_editing(users[-1])

    @on(MessageWidget.EditRequested)
    def _edit_requested(self, event: MessageWidget.EditRequested) -> None:
        self.start_editing(event.widget)

    def start_editing(self, widget: MessageWidget) -> None:
        if self._refuse_if_busy():
            return
        self.editing_id = widget.message_id
        self.prompt.text = widget.content
        self.prompt.move_cursor(self.prompt.document.end)
        hint = self.query_one("#edit-hint", Label)
        hint.update("Editing a message: Enter resends it (later messages are replaced) · Esc cancels")
        hint.display = True
        self.prompt.focus()

    def _stop_editing(self) -> None:
        self.editing_id = None
        self.query_one("#edit-hint").display = False

    # -- documents -------------------------------------------------------------

    def action_attach(self) -> None:
        def done(paths) -> None:
            if paths:
                self.attach(paths)

        self.app.push_screen(FilePickerDialog(self.app.start_dir), done)

    def attach(self, paths: list) -> None:
        if self._refuse_if_busy():
            return
        if self.app.engine_state != "ready":
            self.notify("Load a model before attaching documents.", severity="error")
            return
        resolved = []
        for p in paths:
            path = Path(os.path.expanduser(p))
            if not path.is_absolute():
                path = Path(self.app.start_dir) / path
            if not path.exists():
                self.notify(f"Cannot attach {p}: no such file or directory.", severity="error")
                return
            if not os.access(path, os.R_OK):
                self.notify(f"Cannot attach {p}: permission denied.", severity="error")
                return
            resolved.append(str(path.resolve()))
        existing = [s.path for s in self.docs.sources] if self.docs else []
        new = [p for p in resolved if p not in existing]
        if not new:
            self.notify("Already attached.")
            return
        self._start_prefill(existing + new)

    def _start_prefill(self, paths: list, previous_system_prompt: Optional[str] = None) -> None:
        job = _DocJob(next(_ids), self.chat.id, "prefill", previous_system_prompt=previous_system_prompt)
        self.doc_job = job
        session_path = self.store.session_path_for(self.chat.id)
        self.query_one(PrefillPanel).start("Reading documents…")
        engine = self.engine
        system_prompt = self.chat.system_prompt

        def work() -> None:
            try:
                info = engine.prefill_documents(
                    paths,
                    session_path,
                    lambda p: self.post_message(PrefillUpdate(job.id, p)),
                    job.cancel,
                    system_prompt=system_prompt,
                )
            except BaseException as e:
                self.post_message(PrefillDone(job.id, None, e))
            else:
                self.post_message(PrefillDone(job.id, info, None))

        self.run_worker(work, thread=True, group="prefill", exit_on_error=False, name="prefill")

    @on(PrefillUpdate)
    def _prefill_update(self, event: PrefillUpdate) -> None:
        job = self.doc_job
        if job is None or job.id != event.job_id or job.cancel.is_set():
            return
        job.last = event.progress
        self.query_one(PrefillPanel).update_progress(event.progress)

    @on(PrefillDone)
    async def _prefill_done(self, event: PrefillDone) -> None:
        job = self.doc_job
        if job is None or job.id != event.job_id:
            return
        try:
            self.query_one(PrefillPanel).stop()
            self._report_prefill(job, event)
            if event.error is None and self.chat and self.chat.id == job.chat_id:
                self.docs = event.info
                await self.query_one(DocumentBar).set_documents(event.info)
                self._update_context_from_history()
            elif event.error is not None and job.previous_system_prompt is not None:
                # The old snapshot is still attached: go back to the prompt it was made with.
                chat = self.store.get_chat(job.chat_id)
                if chat is not None:
                    self._save_settings(job.chat_id, job.previous_system_prompt, chat.settings)
        finally:
            # Cleared last, so "not busy" means the result is fully shown.
            if self.doc_job is job:
                self.doc_job = None

    def _report_prefill(self, job: _DocJob, event: PrefillDone) -> None:
        err = event.error
        if err is None:
            info = event.info
            self.store.set_documents(job.chat_id, info, self.engine.model_name)
            n = len(info.sources)
            self.notify(f"{n} document source{'s' if n != 1 else ''} ready: {info.token_count:,} tokens in context.")
            for w in info.warnings[:5]:
                self.notify(w, severity="warning", timeout=10)
        else:
            if job.previous_system_prompt is not None:
                outcome = "the documents stay attached with the previous system prompt."
            elif self.docs is not None and self.chat and self.chat.id == job.chat_id:
                outcome = "the new documents were not attached; the earlier ones stay."
            else:
                outcome = "documents not attached."
            if isinstance(err, PrefillCancelled) or job.cancel.is_set():
                last = job.last
                at = f" at {last.done:,} / {last.total:,} tokens" if last is not None and last.stage == "prefill" else ""
                self.notify(f"Prefill cancelled{at}; {outcome}", severity="warning", timeout=10)
            elif isinstance(err, DocumentTooLargeError):
                self.notify(f"{err} {outcome[0].upper()}{outcome[1:]}", title="Too large for the context", severity="error", timeout=15)
            else:
                self.notify(f"Could not attach: {_describe(err)}; {outcome}", severity="error", timeout=12)

    def _start_restore(self) -> None:
        job = _DocJob(next(_ids), self.chat.id, "restore")
        self.doc_job = job
        info = self.docs
        engine = self.engine
        self.indicator.start("Restoring the document session…")

        def work() -> None:
            try:
                opened = engine.open_documents(info)
            except BaseException as e:
                self.post_message(DocsRestored(job.id, None, e))
            else:
                self.post_message(DocsRestored(job.id, opened, None))

        self.run_worker(work, thread=True, group="prefill", exit_on_error=False, name="restore")

    @on(DocsRestored)
    async def _docs_restored(self, event: DocsRestored) -> None:
        job = self.doc_job
        if job is None or job.id != event.job_id:
            return
        if self.generation is None:
            self.indicator.stop()
        try:
            if self.chat is None or self.chat.id != job.chat_id:
                return  # another chat is open now; it restores its own documents
            if event.error is None:
                self.docs = event.info
                await self.query_one(DocumentBar).set_documents(self.docs)
                return
            paths = [s.path for s in self.docs.sources] if self.docs else []
            missing = [p for p in paths if not os.path.exists(p)]
            reason = _describe(event.error)
            if paths and not missing:
                self.notify(
                    f"The saved document session could not be used ({reason}); reading the documents again.",
                    severity="warning",
                    timeout=10,
                )
                self.doc_job = None
                self._start_prefill(paths)
                return
            self.store.clear_documents(job.chat_id)
            self.docs = None
            await self.query_one(DocumentBar).set_documents(None)
            gone = f" ({', '.join(missing)} no longer exist)" if missing else ""
            self.notify(
                f"The saved documents could not be restored: {reason}{gone}. They were removed from this chat.",
                severity="error",
                timeout=12,
            )
        finally:
            if self.doc_job is job:
                self.doc_job = None

    async def clear_documents(self) -> None:
        if self._refuse_if_busy():
            return
        self._remove_session(self.store.clear_documents(self.chat.id))
        self.docs = None
        await self.query_one(DocumentBar).set_documents(None)
        self._update_context_from_history()
        self.notify("Documents removed from this chat.")

    # -- copying ---------------------------------------------------------------

    def copy_last_reply(self) -> None:
        replies = [w for w in self.chat_view.messages if w.role == "assistant"]
        if not replies:
            self.notify("No reply to copy yet.", severity="warning")
            return
        self.app.copy_to_clipboard(replies[-1].content)
        self.notify("Last reply copied to the clipboard.")

    def code_blocks(self) -> list:
        """[(message_index, lang, code)] of the open chat, newest last."""
        out = []
        for i, w in enumerate(self.chat_view.messages):
            for lang, code in extract_code_blocks(w.content):
                out.append((i, lang, code))
        return out

    # -- slash commands ----------------------------------------------------

    async def run_command(self, line: str) -> bool:
        """Run a slash command; False (input kept) if it is not one."""
        try:
            parts = shlex.split(line)
        except ValueError as e:
            self.notify(f"Could not parse the command: {e}. To send it as a message, start it with //.", severity="error")
            return False
        cmd, args = parts[0].lower(), parts[1:]
        rest = line[len(parts[0]):].strip()
        if cmd in ("/load", "/attach"):
            if not args:
                self.action_attach()
            else:
                self.attach(args)
        elif cmd == "/docs":
            if self.docs:
                lines = [f"{s.label}: {s.tokens:,} tokens ({s.path})" for s in self.docs.sources]
                self.notify("\n".join(lines) + f"\nTotal {self.docs.token_count:,} tokens.", timeout=12)
            else:
                self.notify("No documents attached. Use /load PATH or Ctrl+O.")
        elif cmd == "/clear-docs":
            await self.clear_documents()
        elif cmd == "/new":
            await self.action_new_chat()
        elif cmd == "/rename":
            if rest:
                await self.rename_chat(self.chat.id, rest)
            else:
                self.action_rename_chat()
        elif cmd == "/delete":
            self.action_delete_chat()
        elif cmd == "/system":
            if not self._refuse_if_busy():
                self.change_settings(rest, self.chat.settings, "System prompt updated." if rest else "System prompt cleared.")
        elif cmd == "/export":
            self.export_chat(rest or None)
        elif cmd == "/search":
            self.action_search(rest)
        elif cmd == "/model":
            if rest:
                self.app.switch_model(rest)
            else:
                self.app.action_switch_model()
        elif cmd == "/set":
            self._set_setting(args)
        elif cmd == "/settings":
            self.action_settings()
        elif cmd in ("/regen", "/regenerate"):
            await self.action_regenerate()
        elif cmd == "/help":
            self.app.action_help()
        elif cmd in ("/quit", "/exit"):
            self.app.exit()
        else:
            self.notify(
                f"Unknown command {cmd}; your text is kept. To send a message that starts with /, "
                "begin it with // (//usr/bin sends /usr/bin). F1 lists the commands.",
                severity="warning",
                timeout=10,
            )
            return False
        return True

    def _set_setting(self, args: list) -> None:
        s = self.chat.settings.to_dict()
        if len(args) != 2 or args[0] not in s:
            self.notify(f"Usage: /set NAME VALUE with NAME one of {', '.join(s)}.", severity="warning")
            return
        name, raw = args
        try:
            s[name] = SamplingSettings.parse(name, raw)
        except ValueError as e:
            self.notify(f"Not changed: {e}.", severity="error")
            return
        self._save_settings(self.chat.id, self.chat.system_prompt, SamplingSettings.from_dict(s))
        self.notify(f"{name} = {s[name]}")

    # -- search, export --------------------------------------------------------

    def action_search(self, query: str = "") -> None:
        async def done(chat_id: Optional[int]) -> None:
            if chat_id is None:
                return
            if chat_id != (self.chat.id if self.chat else None) and self._refuse_if_busy():
                return
            await self.open_chat(chat_id)
            self.prompt.focus()

        self.app.push_screen(SearchDialog(self.store, query), done)

    def action_export(self) -> None:
        self.export_chat()

    def export_chat(self, path: Optional[str] = None) -> Optional[Path]:
        """Write the open chat as Markdown: to ``path``, or a new file named after the
        chat in the start directory (never over an existing one)."""
        chat = self.chat
        messages = self.store.list_messages(chat.id)
        if not messages:
            self.notify("Nothing to export yet.", severity="warning")
            return None
        if path:
            target = Path(os.path.expanduser(path))
            if not target.is_absolute():
                target = Path(self.app.start_dir) / target
            if target.is_dir():
                target = unique_path(target / f"{slug(chat.title)}.md")
        else:
            target = unique_path(Path(self.app.start_dir) / f"{slug(chat.title)}.md")
        text = chat_markdown(chat, messages, self.docs, self.engine.model_name)
        try:
            write_atomic(str(target), text)
        except OSError as e:
            self.notify(f"Could not export to {target}: {e.strerror or e}.", severity="error", timeout=12)
            return None
        self.notify(f"Chat exported to {target}.", timeout=10)
        return target


def _title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 40 else line[:39] + "…"


def _describe(err: BaseException) -> str:
    if isinstance(err, EngineError):
        return str(err)
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__



