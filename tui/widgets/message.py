"""One chat message: a header line and a body.  Replies are Markdown (streamed
into); the user's own text is shown as typed, line breaks and all."""
from __future__ import annotations

import re
from typing import Optional

from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

ROLE_NAMES = {"user": "You", "assistant": "Kimi", "system": "System"}
STATUS_NOTES = {
    "cancelled": "cancelled",
    "error": "error",
    "length": "stopped at max tokens",
    "streaming": "",
}

# ``` or ~~~ fences, optional language; the closing fence must match the opener.
_FENCE_RE = re.compile(r"^(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^\n`]*)\n(?P<code>.*?)^(?P=fence)[ \t]*$", re.M | re.S)


def extract_code_blocks(markdown: str) -> list:
    """[(language, code)] for every fenced code block, in order."""
    return [(m.group("lang").strip(), m.group("code")) for m in _FENCE_RE.finditer(markdown)]


class MessageWidget(Vertical, can_focus=True):
    """Focusable so the keyboard can reach it: c copies, y copies code blocks."""

    BINDINGS = [
        Binding("c", "copy", "Copy"),
        Binding("y", "copy_code", "Copy code"),
        Binding("e", "edit", "Edit", show=False),
        Binding("r", "regenerate", "Regenerate", show=False),
    ]

    status: reactive[str] = reactive("ok")

    class EditRequested(Message):
        def __init__(self, widget: "MessageWidget"):
            super().__init__()
            self.widget = widget

    class RegenerateRequested(Message):
        def __init__(self, widget: "MessageWidget"):
            super().__init__()
            self.widget = widget

    def __init__(self, role: str, content: str = "", status: str = "ok", message_id: Optional[int] = None):
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.message_id = message_id
        self._stream: Optional[MarkdownStream] = None
        self._code_index = 0
        self.set_reactive(MessageWidget.status, status)

    def compose(self):
        yield Label(self._header_text(), classes="message-header", markup=False)
        if self.role == "user":
            yield Static(self.content, classes="message-body", markup=False)
        else:
            yield Markdown(self.content, classes="message-body")

    @property
    def body(self):
        return self.query_one(".message-body")

    def _header_text(self) -> str:
        note = STATUS_NOTES.get(self.status, "")
        name = ROLE_NAMES.get(self.role, self.role)
        return f"{name} · {note}" if note else name

    def watch_status(self, status: str) -> None:
        self.set_class(status == "cancelled", "-cancelled")
        self.set_class(status == "error", "-error")
        if self.is_mounted:
            self.query_one(".message-header", Label).update(self._header_text())

    # -- streaming -----------------------------------------------------------

    def start_stream(self) -> None:
        # MarkdownStream coalesces fragments and calls Markdown.append, which
        # re-parses only the last block: no full re-render per token.
        self.status = "streaming"
        self._stream = Markdown.get_stream(self.body)

    async def append(self, text: str) -> None:
        self.content += text
        if self._stream is not None:
            await self._stream.write(text)

    async def finish(self, status: str) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.status = status

    # -- actions -------------------------------------------------------------

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.content)
        self.notify("Message copied to the clipboard.")

    def action_copy_code(self) -> None:
        blocks = extract_code_blocks(self.content)
        if not blocks:
            self.notify("No code block in this message.", severity="warning")
            return
        # Repeated presses walk through the blocks.
        i = self._code_index % len(blocks)
        self._code_index += 1
        lang, code = blocks[i]
        self.app.copy_to_clipboard(code)
        self.notify(f"Code block {i + 1}/{len(blocks)}{f' ({lang})' if lang else ''} copied.")

    def action_edit(self) -> None:
        if self.role == "user":
            self.post_message(self.EditRequested(self))

    def action_regenerate(self) -> None:
        if self.role == "assistant":
            self.post_message(self.RegenerateRequested(self))
