"""kimi-chat's chat screen, from testing as a new user would (issue 15): fake engine, headless."""
from __future__ import annotations

import os
from pathlib import Path

from test_tui import SIZE, aio, chat, make_app, messages, note, notes, ready, send, settle, wait_until

from tui.engine import FakeEngine, ModelLoadError, ModelNotFoundError, PrefillProgress
from tui.screens.chat import ChatScreen
from tui.screens.dialogs import ConfirmDialog, ModelDialog, SearchDialog, SettingsDialog
from tui.screens.no_model import NoModelScreen
from tui.widgets.documents import DocumentChip
from tui.widgets.progress import PrefillPanel


def text_of(widget) -> str:
    """What the widget shows on screen, line by line (wrapped as displayed)."""
    from textual.geometry import Region

    w, h = widget.size
    return "\n".join(strip.text.rstrip() for strip in widget.render_lines(Region(0, 0, w, h)))


@aio
async def test_unknown_command_keeps_the_input_and_double_slash_sends_it(tmp_path):
    engine = FakeEngine()
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "/usr/bin/python crashes on start", wait=False)
        msg = await note(pilot, "Unknown command /usr/bin/python")
        assert "//" in msg
        assert chat(app).prompt.text == "/usr/bin/python crashes on start"  # not lost
        assert messages(app) == []
        await send(pilot, "//usr/bin/python crashes on start")
        assert messages(app)[0].content == "/usr/bin/python crashes on start"
        assert engine.last_messages[-1].content == "/usr/bin/python crashes on start"
        assert chat(app).prompt.text == ""
        # a known command still clears the input
        await send(pilot, "/rename Python", wait=False)
        # the input is cleared once the command returns, just after the rename: wait for both
        await wait_until(pilot, lambda: chat(app).chat.title == "Python" and chat(app).prompt.text == "",
                         what="rename and a cleared input")


def confirm_shown(app) -> bool:
    """The confirm dialog is up and composed (pushed is not enough: its widgets mount a moment later)."""
    return isinstance(app.screen, ConfirmDialog) and bool(app.screen.query("#no"))


def focused_id(app):
    return getattr(app.focused, "id", None)


@aio
async def test_system_prompt_change_in_a_document_chat_asks_and_cancel_keeps_state(tmp_path, doc=None):
    doc = tmp_path / "notes.md"
    doc.write_text("alpha beta gamma delta " * 1000)  # 4,000 fake tokens
    engine = FakeEngine(prefill_step=16, prefill_delay=0.005)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        screen = chat(app)
        screen.attach([str(doc)])
        await wait_until(pilot, lambda: screen.doc_job is None and screen.docs is not None, what="prefill")
        original = screen.chat.system_prompt
        # /system asks first; "no" changes nothing
        await send(pilot, "/system Be terse.", wait=False)
        await wait_until(pilot, lambda: confirm_shown(app), what="confirm")
        assert "4,000 tokens" in str(app.screen.query_one(".dialog-title").render())
        await pilot.press("n")
        await settle(pilot)
        assert engine.prefill_count == 1 and screen.doc_job is None
        assert app.store.get_chat(screen.chat.id).system_prompt == original
        # the settings dialog asks too; yes starts the re-prefill, Esc cancels it
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsDialog), what="settings")
        app.screen.query_one("#system-prompt").text = "Be terse."
        app.screen.query_one("#set-temperature").value = "0.3"
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: confirm_shown(app), what="confirm")
        engine.prefill_delay = 0.05  # slow enough to cancel (pilot.press waits for idle)
        await pilot.press("y")
        panel = screen.query_one(PrefillPanel)
        await wait_until(pilot, lambda: screen.doc_job is not None and panel.last is not None and panel.last.done > 0, what="re-prefill")
        await pilot.press("escape")
        await wait_until(pilot, lambda: screen.doc_job is None, what="cancel")
        msg = await note(pilot, lambda n: n.startswith("Prefill cancelled"))
        assert "not attached" not in msg and "stay attached" in msg
        # consistent: the documents (still listed) go with the prompt they were read with
        stored = app.store.get_chat(screen.chat.id)
        assert stored.system_prompt == original == screen.chat.system_prompt == screen.docs.system_prompt
        assert stored.settings.temperature == 0.3  # the rest of the dialog was saved
        assert len(screen.query(DocumentChip)) == 1 and app.store.get_documents(screen.chat.id) is not None
        await send(pilot, "still there?")
        assert messages(app)[-1].status == "ok" and "4,000 tokens of documents" in messages(app)[-1].content
        assert engine.prefill_count == 1


@aio
async def test_prefill_eta_is_the_engines(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        panel = chat(app).query_one(PrefillPanel)
        panel.start("Reading documents…")
        panel.update_progress(PrefillProgress("prefill", 0, 100_000))
        assert "ETA estimating…" in panel.detail_text(PrefillProgress("prefill", 0, 100_000))
        text = panel.detail_text(PrefillProgress("prefill", 5_000, 100_000, 1_000.0, 5_400.0))
        assert "1,000 tok/s" in text and "ETA 1:30:00" in text  # the engine's figure, not done/elapsed
        text = panel.detail_text(PrefillProgress("prefill", 5_000, 100_000, 1_000.0, float("inf")))
        assert "ETA estimating…" in text


@aio
async def test_load_errors_are_wrapped_with_advice_that_fits(tmp_path):
    long_path = "/Users/someone/models/" + "kimi-linear-48b-a3b-instruct-4bit-converted/" * 3
    missing = f"TokenizerError: {long_path}tiktoken.model: missing (a Kimi checkpoint ships tiktoken.model)"
    engine = FakeEngine(model_name=long_path)
    engine.load = lambda: (_ for _ in ()).throw(ModelLoadError(missing))
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, NoModelScreen), what="no-model screen")
        await settle(pilot)
        reason = app.screen.query_one(".no-model-reason")
        box = app.screen.query_one(".no-model-box")
        assert box.content_region.contains_region(reason.region)  # not cut off at the box's edge
        shown = text_of(reason)
        assert "".join(shown.split()) == "".join(missing.split())  # all of it, wrapped
        md = app.screen.query_one("Markdown").source
        assert "hf download" in md and "huggingface-cli" not in md and "missing" in md
        assert "incomplete" in str(app.screen.query_one(".no-model-title").render())
    for error, want in (
        (ModelNotFoundError("/x has no config.json; is it a model directory?", "not_model_dir"), "config.json"),
        (ModelNotFoundError("org/m is not in the local Hugging Face cache.", "not_downloaded"), "hf download org/m"),
        (ModelLoadError("org/m: needs 90 GB of disk space to download"), "disk space"),
    ):
        from tui.screens.no_model import advice

        title, text = advice("org/m", error)
        assert want in text and "huggingface-cli" not in text, (error, text)


@aio
async def test_user_line_breaks_are_shown(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "first line\nsecond line\n\n* not a bullet *")
        shown = text_of(messages(app)[0].body)
        assert shown.splitlines()[:4] == ["first line", "second line", "", "* not a bullet *"]


@aio
async def test_theme_is_saved(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.theme = "nord"
        await settle(pilot)
    app2 = make_app(tmp_path)
    async with app2.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app2.theme == "nord"


@aio
async def test_f4_returns_to_the_no_model_screen_and_switches_models(tmp_path):
    made = []

    def factory(model):
        made.append(FakeEngine(model_name=model))
        return made[-1]

    first = FakeEngine(missing=True)
    app = make_app(tmp_path, first, engine_factory=factory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, NoModelScreen), what="no-model screen")
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen), what="chats")
        await pilot.press("f4")  # the way back
        await wait_until(pilot, lambda: isinstance(app.screen, NoModelScreen), what="back to no-model screen")
        app.screen.query_one("#model-path").value = "model-a"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.engine_state == "ready" and isinstance(app.screen, ChatScreen), what="load a")
        assert first.closed
        # with a model loaded, F4 opens the model dialog; recent models are listed
        await pilot.press("f4")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelDialog), what="model dialog")
        app.screen.query_one("#model-path").value = "model-b"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.engine_state == "ready" and app.engine.model_name == "model-b", what="load b")
        assert made[0].closed and not made[1].closed
        await send(pilot, "who are you?")
        assert messages(app)[-1].status == "ok" and made[1].reply_count == 1
        await pilot.press("f4")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelDialog), what="model dialog")
        await wait_until(pilot, lambda: focused_id(app) == "model-path", what="the path input focused")
        assert [i.name for i in app.screen.query("ListItem")] == ["model-a"]
        await pilot.press("escape")


@aio
async def test_ctrl_l_focuses_the_chat_list(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        sidebar = chat(app).query_one("Sidebar")
        sidebar.display = False
        await pilot.press("ctrl+l")
        await settle(pilot)
        assert sidebar.display and sidebar.list_view.has_focus


@aio
async def test_stopping_while_thinking_leaves_no_empty_bubble(tmp_path):
    engine = FakeEngine(token_delay=2.0)  # "thinking": no token yet (a loaded machine takes a while to press Esc)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "hello", wait=False)
        await wait_until(pilot, lambda: len(messages(app)) == 2, what="reply started")
        await pilot.press("escape")
        await wait_until(pilot, lambda: chat(app).generation is None, what="stopped")
        assert [m.role for m in messages(app)] == ["user"]
        assert [m.role for m in app.store.list_messages(chat(app).chat.id)] == ["user"]
        await note(pilot, "Stopped before the reply began")


@aio
async def test_settings_dialog_fits_a_small_terminal(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(60, 20)) as pilot:
        await ready(pilot)
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsDialog), what="dialog")
        dialog = app.screen
        box = dialog.query_one(".settings-dialog")
        assert app.screen.region.contains_region(box.region)
        save = dialog.query_one("#save")
        assert not box.region.contains_region(save.region) and box.max_scroll_y > 0  # it scrolls
        save.focus()
        await wait_until(pilot, lambda: box.region.contains_region(save.region), what="save button in view")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen), what="saved")


@aio
async def test_export_chat_to_markdown(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "line one\nline two")
        await pilot.press("ctrl+s")
        msg = await note(pilot, "Chat exported to")
        out = tmp_path / "line-one-line-two.md"
        assert str(out) in msg
        text = out.read_text()
        assert text.startswith("# line one line two\n") and "## You\n\nline one  \nline two\n" in text
        assert "## Kimi\n\nYou asked:" in text and '```python\ndef hello():' in text
        # never over an existing file; no temp file left behind
        assert chat(app).export_chat() == tmp_path / "line-one-line-two-2.md"
        assert out.read_text() == text
        await send(pilot, "/export sub/chat.md", wait=False)
        await wait_until(pilot, lambda: (tmp_path / "sub" / "chat.md").exists(), what="export to a path")
        assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


@aio
async def test_search_finds_titles_and_messages_and_opens_the_chat(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Recipe for pancakes")
        await pilot.press("ctrl+n")
        await settle(pilot)
        await send(pilot, "Tax questions")
        target = app.store.list_chats()[1]
        assert target.title == "Recipe for pancakes"
        await pilot.press("ctrl+f")
        await wait_until(pilot, lambda: isinstance(app.screen, SearchDialog), what="search")
        await pilot.press(*"hello")  # only in the reply ("Here is an example ... hello()")
        await settle(pilot)
        assert len(app.screen.query("ListItem")) == 2
        app.screen.query_one("#search-query").value = "pancake"
        await wait_until(pilot, lambda: len(app.screen.query("ListItem")) == 1, what="results")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen) and chat(app).chat.id == target.id, what="opened")
        assert messages(app)[0].content == "Recipe for pancakes"


@aio
async def test_search_dialog_focuses_its_query_and_a_search_after_esc_is_harmless(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Recipe for pancakes")
        await pilot.press("ctrl+f")
        await wait_until(pilot, lambda: focused_id(app) == "search-query", what="the query focused")
        dialog = app.screen
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen), what="dismissed")
        # a search still running when Esc removed the widgets finds nothing to draw into
        await dialog._search("pancake")


@aio
async def test_help_lists_the_new_keys(tmp_path):
    from tui.screens.help import HELP_TEXT

    for key in ("Ctrl+J", "tmux", "Ctrl+F", "Ctrl+S", "Ctrl+L", "F4", "//text", "/export", "/search", "/model"):
        assert key in HELP_TEXT, key
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        from tui.app import KimiCommands

        names = [c[0] for c in KimiCommands(app.screen)._commands()]
        for want in ("Switch model", "Search chats", "Export chat to Markdown", "Focus chat list"):
            assert want in names
