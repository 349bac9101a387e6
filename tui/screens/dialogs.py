"""Small modal dialogs: confirm, text prompt, chat settings, file picker, search, model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from textual.binding import Binding
from textual.css.query import NoMatches
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label, ListItem, ListView, TextArea

from ..engine import SamplingSettings


class ConfirmDialog(ModalScreen[bool]):
    BINDINGS = [
        Binding("escape,n", "dismiss(False)", "No"),
        Binding("y", "dismiss(True)", "Yes"),
    ]
    # focused by Textual when the screen is shown; an on_mount query of "#no" raised when y or n
    # dismissed the dialog before it had mounted
    AUTO_FOCUS = "#no"

    def __init__(self, question: str, yes: str = "Delete"):
        super().__init__(classes="dialog-screen")
        self.question = question
        self.yes = yes

    def compose(self):
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-title", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button(f"{self.yes} (y)", variant="error", id="yes")
                yield Button("Cancel (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class TextPromptDialog(ModalScreen[Optional[str]]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str, value: str = ""):
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.value = value

    def compose(self):
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title", markup=False)
            yield Input(self.value, id="value")
            yield Label("Enter to confirm · Esc to cancel", classes="dialog-hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        value = event.value.strip()
        self.dismiss(value or None)


class SettingsDialog(ModalScreen[Optional[tuple]]):
    """System prompt and sampling settings of one chat."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("ctrl+s", "save", "Save", priority=True),
    ]

    FIELDS = [
        ("temperature", "Temperature"),
        ("top_p", "Top-p"),
        ("top_k", "Top-k (0 = off)"),
        ("min_p", "Min-p (0 = off)"),
        ("max_tokens", "Max reply tokens"),
        ("seed", "Seed (empty = random)"),
    ]

    def __init__(self, system_prompt: str, settings: SamplingSettings):
        super().__init__(classes="dialog-screen")
        self.system_prompt = system_prompt
        self.settings = settings

    def compose(self):
        # Scrolls, so a small terminal (60x20) still reaches every field and the buttons.
        with VerticalScroll(classes="dialog settings-dialog"):
            yield Label("Chat settings", classes="dialog-title")
            yield Label("System prompt")
            yield TextArea(self.system_prompt, id="system-prompt", soft_wrap=True)
            with Grid(classes="settings-grid"):
                for name, label in self.FIELDS:
                    value = getattr(self.settings, name)
                    yield Label(label)
                    yield Input("" if value is None else str(value), id=f"set-{name}")
            yield Label("", id="settings-error", classes="dialog-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (Ctrl+S)", variant="primary", id="save")
                yield Button("Cancel (Esc)", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.dismiss(None)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_save()

    def action_save(self) -> None:
        values, problems = {}, []
        for name, _ in self.FIELDS:
            try:
                values[name] = SamplingSettings.parse(name, self.query_one(f"#set-{name}", Input).value)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            error = self.query_one("#settings-error", Label)
            error.update("; ".join(problems))
            error.scroll_visible()
            return
        prompt = self.query_one("#system-prompt", TextArea).text
        self.dismiss((prompt, SamplingSettings(**values)))


class _VisibleTree(DirectoryTree):
    """Hides dot-files: .git, .venv and friends are never what one attaches."""

    def filter_paths(self, paths):
        return [p for p in paths if not p.name.startswith(".")]


class FilePickerDialog(ModalScreen[Optional[list]]):
    """Pick a file or directory: browse the tree, or type a path."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("ctrl+a", "attach_highlighted", "Attach highlighted", priority=True),
    ]
    AUTO_FOCUS = "#picker-path"  # (as ConfirmDialog: no on_mount query that Esc can outrun)

    def __init__(self, start: Optional[str] = None):
        super().__init__(classes="dialog-screen")
        self.start = Path(start or os.getcwd()).expanduser()
        self.highlighted: Optional[Path] = None

    def compose(self):
        with Vertical(classes="dialog picker-dialog"):
            yield Label("Attach a file or directory", classes="dialog-title")
            yield Input(placeholder="Path (Enter attaches; several: separate with spaces)", id="picker-path")
            yield _VisibleTree(self.start, id="picker-tree")
            yield Label(
                "Enter on a file attaches it · Ctrl+A attaches the highlighted file or directory · Esc cancels",
                classes="dialog-hint",
            )

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss([str(event.path)])

    def on_tree_node_highlighted(self, event) -> None:
        data = getattr(event.node, "data", None)
        if data is not None and hasattr(data, "path"):
            self.highlighted = Path(data.path)

    def action_attach_highlighted(self) -> None:
        if self.highlighted is not None:
            self.dismiss([str(self.highlighted)])

    def on_input_submitted(self, event: Input.Submitted) -> None:
        import shlex

        try:
            paths = shlex.split(event.value)
        except ValueError:
            paths = [event.value]
        if paths:
            self.dismiss(paths)


class SearchDialog(ModalScreen[Optional[int]]):
    """Search chat titles and messages; Enter opens the chosen chat."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]
    AUTO_FOCUS = "#search-query"

    def __init__(self, store, query: str = ""):
        super().__init__(classes="dialog-screen")
        self.store = store
        self.query_text = query

    def compose(self):
        with Vertical(classes="dialog search-dialog"):
            yield Label("Search chats", classes="dialog-title")
            yield Input(self.query_text, placeholder="Words in a chat title or message", id="search-query")
            yield ListView(id="search-results")
            yield Label("", id="search-count", classes="dialog-hint", markup=False)
            yield Label("Type to search · Down/Enter opens a chat · Esc cancels", classes="dialog-hint")

    async def on_mount(self) -> None:
        await self._search(self.query_text)

    async def on_input_changed(self, event: Input.Changed) -> None:
        await self._search(event.value)

    async def _search(self, query: str) -> None:
        hits = self.store.search(query) if query.strip() else []
        try:
            await self._show(query, hits)
        except NoMatches:  # dismissed (Esc) while the results were being drawn
            pass

    async def _show(self, query: str, hits) -> None:
        results = self.query_one("#search-results", ListView)
        await results.clear()
        items = []
        for hit in hits:
            lines = [Label(hit.chat.title, classes="search-title", markup=False)]
            if hit.snippet:
                lines.append(Label(hit.snippet, classes="search-snippet", markup=False))
            item = ListItem(*lines)
            item.chat_id = hit.chat.id
            items.append(item)
        if items:
            await results.extend(items)
            results.index = 0
        count = self.query_one("#search-count", Label)
        count.update(f"{len(hits)} chat{'s' if len(hits) != 1 else ''}" if query.strip() else "")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        results = self.query_one("#search-results", ListView)
        if results.highlighted_child is not None:
            self.dismiss(results.highlighted_child.chat_id)

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        self.dismiss(event.item.chat_id)

    def key_down(self) -> None:
        results = self.query_one("#search-results", ListView)
        if self.query_one("#search-query", Input).has_focus and results.children:
            results.focus()


class ModelDialog(ModalScreen[Optional[str]]):
    """Switch the model: type a path or repo id, or pick a recent one."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]
    AUTO_FOCUS = "#model-path"

    def __init__(self, current: str, recent: list):
        super().__init__(classes="dialog-screen")
        self.current = current
        self.recent = [m for m in recent if m != current]

    def compose(self):
        with Vertical(classes="dialog model-dialog"):
            yield Label("Switch the model", classes="dialog-title")
            yield Label(f"Now: {self.current}", classes="dialog-hint", markup=False)
            yield Input(placeholder="Model directory or Hugging Face repo id", id="model-path")
            if self.recent:
                yield Label("Recent models")
                yield ListView(*[ListItem(Label(m, markup=False), name=m) for m in self.recent], id="model-recent")
            yield Label("Enter loads it · Esc cancels", classes="dialog-hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        value = event.value.strip()
        self.dismiss(value or None)

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        self.dismiss(event.item.name)
