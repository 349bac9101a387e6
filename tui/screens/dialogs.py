"""Small modal dialogs: confirm, text prompt, chat settings, file picker."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label, TextArea

from ..engine import SamplingSettings


class ConfirmDialog(ModalScreen[bool]):
    BINDINGS = [
        Binding("escape,n", "dismiss(False)", "No"),
        Binding("y", "dismiss(True)", "Yes"),
    ]

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

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

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
        ("temperature", "Temperature", float),
        ("top_p", "Top-p", float),
        ("top_k", "Top-k (0 = off)", int),
        ("min_p", "Min-p (0 = off)", float),
        ("max_tokens", "Max reply tokens", int),
        ("seed", "Seed (empty = random)", int),
    ]

    def __init__(self, system_prompt: str, settings: SamplingSettings):
        super().__init__(classes="dialog-screen")
        self.system_prompt = system_prompt
        self.settings = settings

    def compose(self):
        with Vertical(classes="dialog settings-dialog"):
            yield Label("Chat settings", classes="dialog-title")
            yield Label("System prompt")
            yield TextArea(self.system_prompt, id="system-prompt", soft_wrap=True)
            with Grid(classes="settings-grid"):
                for name, label, _ in self.FIELDS:
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
        values = {}
        for name, label, typ in self.FIELDS:
            raw = self.query_one(f"#set-{name}", Input).value.strip()
            if name == "seed" and not raw:
                values[name] = None
                continue
            try:
                values[name] = typ(raw)
            except ValueError:
                self.query_one("#settings-error", Label).update(f"{label}: {raw!r} is not a number")
                return
        problems = []
        if values["temperature"] < 0:
            problems.append("temperature must be ≥ 0")
        if not 0 < values["top_p"] <= 1:
            problems.append("top-p must be in (0, 1]")
        if values["top_k"] < 0 or not 0 <= values["min_p"] < 1:
            problems.append("top-k must be ≥ 0 and min-p in [0, 1)")
        if values["max_tokens"] < 1:
            problems.append("max tokens must be ≥ 1")
        if problems:
            self.query_one("#settings-error", Label).update("; ".join(problems))
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

    def on_mount(self) -> None:
        self.query_one("#picker-path", Input).focus()

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
