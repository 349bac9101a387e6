"""Streaming a reply costs the app little: screen updates are batched, not one per token.

``python tests/test_tui_render.py`` measures the cost (a 613-token reply through the
fake engine, paced like the real one, alone and in the app); the test counts renders.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import time

from tui.app import KimiChatApp
from tui.engine import FakeEngine, SamplingSettings
from tui.widgets.message import MessageWidget
from tui.widgets.status_bar import StatusBar


def long_reply(messages, documents) -> str:
    """About 613 fake tokens of everyday Markdown: paragraphs, a list, a code block."""
    para = "The cache keeps the keys and values of every earlier token, so each new token costs one step. "
    parts = ["## Answer\n\n", para * 9, "\n\n"]
    parts += [f"- point {i}: {para[:60]}\n" for i in range(15)]
    parts.append("\n```python\n" + "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(12)) + "```\n\n")
    parts += [para * 9, "Almost there.\n\nDone."]
    return "".join(parts)


def count_tokens(text: str) -> int:
    from tui.engine.fake import _TOKEN_RE

    return len(_TOKEN_RE.findall(text))


class TimedEngine(FakeEngine):
    """Notes when the first and the last token left the engine."""

    def stream_reply(self, *args, **kw):
        for d in super().stream_reply(*args, **kw):
            self.first = getattr(self, "first", None) or time.perf_counter()
            yield d
        self.last = time.perf_counter()


async def stream_in_app(tmp_path, token_delay: float) -> tuple:
    """(wall seconds from sending a message to the saved reply, of which streaming
    from the first to the last token, UI-thread CPU seconds)."""
    engine = TimedEngine(token_delay=token_delay, reply=long_reply)
    app = KimiChatApp(engine, data_dir=tmp_path / "data", start_dir=str(tmp_path))
    async with app.run_test(size=(110, 34)):
        while not (app.engine_state == "ready" and app.chat_screen and app.chat_screen.chat):
            await asyncio.sleep(0.01)
        screen = app.chat_screen
        prompt = screen.prompt
        t0, c0 = time.perf_counter(), time.thread_time()
        prompt.post_message(prompt.Submitted(prompt, "explain the cache"))
        while screen.replies_done < 1:
            await asyncio.sleep(0.01)
        elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
        assert screen.chat_view.messages[-1].content == long_reply(None, None)
    return elapsed, engine.last - engine.first, cpu


def test_screen_updates_are_batched_not_per_token(tmp_path, monkeypatch):
    appends, status = [], []
    orig_append, orig_update = MessageWidget.append, StatusBar.update_from

    async def spy_append(self, text):
        appends.append(text)
        return await orig_append(self, text)

    def spy_update(self, delta):
        status.append(delta)
        return orig_update(self, delta)

    monkeypatch.setattr(MessageWidget, "append", spy_append)
    monkeypatch.setattr(StatusBar, "update_from", spy_update)
    tokens = count_tokens(long_reply(None, None))
    elapsed, _, _ = asyncio.run(stream_in_app(tmp_path, token_delay=0.0005))
    assert tokens > 600 and "".join(appends) == long_reply(None, None)
    # at most one update per render interval (50 ms), plus the final one
    from tui.screens.chat import RENDER_INTERVAL

    limit = elapsed / RENDER_INTERVAL + 3
    assert len(appends) <= limit and len(status) <= limit, (len(appends), len(status), elapsed)
    assert len(appends) / tokens < 0.1, f"{len(appends)} renders for {tokens} tokens"


def measure(token_delay: float = 1.46 / 613, runs: int = 3) -> None:
    """Wall time varies with the machine's load; the UI thread's CPU time is the cost."""
    import tempfile
    from pathlib import Path

    tokens = count_tokens(long_reply(None, None))
    engine = TimedEngine(token_delay=token_delay, reply=long_reply)
    for _ in engine.stream_reply([], SamplingSettings(), None, threading.Event()):
        pass
    alone = engine.last - engine.first
    results = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as d:
            results.append(asyncio.run(stream_in_app(Path(d), token_delay)))
    wall, stream, cpu = (min(r[i] for r in results) for i in range(3))
    print(f"{tokens} tokens: engine alone {alone:.2f} s; in the app (best of {runs}) first to last token "
          f"{stream:.2f} s ({100 * (stream / alone - 1):+.0f} %), send to saved reply {wall:.2f} s; "
          f"UI thread CPU {cpu:.2f} s ({1000 * cpu / tokens:.2f} ms/token)")


if __name__ == "__main__":
    measure(*(float(a) for a in sys.argv[1:2]))
