"""The scrolling list of messages, and the "generating" indicator under it."""
from __future__ import annotations

import time
from typing import Optional

from textual.containers import VerticalScroll
from textual.widgets import Static

from .message import MessageWidget

EMPTY_TEXT = (
    "Start a conversation: type below and press Enter.\n"
    "Attach documents with Ctrl+O or /load PATH; F1 shows every key."
)


class ChatView(VerticalScroll, can_focus=False):
    """Messages in order; sticks to the bottom while a reply streams in."""

    def compose(self):
        yield Static(EMPTY_TEXT, classes="empty-chat")

    def on_mount(self) -> None:
        self.anchor()

    @property
    def messages(self) -> list:
        return list(self.query(MessageWidget))

    def refresh_empty(self) -> None:
        self.query_one(".empty-chat").display = not self.query(MessageWidget)

    async def set_messages(self, messages) -> None:
        await self.query(MessageWidget).remove()
        widgets = [MessageWidget(m.role, m.content, m.status, m.id) for m in messages]
        if widgets:
            await self.mount_all(widgets)
        self.refresh_empty()
        self.scroll_end(animate=False)
        self.anchor()

    async def add_message(self, role: str, content: str = "", status: str = "ok", message_id: Optional[int] = None) -> MessageWidget:
        w = MessageWidget(role, content, status, message_id)
        await self.mount(w)
        self.refresh_empty()
        self.scroll_end(animate=False)
        self.anchor()
        return w

    async def remove_from(self, widget: MessageWidget) -> None:
        """Remove ``widget`` and every message after it."""
        msgs = self.messages
        if widget in msgs:
            await self.remove_children(msgs[msgs.index(widget):])
        self.refresh_empty()


class GeneratingIndicator(Static):
    """A spinner line shown only while the model works."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, **kwargs):
        super().__init__("", markup=False, **kwargs)
        self._text = ""
        self._frame = 0
        self._timer = None
        self.started_at = 0.0

    def on_mount(self) -> None:
        self.display = False

    def start(self, text: str) -> None:
        self._text = text
        self.started_at = time.monotonic()
        self.display = True
        if self._timer is None:
            self._timer = self.set_interval(0.1, self._tick)
        self._render_line()

    def set_text(self, text: str) -> None:
        self._text = text
        self._render_line()

    def stop(self) -> None:
        self.display = False
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    @property
    def text(self) -> str:
        return self._text

    def _tick(self) -> None:
        self._frame = (self._frame + 1) % len(self.FRAMES)
        self._render_line()

    def _render_line(self) -> None:
        # One line of fixed height: no layout pass (a full-screen reflow per spinner tick).
        self.update(f"{self.FRAMES[self._frame]} {self._text}", layout=False)
