"""Shown instead of the chat when the model is missing or failed to load."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from textual.binding import Binding
from textual.containers import Center, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, Markdown

from kimi_mlx.runtime.model import ORIGINAL_MODEL

from ..engine import DEFAULT_MODEL, EngineError, ModelNotFoundError

CONVERT = """\
Convert and quantize it for MLX (much smaller and faster):

```
python convert.py --hf-path {repo} \\
    --mlx-path ~/models/kimi-linear-4bit -q
```

Then start `kimi-chat --model ~/models/kimi-linear-4bit`, or type the path below.
"""


def _repo(model: str) -> str:
    """``model`` if it reads as a Hugging Face repo id, else the default one."""
    return model if model.count("/") == 1 and not model.startswith((".", "/", "~")) else DEFAULT_MODEL


def _source(repo: str) -> str:
    """What convert.py should read: the default is already an MLX conversion, its source is the original."""
    return ORIGINAL_MODEL if repo == DEFAULT_MODEL else repo


def describe(error: Optional[BaseException]) -> str:
    if error is None:
        return ""
    if isinstance(error, EngineError):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def advice(model: str, error: Optional[BaseException]) -> tuple:
    """(title, Markdown advice) that fit what went wrong."""
    repo = _repo(model)
    download = f"```\nhf download {repo}\n```\n\n(`hf` comes with `pip install -U huggingface_hub`.)\n\n"
    if isinstance(error, ModelNotFoundError):
        if error.kind == "not_model_dir":
            return "Not a model directory", (
                "A model directory holds `config.json`, the `*.safetensors` weights, `tiktoken.model` "
                "and `tokenizer_config.json`: the output of `convert.py`, or a Hugging Face snapshot. "
                "Type the path of such a directory below.\n\nTo get one, download the model:\n\n" + download
                + CONVERT.format(repo=_source(repo))
            )
        return "No model found", "Download the model from Hugging Face:\n\n" + download + CONVERT.format(repo=_source(repo))
    text = describe(error)
    cause = getattr(error, "__cause__", None)
    if isinstance(cause, FileNotFoundError) or "missing" in text or "No such file" in text:
        where = Path(model).expanduser()
        return "The model is incomplete", (
            f"A file the model needs is missing from `{where}` (named above). "
            "If it is a Hugging Face download, fetch it again; this downloads only what is missing:\n\n"
            + download
            + "If it came from `convert.py`, convert again: it copies the tokenizer files next to the weights."
        )
    if "download" in text.lower():
        return "The model could not be downloaded", (
            "Check the network connection and the free disk space, then download it again:\n\n" + download
        )
    return "The model failed to load", (
        "The files may be damaged, or made for another model or release. Download or convert the model "
        "again:\n\n" + download + CONVERT.format(repo=_source(repo))
    )


class NoModelScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "browse", "Browse chats"),
        Binding("ctrl+q", "app.quit", "Quit", priority=True),
    ]

    def __init__(self, model: str, error: Optional[BaseException]):
        super().__init__()
        self.model = model
        self.error = error
        self.title_text, self.advice = advice(model, error)

    def compose(self):
        with Center():
            # Scrolls: a long error and its advice still fit a small terminal.
            with VerticalScroll(classes="no-model-box"):
                yield Label(f"kimi-chat · {self.title_text}", classes="no-model-title")
                yield Label(f"Model: {self.model}", classes="no-model-line", markup=False)
                yield Label(describe(self.error), classes="no-model-reason", markup=False)
                yield Markdown(self.advice)
                yield Input(placeholder="Model directory or Hugging Face repo id", id="model-path")
                yield Label("Enter loads it · Esc browses old chats (F4 comes back here) · Ctrl+Q quits", classes="no-model-hint")
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
