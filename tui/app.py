"""The kimi-chat application: model loading, screens, global keys, command palette."""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from textual.app import App
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.markup import escape
from textual.message import Message

from .engine import Engine
from .screens.chat import ChatScreen
from .screens.dialogs import ModelDialog
from .screens.help import HelpScreen
from .screens.no_model import NoModelScreen
from .store import Store, StoreTooNewError


class EngineLoaded(Message):
    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine


class EngineFailed(Message):
    def __init__(self, engine: Engine, error: BaseException):
        super().__init__()
        self.engine, self.error = engine, error


RECENT_MODELS = 8


class KimiCommands(Provider):
    """Every action of the app, for the command palette (Ctrl+P)."""

    def _commands(self) -> list:
        app = self.app
        chat = app.chat_screen
        cmds = [
            ("New chat", "Start a new conversation (Ctrl+N)", partial(app.run_action, "screen.new_chat")),
            ("Attach documents", "Pick a file or directory to put in the context (Ctrl+O)", partial(app.run_action, "screen.attach")),
            ("Rename chat", "Rename the current chat (F2)", partial(app.run_action, "screen.rename_chat")),
            ("Delete chat", "Delete the current chat (F8)", partial(app.run_action, "screen.delete_chat")),
            ("Chat settings", "System prompt, temperature, top-p, max tokens… (F3)", partial(app.run_action, "screen.settings")),
            ("Switch model", "Load another model (F4)", app.action_switch_model),
            ("Search chats", "Find a chat by its title or messages (Ctrl+F)", partial(app.run_action, "screen.search")),
            ("Export chat to Markdown", "Write this chat to a .md file (Ctrl+S)", partial(app.run_action, "screen.export")),
            ("Focus chat list", "Move to the list of chats (Ctrl+L)", partial(app.run_action, "screen.focus_chat_list")),
            ("Regenerate reply", "Generate the last reply again (Ctrl+R)", partial(app.run_action, "screen.regenerate")),
            ("Edit last message", "Edit your last message and resend it (Up)", chat.edit_last if chat else None),
            ("Stop", "Stop the reply or the document prefill (Esc)", partial(app.run_action, "screen.interrupt")),
            ("Copy last reply", "Copy the last reply to the clipboard", chat.copy_last_reply if chat else None),
            ("Remove documents", "Take the documents out of this chat", partial(app.run_action, "clear_documents")),
            ("Toggle chat list", "Show or hide the sidebar (Ctrl+B)", partial(app.run_action, "screen.toggle_sidebar")),
            ("Help", "Keys and commands (F1)", app.action_help),
            ("Quit", "Quit kimi-chat (Ctrl+Q)", app.exit),
        ]
        if chat is not None:
            blocks = chat.code_blocks()
            for n, (_, lang, code) in enumerate(reversed(blocks[-9:]), 1):
                first = code.strip().splitlines()[0][:40] if code.strip() else ""
                label = f"Copy code block: {lang or 'text'} · {first}"
                cmds.append((label, f"Code block {n} from the end of this chat", partial(app.copy_code, code)))
        return [c for c in cmds if c[2] is not None]

    async def discover(self) -> Hits:
        if not isinstance(self.screen, ChatScreen):
            return
        for name, help_text, callback in self._commands():
            yield DiscoveryHit(escape(name), callback, help=escape(help_text))

    async def search(self, query: str) -> Hits:
        if not isinstance(self.screen, ChatScreen):
            return
        matcher = self.matcher(query)
        for name, help_text, callback in self._commands():
            score = matcher.match(name)
            if score > 0:
                # names quote code; escaped because the palette reads them as markup
                yield Hit(score, matcher.highlight(escape(name)), callback, help=escape(help_text))


class KimiChatApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "kimi-chat"
    COMMANDS = App.COMMANDS | {KimiCommands}
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("f1", "help", "Help"),
    ]
    THEME_KEY = "theme"

    def __init__(
        self,
        engine: Engine,
        store: Optional[Store] = None,
        data_dir: Optional[Path] = None,
        engine_factory: Optional[Callable[[str], Engine]] = None,
        start_dir: Optional[str] = None,
    ):
        super().__init__()
        self.engine = engine
        self.engine_factory = engine_factory
        self.engine_state = "loading"  # "loading" | "ready" | "failed"
        self.load_error: Optional[BaseException] = None
        self._retired: list = []  # engines replaced by switch_model
        self.start_dir = start_dir or os.getcwd()
        self.startup_notices: list = []
        if store is None:
            try:
                store = Store.open_default(data_dir)
            except StoreTooNewError as e:
                # Don't touch a newer release's data; keep working in memory.
                store = Store(":memory:")
                self.startup_notices.append(f"{e} This session's chats will not be saved.")
        self.store = store
        self.startup_notices.extend(store.notices)

    @property
    def chat_screen(self) -> Optional[ChatScreen]:
        for screen in self.screen_stack:
            if isinstance(screen, ChatScreen):
                return screen
        return None

    def on_mount(self) -> None:
        saved = self.store.get_setting(self.THEME_KEY)
        if saved in self.available_themes:
            self.theme = saved
        self.theme_changed_signal.subscribe(self, lambda theme: self.store.set_setting(self.THEME_KEY, theme.name))
        self.push_screen(ChatScreen())
        for notice in self.startup_notices:
            self.notify(notice, severity="warning", timeout=20, markup=False)
        self.load_engine()

    def on_unmount(self) -> None:
        # After the chat screen's unmount (which cancels its jobs): join the
        # engine's threads (MLX's must end before the interpreter does), then
        # fold the WAL into the database file.
        for engine in self._retired + [self.engine]:
            self._close_engine(engine)  # closing twice is harmless
        self.store.close()

    @staticmethod
    def _close_engine(engine: Engine) -> None:
        close = getattr(engine, "close", None)
        if close is not None:
            close()

    # -- model ---------------------------------------------------------------

    def load_engine(self, previous: Optional[Engine] = None) -> None:
        self.engine_state = "loading"
        engine = self.engine
        if self.chat_screen:
            self.chat_screen.refresh_engine_state()

        def work() -> None:
            try:
                if previous is not None:
                    # Off the UI thread (it may wait for a load in progress); its
                    # memory is freed before the next model loads.
                    self._close_engine(previous)
                    self._retired.remove(previous)
                engine.load()
            except BaseException as e:
                self.post_message(EngineFailed(engine, e))
            else:
                self.post_message(EngineLoaded(engine))

        self.run_worker(work, thread=True, group="load", exit_on_error=False, name="load-model")

    def on_engine_loaded(self, event: EngineLoaded) -> None:
        if event.engine is not self.engine:
            return  # replaced by another model meanwhile
        self.engine_state = "ready"
        self.load_error = None
        self._remember_model(getattr(self.engine, "model_path", self.engine.model_name))
        if isinstance(self.screen, NoModelScreen):
            self.pop_screen()
        if self.chat_screen:
            self.chat_screen.engine_ready()
        self.notify(f"Model {self.engine.model_name} loaded.", markup=False)

    def on_engine_failed(self, event: EngineFailed) -> None:
        if event.engine is not self.engine:
            return
        self.engine_state = "failed"
        self.load_error = event.error
        if self.chat_screen:
            self.chat_screen.refresh_engine_state()
        self.show_no_model()

    def show_no_model(self) -> None:
        if isinstance(self.screen, NoModelScreen):
            self.pop_screen()
        model = getattr(self.engine, "model_path", self.engine.model_name)
        self.push_screen(NoModelScreen(model, self.load_error))

    def recent_models(self) -> list:
        try:
            recent = json.loads(self.store.get_setting("recent_models", "[]"))
        except ValueError:
            return []
        return [m for m in recent if isinstance(m, str)] if isinstance(recent, list) else []

    def _remember_model(self, model: str) -> None:
        recent = [model] + [m for m in self.recent_models() if m != model]
        self.store.set_setting("recent_models", json.dumps(recent[:RECENT_MODELS]))

    def action_switch_model(self) -> None:
        """F4: back to the no-model screen if loading failed, else the model dialog."""
        if self.engine_state == "failed" and self.load_error is not None:
            self.show_no_model()
            return
        current = getattr(self.engine, "model_path", self.engine.model_name)

        def done(model: Optional[str]) -> None:
            if model:
                self.switch_model(model)

        self.push_screen(ModelDialog(current, self.recent_models()), done)

    def switch_model(self, model: str) -> None:
        if self.engine_factory is None:
            self.notify("Restart with --model PATH to use another model.", severity="warning", markup=False)
            return
        chat = self.chat_screen
        if chat is not None and chat._refuse_if_busy():
            return
        old, self.engine = self.engine, self.engine_factory(model)
        self._retired.append(old)
        if chat is not None and chat.docs is not None:
            chat.docs.handle = None  # the old model's snapshot: restored (or re-read) for the new one
        self.notify(f"Loading {model}…", markup=False)
        self.load_engine(previous=old)

    # -- global actions --------------------------------------------------------

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_clear_documents(self) -> None:
        if self.chat_screen:
            await self.chat_screen.clear_documents()

    def copy_code(self, code: str) -> None:
        self.copy_to_clipboard(code)
        self.notify("Code block copied to the clipboard.", markup=False)
