"""Shown instead of the chat when the model is missing or failed to load."""
from __future__ import annotations

from textual.binding import Binding
from textual.containers import Center, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, Markdown

from ..engine import DEFAULT_MODEL

INSTRUCTIONS = f"""\
Download the model from Hugging Face:

```
huggingface-cli download {DEFAULT_MODEL}
```

Convert and quantize it for MLX (much smaller and faster):

```
python convert.py --hf-path {DEFAULT_MODEL} \\
    --mlx-path ~/models/kimi-linear-4bit -q
```

Then start `kimi-chat --model ~/models/kimi-linear-4bit`, or type the path below.
"""


class NoModelScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "browse", "Browse chats"),
        Binding("ctrl+q", "app.quit", "Quit", priority=True),
    ]

    def __init__(self, model: str, reason: str, missing: bool = True):
        super().__init__()
        self.model = model
        self.reason = reason
        self.missing = missing

    def compose(self):
        title = "No model found" if self.missing else "The model failed to load"
        with Center():
            with Vertical(classes="no-model-box"):
                yield Label(f"kimi-chat · {title}", classes="no-model-title")
                yield Label(f"Model: {self.model}", classes="no-model-line", markup=False)
                yield Label(self.reason, classes="no-model-reason", markup=False)
                yield Markdown(INSTRUCTIONS)
                yield Input(placeholder="Model directory or Hugging Face repo id", id="model-path")
                yield Label("Enter loads it · Esc browses old chats · Ctrl+Q quits", classes="no-model-hint")
        yield Footer()

    def on_mount(self) -> None:
        model_input = self.query_one("#model-path", Input)
        if self.app.is_headless:  # steady screenshots in tests
            model_input.cursor_blink = False
        model_input.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        path = event.value.strip()
        if path:
            self.app.switch_model(path)

    def action_browse(self) -> None:
        self.dismiss(None)
