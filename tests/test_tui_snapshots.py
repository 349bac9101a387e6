"""Snapshot tests of kimi-chat's screens (pytest-textual-snapshot; update with --snapshot-update)."""
from __future__ import annotations

import asyncio
import time

from tui.app import KimiChatApp
from tui.engine import FakeEngine
from tui.screens.no_model import NoModelScreen

SIZE = (110, 34)


async def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _ready(app):
    await _wait(lambda: app.engine_state == "ready" and app.chat_screen and app.chat_screen.chat)
    # notify() posts a message: wait for the toast to exist before clearing it
    await _wait(lambda: any("loaded" in n.message for n in app._notifications))


def _app(tmp_path, engine=None):
    return KimiChatApp(engine or FakeEngine(), data_dir=tmp_path / "data", start_dir=str(tmp_path))


def test_main_screen(snap_compare, tmp_path):
    """A chat with an attached document (chip + token count), a streamed reply with a
    highlighted code block, the sidebar and the status bar."""
    doc = tmp_path / "report.md"
    doc.write_text("# Quarterly report\n\n" + "Revenue grew in every region. " * 200)

    async def run_before(pilot):
        app = pilot.app
        await _ready(app)
        screen = app.chat_screen
        screen.attach([str(doc)])
        await _wait(lambda: screen.doc_job is None)
        prompt = screen.prompt
        prompt.post_message(prompt.Submitted(prompt, "What does the report say about revenue?"))
        await _wait(lambda: screen.replies_done == 1)
        app.clear_notifications()
        prompt.focus()

    assert snap_compare(_app(tmp_path), terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare, tmp_path):
    async def run_before(pilot):
        app = pilot.app
        await _ready(app)
        app.clear_notifications()

    assert snap_compare(_app(tmp_path), press=["f1"], terminal_size=SIZE, run_before=run_before)


def test_no_model_screen(snap_compare, tmp_path):
    async def run_before(pilot):
        app = pilot.app
        await _wait(lambda: isinstance(app.screen, NoModelScreen))
        app.clear_notifications()

    app = _app(tmp_path, FakeEngine(model_name="moonshotai/Kimi-Linear-48B-A3B-Instruct", missing=True))
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
