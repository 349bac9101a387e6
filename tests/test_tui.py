"""kimi-chat (tui/) driven headlessly with a scripted FakeEngine: no model, no torch, CPU only."""
from __future__ import annotations

import asyncio
import functools
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tui.app import KimiChatApp
from tui.engine import (
    ChatMessage,
    DocumentInfo,
    Engine,
    FakeEngine,
    KimiEngine,
    ModelNotFoundError,
    PrefillCancelled,
    SamplingSettings,
    resolve_model_path,
)
from tui.screens.chat import ChatScreen
from tui.screens.no_model import NoModelScreen
from tui.store import DB_NAME, SCHEMA_VERSION, Store, StoreTooNewError, default_data_dir
from tui.widgets.documents import DocumentChip
from tui.widgets.message import extract_code_blocks
from tui.widgets.progress import PrefillPanel

SIZE = (100, 32)


def aio(fn):
    """Run an async test with asyncio.run (no pytest-asyncio/anyio plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


# -- helpers -------------------------------------------------------------------


async def wait_until(pilot, pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        # not pilot.pause(): that waits for idle, i.e. for a whole streamed reply
        await asyncio.sleep(0.02)


def notes(app) -> list:
    return [n.message for n in app._notifications]


async def note(pilot, pred) -> str:
    """Wait for a notification (notify() posts a message: it lands a moment later)."""
    if isinstance(pred, str):
        text = pred
        pred = lambda n: text in n  # noqa: E731
    await wait_until(pilot, lambda: any(pred(n) for n in notes(pilot.app)), what=f"notification ({notes(pilot.app)})")
    return next(n for n in notes(pilot.app) if pred(n))


def chat(app) -> ChatScreen:
    return app.chat_screen


def messages(app) -> list:
    return chat(app).chat_view.messages


async def ready(pilot):
    app = pilot.app
    await wait_until(pilot, lambda: app.engine_state != "loading" and chat(app) is not None and chat(app).chat is not None, what="engine")


async def settle(pilot):
    # pilot.pause() with no delay waits for the CPU to go idle (up to 1 s),
    # which on a busy machine is most of a test's time.
    await pilot.pause(0.05)


async def send(pilot, text: str, wait: bool = True):
    """What typing ``text`` and Enter does (Enter itself is tested separately):
    pilot.press waits for the CPU to go idle, i.e. past the streaming we observe."""
    app = pilot.app
    before = chat(app).replies_done
    prompt = chat(app).prompt
    prompt.text = text
    prompt.post_message(prompt.Submitted(prompt, text))
    if wait:
        await wait_until(pilot, lambda: chat(app).replies_done > before, what="reply")


def make_app(tmp_path, engine=None, **kw) -> KimiChatApp:
    return KimiChatApp(engine or FakeEngine(), data_dir=tmp_path / "data", start_dir=str(tmp_path), **kw)


@pytest.fixture
def doc(tmp_path) -> Path:
    p = tmp_path / "notes.md"
    p.write_text("# Notes\n\n" + "The quick brown fox jumps over the lazy dog. " * 120)
    return p


# -- engine interface --------------------------------------------------------


def test_engines_satisfy_protocol():
    assert isinstance(FakeEngine(), Engine)
    assert isinstance(KimiEngine("/nonexistent"), Engine)  # constructing imports no mlx


def test_import_is_light():
    code = "import sys, tui.app, tui.__main__; bad = [m for m in ('torch', 'mlx.core') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_fake_engine_streams_and_cancels(tmp_path, doc):
    eng = FakeEngine(token_delay=0)
    msgs = [ChatMessage("user", "hi")]
    deltas = list(eng.stream_reply(msgs, SamplingSettings(), None, threading.Event()))
    assert deltas[-1].finish_reason == "stop" and "hi" in "".join(d.text for d in deltas)
    cancel = threading.Event()
    it = eng.stream_reply([ChatMessage("user", "[[long]]")], SamplingSettings(), None, cancel)
    got = [next(it) for _ in range(3)]
    cancel.set()
    assert len(got) + len(list(it)) < 10
    short = list(eng.stream_reply(msgs, SamplingSettings(max_tokens=3), None, threading.Event()))
    assert len(short) == 3 and short[-1].finish_reason == "length"
    # prefill: progress, cancel, snapshot that opens again
    seen = []
    info = eng.prefill_documents([str(doc)], str(tmp_path / "s.session"), seen.append, threading.Event())
    assert seen[-1].stage == "saving" and any(p.stage == "prefill" for p in seen)
    assert info.token_count == info.sources[0].tokens > 1000
    reopened = eng.open_documents(DocumentInfo(info.sources, info.token_count, info.session_path))
    assert reopened.handle is not None
    stop = threading.Event()
    stop.set()
    with pytest.raises(PrefillCancelled):
        eng.prefill_documents([str(doc)], str(tmp_path / "t.session"), lambda p: None, stop)
    assert not (tmp_path / "t.session").exists()


def test_resolve_model_path_never_downloads(tmp_path):
    with pytest.raises(ModelNotFoundError):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path / "m")) == str(tmp_path / "m")


# -- store -----------------------------------------------------------------------


def test_store_persists_and_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_MLX_HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home"
    s = Store.open_default()
    assert s.schema_version == SCHEMA_VERSION
    c = s.create_chat("first", "be brief", SamplingSettings(temperature=0.2, seed=7))
    s.add_message(c.id, "user", "hello")
    s.add_message(c.id, "assistant", "partial", "cancelled", {"context_tokens": 12})
    # No close(): a crash after a committed write keeps it.
    s2 = Store.open_default()
    [c2] = s2.list_chats()
    assert (c2.title, c2.system_prompt, c2.settings.temperature, c2.settings.seed) == ("first", "be brief", 0.2, 7)
    got = s2.list_messages(c.id)
    assert [(m.role, m.content, m.status) for m in got] == [("user", "hello", "ok"), ("assistant", "partial", "cancelled")]
    assert got[1].meta == {"context_tokens": 12}
    # A failing write rolls back and leaves earlier messages alone.
    with pytest.raises(sqlite3.IntegrityError):
        s2.add_message(9999, "user", "orphan")  # foreign key
    assert len(s2.list_messages(c.id)) == 2
    s2.delete_messages_from(c.id, got[1].id)
    assert [m.content for m in s2.list_messages(c.id)] == ["hello"]
    s2.delete_chat(c.id)
    assert s2.list_chats() == [] and s2.list_messages(c.id) == []


def test_store_refuses_newer_schema(tmp_path):
    db = tmp_path / DB_NAME
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(StoreTooNewError):
        Store(db)
    app = KimiChatApp(FakeEngine(), data_dir=tmp_path)
    assert app.store.path == ":memory:" and "newer" in app.startup_notices[0]


def test_store_migrates_old_database(tmp_path, monkeypatch):
    import tui.store as store_mod

    db = tmp_path / DB_NAME
    Store(db).create_chat("kept")
    # A later release adds a migration: the existing data must survive it.
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS + ["ALTER TABLE chats ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0"])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    s = Store(db)
    assert s.schema_version == SCHEMA_VERSION + 1
    assert [c.title for c in s.list_chats()] == ["kept"]
    assert s.conn.execute("SELECT pinned FROM chats").fetchone()[0] == 0


@aio
async def test_corrupt_database_is_backed_up_and_reported(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / DB_NAME).write_bytes(b"this is not a database" * 100)
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        backups = list(data.glob(DB_NAME + ".corrupt-*"))
        assert len(backups) == 1 and backups[0].read_bytes().startswith(b"this is not")
        await note(pilot, lambda n: "could not be read" in n and str(backups[0]) in n)
        await send(pilot, "still works?")
        assert messages(app)[-1].status == "ok"


# -- chatting ------------------------------------------------------------------


@aio
async def test_send_streams_reply_incrementally(tmp_path, monkeypatch):
    from textual.widgets import Markdown

    appended, replaced = [], []
    orig_append, orig_update = Markdown.append, Markdown.update

    def spy_append(self, text):
        appended.append(text)
        return orig_append(self, text)

    def spy_update(self, text):
        if text:
            replaced.append(text)
        return orig_update(self, text)

    monkeypatch.setattr(Markdown, "append", spy_append)
    monkeypatch.setattr(Markdown, "update", spy_update)
    base = FakeEngine()._reply_text
    engine = FakeEngine(token_delay=0.01, reply=lambda m, d: base(m, d) + " filler" * 60 + "\n\nDone.")
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Write hello world", wait=False)
        await wait_until(pilot, lambda: len(messages(app)) == 2 and messages(app)[1].content, what="first delta")
        reply = messages(app)[1]
        assert reply.status == "streaming" and chat(app).indicator.display
        await wait_until(pilot, lambda: chat(app).generation is None, what="reply end")
        assert reply.status == "ok" and not chat(app).indicator.display
        assert reply.content.startswith("You asked: *Write hello world*") and reply.content.endswith("Done.")
        # streamed by appending fragments, never by re-rendering the whole reply
        assert len(appended) >= 2 and "".join(appended) == reply.content
        assert replaced == []  # never re-rendered whole (the user's own message is plain text)
        # the code block is rendered (and highlighted) as a fence
        assert reply.body.query("MarkdownFence")
        assert engine.last_messages[0].role == "system" and engine.last_messages[-1].content == "Write hello world"
        stored = app.store.list_messages(chat(app).chat.id)
        assert [(m.role, m.status) for m in stored] == [("user", "ok"), ("assistant", "ok")]
        assert stored[1].meta["context_tokens"] == chat(app).status_bar.context_tokens > 0
        bar = str(chat(app).status_bar.render())
        assert "fake-kimi" in bar and "/ 32,768" in bar and "42.0 tok/s" in bar and "1.50 GB" in bar
        # the chat got a title from the first message
        assert chat(app).chat.title == "Write hello world"


@aio
async def test_escape_cancels_mid_stream_and_keeps_partial(tmp_path):
    engine = FakeEngine(token_delay=0.005)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "tell me a lot [[long]]", wait=False)
        await wait_until(pilot, lambda: len(messages(app)) == 2 and "word5 " in messages(app)[1].content, what="stream")
        await pilot.press("escape")
        await wait_until(pilot, lambda: chat(app).generation is None, what="cancel")
        reply = messages(app)[1]
        assert reply.status == "cancelled" and "cancelled" in str(reply.query_one(".message-header").render())
        assert "word1999" not in reply.content and "Done." not in reply.content
        stored = app.store.list_messages(chat(app).chat.id)[-1]
        assert (stored.status, stored.content) == ("cancelled", reply.content)
        await note(pilot, "partial reply was kept")
        # the app carries on: the next message works and sees the partial reply in its history
        await send(pilot, "and now?")
        assert messages(app)[-1].status == "ok" and len(messages(app)) == 4
        # quitting mid-reply keeps the partial reply too
        await send(pilot, "one more [[long]]", wait=False)
        await wait_until(pilot, lambda: len(messages(app)) == 6 and "word5 " in messages(app)[5].content, what="stream")
        chat_id = chat(app).chat.id
    assert engine.closed
    last = Store.open_default(tmp_path / "data").list_messages(chat_id)[-1]
    assert last.status == "cancelled" and "word5 " in last.content and "word1999" not in last.content


@aio
async def test_regenerate_edit_and_errors(tmp_path):
    engine = FakeEngine()
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "first question")
        first_id = messages(app)[1].message_id
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: chat(app).replies_done == 2, what="regenerate")
        assert messages(app)[-1].message_id not in (None, first_id)
        assert [m.role for m in messages(app)] == ["user", "assistant"] and engine.reply_count == 2
        # Up in the empty input edits the last message; Enter resends it
        await pilot.press("up")
        assert chat(app).prompt.text == "first question" and chat(app).editing_id is not None
        chat(app).prompt.text = "edited question"
        await pilot.press("enter")  # the real key, once
        await wait_until(pilot, lambda: chat(app).replies_done == 3, what="resend")
        assert len(messages(app)) == 2 and messages(app)[1].status == "ok"
        assert messages(app)[0].content == "edited question"
        assert [m.content for m in app.store.list_messages(chat(app).chat.id)][0] == "edited question"
        assert "edited question" in messages(app)[1].content
        # an engine failure mid-reply: marked, reported, excluded from history
        await send(pilot, "please fail [[error]]")
        assert messages(app)[-1].status == "error"
        await note(pilot, "fake engine failure")
        await send(pilot, "after the failure")
        assert all("[[error]]" not in m.content or m.role == "user" for m in engine.last_messages)
        assert not any(m.role == "assistant" and "please fail" in m.content for m in engine.last_messages)


@aio
async def test_copy_message_and_code_block(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "code please")
        reply = messages(app)[1]
        reply.focus()
        await pilot.press("c")
        assert app.clipboard == reply.content
        await pilot.press("y")
        assert app.clipboard == 'def hello():\n    return "hi"\n'
    assert extract_code_blocks("a\n```py\nx = 1\n```\nb\n~~~\ny\n~~~\n") == [("py", "x = 1\n"), ("", "y\n")]


@aio
async def test_command_palette_lists_and_runs_actions(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "hello")
        from tui.app import KimiCommands

        names = [c[0] for c in KimiCommands(app.screen)._commands()]
        for want in ("New chat", "Attach documents", "Delete chat", "Rename chat", "Regenerate reply", "Chat settings", "Help", "Quit"):
            assert want in names
        assert any(n.startswith("Copy code block: python") for n in names)
        before = len(app.store.list_chats())
        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        app.screen.query_one("Input").value = "new chat"
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(app.store.list_chats()) == before + 1, what="palette new chat")
        assert messages(app) == []


@aio
async def test_help_and_keyboard_newline(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("f1")
        await settle(pilot)
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, ChatScreen)
        await pilot.press("a", "ctrl+j", "b")
        assert chat(app).prompt.text == "a\nb"
        # Ctrl+C with nothing running is not a quit and not an error
        await pilot.press("ctrl+c")
        await settle(pilot)
        assert app.is_running and chat(app).prompt.text == "a\nb"


# -- chats: restart, switch, rename, delete --------------------------------------


@aio
async def test_restart_finds_conversation_and_switches_chats(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "remember me")
        await pilot.press("ctrl+n")
        await settle(pilot)
        await send(pilot, "second chat")
    app2 = make_app(tmp_path)
    async with app2.run_test(size=SIZE) as pilot:
        await ready(pilot)
        sidebar = chat(app2).query_one("Sidebar")
        assert [i.title for i in sidebar.items] == ["second chat", "remember me"]
        assert messages(app2)[0].content == "second chat"  # most recent chat opens
        sidebar.list_view.focus()
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: messages(app2) and messages(app2)[0].content == "remember me", what="switch")
        assert [m.role for m in messages(app2)] == ["user", "assistant"]
        # rename from the sidebar (r) and from a command
        sidebar.list_view.focus()
        await pilot.press("r")
        await settle(pilot)
        app2.screen.query_one("Input").value = "Renamed"
        await pilot.press("enter")
        await wait_until(pilot, lambda: chat(app2).chat.title == "Renamed", what="rename")
        chat(app2).prompt.focus()
        await send(pilot, "/rename Via command", wait=False)
        # the command is handled after the keypresses: wait for it, as for the sidebar rename above
        await wait_until(pilot, lambda: app2.store.get_chat(chat(app2).chat.id).title == "Via command",
                         what="rename by command")
        assert app2.store.get_chat(chat(app2).chat.id).title == "Via command"


@aio
async def test_delete_chat(tmp_path, doc):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "keep this one")
        await pilot.press("ctrl+n")
        await settle(pilot)
        chat(app).attach([str(doc)])
        await wait_until(pilot, lambda: chat(app).doc_job is None, what="prefill")
        await send(pilot, "delete this one")
        doomed = chat(app).chat.id
        session = Path(app.store.get_documents(doomed).session_path)
        assert session.exists()
        await pilot.press("f8")
        await settle(pilot)
        await pilot.press("n")  # says no first
        await settle(pilot)
        assert app.store.get_chat(doomed) is not None
        await pilot.press("f8")
        await settle(pilot)
        await pilot.press("y")
        await wait_until(pilot, lambda: app.store.get_chat(doomed) is None, what="delete")
        await settle(pilot)
        assert not session.exists()
        assert [c.title for c in app.store.list_chats()] == ["keep this one"]
        assert chat(app).chat.title == "keep this one" and messages(app)[0].content == "keep this one"
        assert [i.title for i in chat(app).query_one("Sidebar").items] == ["keep this one"]


# -- documents -----------------------------------------------------------------


@aio
async def test_attach_document_shows_progress_chip_and_is_reused(tmp_path, doc):
    engine = FakeEngine(prefill_step=32, prefill_delay=0.01)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, f"/load {doc}", wait=False)
        panel = chat(app).query_one(PrefillPanel)
        await wait_until(pilot, lambda: panel.last is not None and panel.last.stage == "prefill" and panel.last.done > 0, what="progress")
        assert panel.display
        detail = str(panel.query_one("#prefill-detail").render())
        assert "tokens" in detail and "tok/s" in detail and "ETA" in detail
        await wait_until(pilot, lambda: chat(app).doc_job is None, what="prefill done")
        assert not panel.display
        [chip] = chat(app).query(DocumentChip)
        tokens = engine.count_tokens(doc.read_text())
        assert chip.source.tokens == tokens and "notes.md" in str(chip.render()) and "tok" in str(chip.render())
        assert chat(app).status_bar.context_tokens == tokens
        await send(pilot, "what is in it?")
        assert f"{tokens:,} tokens of documents (notes.md)" in messages(app)[-1].content
        await send(pilot, "and again?")
        assert engine.prefill_count == 1  # questions reuse the snapshot
        chat_id = chat(app).chat.id
        session = app.store.get_documents(chat_id).session_path
        assert Path(session).exists() and Path(session).parent == tmp_path / "data" / "sessions"
    # reopening the chat restores the snapshot instead of prefilling again
    engine2 = FakeEngine()
    app2 = make_app(tmp_path, engine2)
    async with app2.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_until(pilot, lambda: chat(app2).docs is not None and chat(app2).docs.handle is not None, what="restore")
        assert engine2.open_count == 1 and engine2.prefill_count == 0
        assert len(chat(app2).query(DocumentChip)) == 1
        await send(pilot, "one more")
        assert "notes.md" in messages(app2)[-1].content and engine2.prefill_count == 0
        # a new system prompt is part of the document prefix: it re-prefills, once confirmed
        await send(pilot, "/system You are terse.", wait=False)
        await wait_until(pilot, lambda: type(app2.screen).__name__ == "ConfirmDialog", what="confirm")
        await pilot.press("y")
        await wait_until(pilot, lambda: engine2.prefill_count == 1 and chat(app2).doc_job is None, what="re-prefill")
        await send(pilot, "terse now?")
        assert engine2.last_messages[0].content == "You are terse." and messages(app2)[-1].status == "ok"
        # /clear-docs takes them out again
        await send(pilot, "/clear-docs", wait=False)
        await settle(pilot)
        assert chat(app2).docs is None and not chat(app2).query(DocumentChip)
        assert app2.store.get_documents(chat(app2).chat.id) is None


@aio
async def test_missing_session_file_prefills_again(tmp_path, doc):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        chat(app).attach([str(doc)])
        await wait_until(pilot, lambda: chat(app).doc_job is None, what="prefill")
        Path(chat(app).docs.session_path).unlink()
    engine = FakeEngine()
    app2 = make_app(tmp_path, engine)
    async with app2.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_until(pilot, lambda: engine.prefill_count == 1 and chat(app2).doc_job is None, what="re-prefill")
        assert chat(app2).docs.handle is not None
        await note(pilot, "reading the documents again")


@aio
async def test_ctrl_c_cancels_prefill_and_app_stays_up(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("alpha beta gamma delta " * 2000)  # 8,000 fake tokens
    engine = FakeEngine(prefill_step=16, prefill_delay=0.01)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        chat(app).attach([str(big)])
        panel = chat(app).query_one(PrefillPanel)
        await wait_until(pilot, lambda: panel.last is not None and panel.last.done >= 64, what="prefill running")
        # while busy, other chats can't be opened and replies can't start
        await pilot.press("ctrl+n")
        await settle(pilot)
        await note(pilot, "press Esc to cancel")
        await pilot.press("ctrl+c")
        await wait_until(pilot, lambda: chat(app).doc_job is None, what="cancel")
        assert app.is_running and not panel.display
        await note(pilot, lambda n: n.startswith("Prefill cancelled at ") and "/ 8,000 tokens" in n)
        assert chat(app).docs is None and app.store.get_documents(chat(app).chat.id) is None
        assert not list((tmp_path / "data").rglob("*.session"))
        await send(pilot, "still here?")
        assert messages(app)[-1].status == "ok"


@aio
async def test_bad_documents_are_reported(tmp_path):
    huge = tmp_path / "huge.txt"
    huge.write_text("word " * 5000)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    app = make_app(tmp_path, FakeEngine(max_context=4096))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, f"/load {tmp_path / 'missing.txt'}", wait=False)
        await settle(pilot)
        await note(pilot, "missing.txt: no such file")
        chat(app).attach([str(binary)])
        await wait_until(pilot, lambda: chat(app).doc_job is None, what="binary")
        await note(pilot, "not a text file")
        chat(app).attach([str(huge)])
        await wait_until(pilot, lambda: chat(app).doc_job is None, what="huge")
        msg = await note(pilot, lambda n: "context" in n and "5,000 tokens" in n)
        assert "4,096" in msg and "3,072" in msg  # the numbers: size, context, room left for documents
        assert chat(app).docs is None and app.is_running


@aio
async def test_file_picker_attaches(tmp_path, doc):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+o")
        await settle(pilot)
        assert type(app.screen).__name__ == "FilePickerDialog"
        await wait_until(pilot, lambda: getattr(app.focused, "id", None) == "picker-path", what="the path input focused")
        app.screen.query_one("#picker-path").value = "notes.md"  # relative to the start directory
        await pilot.press("enter")
        await wait_until(pilot, lambda: chat(app).docs is not None, what="attach")
        assert chat(app).docs.sources[0].path == str(doc)


# -- no model / failed load ---------------------------------------------------------


@aio
async def test_no_model_screen_instead_of_crash(tmp_path):
    def factory(model):
        return FakeEngine(model_name=model, fail_load="weights are truncated" if model == "broken" else None)

    def screen_text():
        return " ".join(str(w.render()) for w in app.screen.query("Label"))

    app = make_app(tmp_path, FakeEngine(missing=True), engine_factory=factory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, NoModelScreen), what="no-model screen")
        assert "No model found" in screen_text()
        md = app.screen.query_one("Markdown").source
        assert "hf download mlx-community/Kimi-Linear-48B-A3B-Instruct-4bit" in md
        assert "convert.py --hf-path moonshotai/Kimi-Linear-48B-A3B-Instruct" in md
        assert "huggingface-cli" not in md  # current huggingface_hub installs `hf` only
        # a model path typed on the screen is loaded; this one fails to load
        app.screen.query_one("#model-path").value = "broken"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, NoModelScreen) and "truncated" in screen_text(), what="failed screen")
        assert "failed to load" in screen_text()
        # Esc browses the old chats; sending explains instead of crashing
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, ChatScreen) and "(no model)" in str(chat(app).status_bar.render())
        await send(pilot, "anyone?", wait=False)
        await note(pilot, "No model is loaded")
        assert chat(app).prompt.text == "anyone?"
        assert app.store.list_messages(chat(app).chat.id) == []
        app.switch_model("good")
        await wait_until(pilot, lambda: app.engine_state == "ready", what="load good model")
        await send(pilot, "anyone now?")
        assert messages(app)[-1].status == "ok" and app.engine.model_name == "good"


def test_cli_builds_the_app(tmp_path, monkeypatch):
    import tui.__main__ as cli

    ran = {}
    monkeypatch.setattr(KimiChatApp, "run", lambda self: ran.setdefault("app", self))
    assert cli.main(["--fake-engine", "--data-dir", str(tmp_path / "d"), "--model", "x"]) == 0
    app = ran["app"]
    assert isinstance(app.engine, FakeEngine) and app.store.path == str(tmp_path / "d" / DB_NAME)
    monkeypatch.delenv("KIMI_MLX_FAKE_ENGINE", raising=False)
    assert cli.main(["--data-dir", str(tmp_path / "d"), "--model", "/no/such/model"]) == 0
    assert isinstance(ran["app"], KimiChatApp)
    assert "--fake-engine" not in cli.build_parser().format_help()


@aio
async def test_brackets_in_user_text_are_not_markup(tmp_path):
    odd = tmp_path / "plan [v2].txt"
    odd.write_text("[red]not markup[/red] " * 50)
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        chat(app).attach([str(odd)])
        await wait_until(pilot, lambda: chat(app).doc_job is None, what="prefill")
        await send(pilot, "[b]why[/b] is [x] here?")
        assert "plan [v2].txt" in str(chat(app).query_one(DocumentChip).render())
        [item] = chat(app).query_one("Sidebar").items
        assert str(item.query_one("Label").render()) == "[b]why[/b] is [x] here?"
        chat(app).attach([str(tmp_path / "missing [1].txt")])
        await note(pilot, "missing [1].txt: no such file")


@aio
async def test_chat_settings_dialog_and_set_command(tmp_path):
    from textual.widgets import Input, TextArea

    engine = FakeEngine()
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("f3")
        await settle(pilot)
        dialog = app.screen
        assert type(dialog).__name__ == "SettingsDialog"
        dialog.query_one("#system-prompt", TextArea).text = "Answer in French."
        dialog.query_one("#set-temperature", Input).value = "hot"
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert "temperature must be a number" in str(dialog.query_one("#settings-error").render())  # stays open
        for field, bad in (("temperature", "nan"), ("temperature", "inf"), ("max_tokens", "0"), ("top_p", "0")):
            dialog.query_one(f"#set-{field}", Input).value = bad
            await pilot.press("ctrl+s")
            await settle(pilot)
            assert app.screen is dialog and f"{field} must be" in str(dialog.query_one("#settings-error").render())
            dialog.query_one(f"#set-{field}", Input).value = str(getattr(SamplingSettings(), field))
        dialog.query_one("#set-temperature", Input).value = "0.25"
        dialog.query_one("#set-seed", Input).value = "42"
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen), what="dialog closed")
        for bad in ("max_tokens 0", "temperature nan", "temperature -1", "top_k 1.5", "seed -3"):
            await send(pilot, f"/set {bad}", wait=False)
            await note(pilot, lambda n: n.startswith(f"Not changed: {bad.split()[0]} must be"))
            app.clear_notifications()
        assert app.store.get_chat(chat(app).chat.id).settings.max_tokens == SamplingSettings().max_tokens
        await send(pilot, "/set max_tokens 5", wait=False)
        await settle(pilot)
        await send(pilot, "bonjour")
        s = engine.last_settings
        assert (s.temperature, s.seed, s.max_tokens) == (0.25, 42, 5)
        assert engine.last_messages[0] == ChatMessage("system", "Answer in French.")
        assert messages(app)[-1].status == "length"  # stopped at max tokens, and says so
        assert "max tokens" in str(messages(app)[-1].query_one(".message-header").render())
        stored = app.store.get_chat(chat(app).chat.id)
        assert stored.system_prompt == "Answer in French." and stored.settings.max_tokens == 5
