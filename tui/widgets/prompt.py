"""The message input: Enter sends, Shift+Enter or Ctrl+J inserts a newline."""
from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    NEWLINE_KEYS = ("shift+enter", "ctrl+j", "newline")

    class Submitted(Message):
        def __init__(self, prompt: "PromptInput", text: str):
            super().__init__()
            self.prompt = prompt
            self.text = text

    class EditLast(Message):
        """Up arrow in an empty input: edit the last message (as in Slack)."""

    def __init__(self, **kwargs):
        super().__init__(
            soft_wrap=True,
            show_line_numbers=False,
            tab_behavior="focus",
            placeholder="Message Kimi · Enter sends · Ctrl+J new line · /load PATH attaches documents",
            **kwargs,
        )

    def on_mount(self) -> None:
        # Headless (tests, snapshots): a blinking cursor makes screenshots flaky.
        if self.app.is_headless:
            self.cursor_blink = False

    async def _on_key(self, event: events.Key) -> None:
        # TextArea inserts "\n" on Enter; here Enter sends instead.
        # Handled here rather than as bindings so they keep their order with
        # the typed characters around them (bindings run out of band).
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in self.NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.action_newline()
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        start, end = self.selection
        self.replace("\n", start, end, maintain_selection_offset=False)

    def action_cursor_up(self, select: bool = False) -> None:
        if not self.text and not select:
            self.post_message(self.EditLast())
            return
        super().action_cursor_up(select)
