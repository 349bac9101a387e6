"""The real KimiEngine adapter against the tiny fixture model (CPU, a second or two)."""
from __future__ import annotations

import shutil
from pathlib import Path
import threading

import pytest

from fixtures.tiny_tokenizer import write_tiny_tokenizer
from helpers import MODELS
from tui.engine import (
    ChatMessage,
    DocumentInfo,
    DocumentTooLargeError,
    KimiEngine,
    PrefillCancelled,
    SamplingSettings,
    SessionUnavailableError,
)

GREEDY = SamplingSettings(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "tiny_grouped"
    shutil.copytree(MODELS / "tiny_grouped", d)
    write_tiny_tokenizer(d)
    eng = KimiEngine(str(d))
    eng.load()
    return eng


def _reply(engine, msgs, docs=None, settings=GREEDY):
    deltas = list(engine.stream_reply(msgs, settings, docs, threading.Event()))
    assert deltas and deltas[-1].finish_reason in ("stop", "length")
    return "".join(d.text for d in deltas), deltas[-1]


def test_chat_documents_and_saved_session(engine, tmp_path):
    assert engine.max_context > 0 and engine.model_name == "tiny_grouped"
    msgs = [ChatMessage("system", "sys"), ChatMessage("user", "hello there")]
    text, last = _reply(engine, msgs)
    assert last.generation_tokens >= 1 and last.context_tokens == last.prompt_tokens + last.generation_tokens
    assert engine.stats.peak_memory_gb > 0

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\nalpha beta gamma\n" * 20)
    (tmp_path / "b.txt").write_text("delta epsilon\n" * 10)
    seen = []
    session = str(tmp_path / "chat-1.session")
    info = engine.prefill_documents(
        [str(tmp_path / "docs"), str(tmp_path / "b.txt")], session, seen.append, threading.Event(), system_prompt="sys"
    )
    assert [s.label for s in info.sources] == ["docs/", "b.txt"] and info.sources[0].files == 1
    assert info.token_count > sum(s.tokens for s in info.sources) > 0  # plus the template prefix
    assert any(p.stage == "prefill" and p.done == p.total == info.token_count for p in seen)
    with_docs, last = _reply(engine, msgs, info)
    assert last.context_tokens == info.token_count + last.prompt_tokens + last.generation_tokens
    # reopening uses the saved snapshot and answers the same (greedy)
    reopened = engine.open_documents(DocumentInfo(info.sources, info.token_count, session, system_prompt="sys"))
    assert _reply(engine, msgs, reopened)[0] == with_docs
    # cancel stops promptly
    cancel = threading.Event()
    it = engine.stream_reply(msgs, SamplingSettings(temperature=0.0, max_tokens=200), info, cancel)
    next(it)
    cancel.set()
    assert len(list(it)) <= 2
    # cancelled prefill: nothing written
    stop = threading.Event()
    stop.set()
    with pytest.raises(PrefillCancelled):
        engine.prefill_documents([str(tmp_path / "b.txt")], str(tmp_path / "x.session"), lambda p: None, stop)
    assert not (tmp_path / "x.session").exists()
    # a damaged session file is reported as unusable, not a crash
    (tmp_path / "bad.session").write_bytes(b"junk")
    with pytest.raises(SessionUnavailableError):
        engine.open_documents(DocumentInfo(info.sources, info.token_count, str(tmp_path / "bad.session")))


def test_documents_larger_than_context(engine, tmp_path, monkeypatch):
    (tmp_path / "big.txt").write_text("word " * 3000)
    monkeypatch.setattr(engine, "max_context", 2048)
    with pytest.raises(DocumentTooLargeError, match="2,048"):
        engine.prefill_documents([str(tmp_path / "big.txt")], str(tmp_path / "s"), lambda p: None, threading.Event())


def test_app_end_to_end_with_tiny_model(engine, tmp_path):
    import asyncio
    import time

    from tui.app import KimiChatApp

    (tmp_path / "notes.txt").write_text("The meeting is on Tuesday.\n" * 20)
    app = KimiChatApp(KimiEngine(engine.model_path), data_dir=tmp_path / "data", start_dir=str(tmp_path))

    async def until(pred, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)

    async def run():
        async with app.run_test(size=(100, 30)):
            await until(lambda: app.engine_state == "ready" and app.chat_screen and app.chat_screen.chat)
            screen = app.chat_screen
            screen.attach(["notes.txt"])
            await until(lambda: screen.doc_job is None)
            assert screen.docs is not None and screen.docs.handle is not None
            screen.store.update_chat_settings(screen.chat.id, screen.chat.system_prompt, SamplingSettings(temperature=0.0, max_tokens=5))
            screen.chat = screen.store.get_chat(screen.chat.id)
            prompt = screen.prompt
            prompt.post_message(prompt.Submitted(prompt, "When is the meeting?"))
            await until(lambda: screen.replies_done == 1)
            [user, reply] = screen.store.list_messages(screen.chat.id)
            assert reply.status in ("ok", "length") and reply.meta["generation_tokens"] >= 1
            assert reply.meta["context_tokens"] > screen.docs.token_count
            assert "tiny_grouped" in str(screen.status_bar.render())

    asyncio.run(run())


def test_quit_during_prefill_cancels_and_joins_the_mlx_thread(engine, tmp_path):
    """Ctrl+Q mid-prefill: MLX's thread must have ended before the interpreter
    shuts down, or the process aborts ("terminate called without an active exception")."""
    import asyncio

    from tui.app import KimiChatApp
    from tui.widgets.progress import PrefillPanel

    (tmp_path / "big.txt").write_text("alpha beta gamma delta epsilon " * 4000)
    eng = KimiEngine(engine.model_path)
    eng.prefill_step_size = 32  # many steps: the quit lands mid-prefill
    app = KimiChatApp(eng, data_dir=tmp_path / "data", start_dir=str(tmp_path))
    seen = {}

    async def run():
        async with app.run_test(size=(100, 30)) as pilot:
            while not (app.engine_state == "ready" and app.chat_screen and app.chat_screen.chat):
                await asyncio.sleep(0.02)
            screen = app.chat_screen
            screen.attach([str(tmp_path / "big.txt")])
            panel = screen.query_one(PrefillPanel)
            while not (panel.last is not None and panel.last.stage == "prefill" and panel.last.done > 0):
                await asyncio.sleep(0.02)
            seen["thread"] = eng._mlx._thread
            seen["total"] = panel.last.total
            await pilot.press("ctrl+q")

    asyncio.run(run())
    assert not seen["thread"].is_alive()  # joined, not left running as a daemon
    assert not list((tmp_path / "data").rglob("*.session"))  # cancelled: nothing saved


def test_turns_continue_from_kept_states_and_across_a_restart(engine, tmp_path):
    state = str(tmp_path / "chat-7.state")
    msgs = [ChatMessage("system", "sys"), ChatMessage("user", "hello there")]
    first, last = _reply_state(engine, msgs, state)
    engine.flush()  # the state is saved on the MLX thread after the reply
    assert last.cached_tokens == 0 and last.checkpoint_bytes > 0 and (tmp_path / "chat-7.state").exists()
    # regenerate: the prompt's state kept its logits, nothing is prefilled
    again, last = _reply_state(engine, msgs, state)
    assert again == first and last.prompt_tokens == 0 and last.cached_tokens > 0
    # the next turn prefills only the new message: it continues the state after the reply
    turn2 = msgs + [ChatMessage("assistant", first, tuple(last.reply_ids)), ChatMessage("user", "and then?")]
    text2, last2 = _reply_state(engine, turn2, state)
    assert last2.cached_tokens == last.context_tokens - (last.finish_reason == "length")

    engine.flush()
    restarted = KimiEngine(engine.model_path)  # a new app: nothing in memory, the state file on disk
    restarted.load()
    try:
        turn3 = turn2 + [ChatMessage("assistant", text2, tuple(last2.reply_ids)), ChatMessage("user", "bye")]
        plain, _ = _reply_state(engine, turn3, None)
        text, last3 = _reply_state(restarted, turn3, state)
        assert last3.cached_tokens == last2.context_tokens - (last2.finish_reason == "length") and text == plain
        # a different system prompt can't use them
        _, other = _reply_state(restarted, [ChatMessage("system", "other")] + turn3[1:], state)
        assert other.cached_tokens == 0
    finally:
        restarted.close()


def _reply_state(engine, msgs, state):
    deltas = list(engine.stream_reply(msgs, GREEDY, None, threading.Event(), chat_state=state))
    return "".join(d.text for d in deltas), deltas[-1]


def test_the_app_continues_turns_and_old_chats_after_a_restart(tmp_path):
    """kimi-chat with the real engine: the second turn continues the first's state, a restarted app
    continues the chat from its saved state, deleting the chat removes that file."""
    import asyncio

    from test_tui import chat, make_app, ready, send

    async def session(turns, delete=False):
        engine = KimiEngine(str(MODELS / "tiny_chat"))
        app = make_app(tmp_path, engine)
        async with app.run_test(size=(110, 34)) as pilot:
            await ready(pilot)
            assert app.engine_state == "ready"
            screen = chat(app)
            screen._save_settings(screen.chat.id, screen.chat.system_prompt, GREEDY)
            for text in turns:
                await send(pilot, text)
            replies = [m for m in screen.store.list_messages(screen.chat.id) if m.role == "assistant"]
            state = screen.store.checkpoint_path_for(screen.chat.id)
            shown = screen.status_bar.checkpoint_bytes
            if delete:
                assert Path(state).is_file()
                await screen.delete_chat(screen.chat.id)
                assert not Path(state).exists()
            return app, screen, replies, state, shown

    async def run():
        _, _, replies, state, shown = await session(["hello there", "and then?"])
        assert replies[0].meta["cached_tokens"] == 0 and replies[0].meta["reply_ids"]
        assert replies[1].meta["cached_tokens"] == replies[0].meta["context_tokens"] - (
            replies[0].meta["finish_reason"] == "length")
        assert shown > 0 and Path(state).is_file()
        # a new app on the same data: the chat's saved state is continued, not prefilled again
        app, screen, replies, state, _ = await session(["one more"], delete=True)
        assert replies[2].meta["cached_tokens"] == replies[1].meta["context_tokens"] - (
            replies[1].meta["finish_reason"] == "length")

    asyncio.run(run())


def test_a_document_chat_left_for_another_lets_go_of_its_documents(engine, tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma\n" * 30)
    info = engine.prefill_documents([str(tmp_path / "a.txt")], str(tmp_path / "chat-1.session"), lambda p: None,
                                    threading.Event(), system_prompt="sys")
    msgs = [ChatMessage("system", "sys"), ChatMessage("user", "hello there")]
    a, b = str(tmp_path / "chat-1.state"), str(tmp_path / "chat-2.state")
    first = list(engine.stream_reply(msgs, GREEDY, info, threading.Event(), chat_state=a))[-1]
    list(engine.stream_reply(msgs, GREEDY, None, threading.Event(), chat_state=b))
    engine.flush()
    assert a not in engine._chats and all(c.key != a for c in engine._store)  # nothing holds the documents
    # back in the first chat: its saved state (after its documents) is continued
    reply = ChatMessage("assistant", engine._tokenizer.decode(first.reply_ids), tuple(first.reply_ids))
    turn2 = msgs + [reply, ChatMessage("user", "and?")]
    last = list(engine.stream_reply(turn2, GREEDY, info, threading.Event(), chat_state=a))[-1]
    assert last.cached_tokens == first.context_tokens - (first.finish_reason == "length")
