"""Conversations in SQLite.

* Schema versioned with ``PRAGMA user_version``: ``MIGRATIONS[i]`` takes the
  database from version ``i`` to ``i + 1``; each runs in its own transaction
  together with the version bump, so a crash mid-migration changes nothing.
* Every write is one transaction (``BEGIN IMMEDIATE`` .. ``COMMIT``) with
  ``synchronous=FULL`` in WAL mode: a committed message survives a crash.
* A database SQLite can't read is moved aside to ``<name>.corrupt-<timestamp>``
  and a fresh one started; ``Store.notices`` tells the app what happened.

All calls are made from the UI thread (sqlite3's default same-thread check).
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import platformdirs

from .engine import DEFAULT_SYSTEM_PROMPT, DocumentInfo, DocumentSource, SamplingSettings

APP_NAME = "kimi-mlx"
DB_NAME = "chats.sqlite3"
HOME_ENV = "KIMI_MLX_HOME"


def default_data_dir() -> Path:
    """``$KIMI_MLX_HOME``, else the platform's data directory
    (``~/Library/Application Support/kimi-mlx`` on macOS, XDG on Linux)."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


Migration = Union[str, Callable[[sqlite3.Connection], None]]

# Append only: never edit a released entry, add a new one instead.
MIGRATIONS: list = [
    # 0 -> 1: initial schema
    """
    CREATE TABLE chats (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        title         TEXT    NOT NULL,
        system_prompt TEXT    NOT NULL DEFAULT '',
        settings      TEXT    NOT NULL DEFAULT '{}',
        created_at    REAL    NOT NULL,
        updated_at    REAL    NOT NULL
    );
    CREATE TABLE messages (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        chat_id    INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        role       TEXT    NOT NULL,
        content    TEXT    NOT NULL,
        status     TEXT    NOT NULL DEFAULT 'ok',
        meta       TEXT    NOT NULL DEFAULT '{}',
        created_at REAL    NOT NULL
    );
    CREATE INDEX messages_by_chat ON messages(chat_id, id);
    CREATE TABLE documents (
        chat_id      INTEGER PRIMARY KEY REFERENCES chats(id) ON DELETE CASCADE,
        sources      TEXT    NOT NULL,
        token_count  INTEGER NOT NULL,
        session_path TEXT    NOT NULL,
        system_prompt TEXT   NOT NULL DEFAULT '',
        model        TEXT    NOT NULL DEFAULT '',
        created_at   REAL    NOT NULL
    );
    CREATE TABLE kv (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    pass


class StoreTooNewError(StoreError):
    """The database was written by a newer release; we don't touch it."""


@dataclass
class Chat:
    id: int
    title: str
    system_prompt: str
    settings: SamplingSettings
    created_at: float
    updated_at: float


@dataclass
class Message:
    id: int
    chat_id: int
    role: str
    content: str
    status: str = "ok"  # "ok" | "cancelled" | "error"
    meta: dict = field(default_factory=dict)


class Store:
    def __init__(self, path: Union[str, Path] = ":memory:"):
        self.path = str(path)
        self.notices: list = []
        self.conn = self._open()

    # -- opening, corruption, migrations ----------------------------------

    @classmethod
    def open_default(cls, data_dir: Optional[Path] = None) -> "Store":
        data_dir = Path(data_dir) if data_dir else default_data_dir()
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(data_dir / DB_NAME)

    @property
    def data_dir(self) -> Optional[Path]:
        return None if self.path == ":memory:" else Path(self.path).parent

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (see _tx).
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _open(self) -> sqlite3.Connection:
        try:
            conn = self._connect()
            row = conn.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                conn.close()
                raise sqlite3.DatabaseError(f"integrity check failed: {row[0] if row else '?'}")
        except sqlite3.DatabaseError as e:
            if self.path == ":memory:":
                raise
            backup = self._move_corrupt()
            self.notices.append(
                f"The chat database could not be read ({e}). It was moved to {backup} "
                "and a new, empty one was started."
            )
            conn = self._connect()
        self._migrate(conn)
        return conn

    def _move_corrupt(self) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = f"{self.path}.corrupt-{stamp}"
        os.replace(self.path, backup)
        for suffix in ("-wal", "-shm"):  # stale journals belong to the old file
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, backup + suffix)
        return backup

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            conn.close()
            raise StoreTooNewError(
                f"The chat database is schema version {version}, newer than this release "
                f"understands ({SCHEMA_VERSION}); it was left untouched."
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            step = MIGRATIONS[target - 1]
            conn.execute("BEGIN IMMEDIATE")
            try:
                if callable(step):
                    step(conn)
                else:
                    for stmt in _split_sql(step):
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {int(target)}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _tx(self):
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    # -- chats -------------------------------------------------------------

    @staticmethod
    def _chat(row) -> Chat:
        try:
            settings = SamplingSettings.from_dict(json.loads(row["settings"]))
        except (ValueError, TypeError):
            settings = SamplingSettings()
        return Chat(row["id"], row["title"], row["system_prompt"], settings, row["created_at"], row["updated_at"])

    def list_chats(self) -> list:
        rows = self.conn.execute("SELECT * FROM chats ORDER BY updated_at DESC, id DESC").fetchall()
        return [self._chat(r) for r in rows]

    def get_chat(self, chat_id: int) -> Optional[Chat]:
        row = self.conn.execute("SELECT * FROM chats WHERE id = ?", (chat_id,)).fetchone()
        return self._chat(row) if row else None

    def create_chat(
        self,
        title: str = "New chat",
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        settings: Optional[SamplingSettings] = None,
    ) -> Chat:
        now = time.time()
        settings = settings or SamplingSettings()
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO chats (title, system_prompt, settings, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (title, system_prompt, json.dumps(settings.to_dict()), now, now),
            )
        return self.get_chat(cur.lastrowid)

    def rename_chat(self, chat_id: int, title: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE chats SET title = ? WHERE id = ?", (title, chat_id))

    def update_chat_settings(self, chat_id: int, system_prompt: str, settings: SamplingSettings) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE chats SET system_prompt = ?, settings = ? WHERE id = ?",
                (system_prompt, json.dumps(settings.to_dict()), chat_id),
            )

    def delete_chat(self, chat_id: int) -> Optional[str]:
        """Deletes the chat (messages and documents cascade). Returns the
        document session path it had, for the caller to remove."""
        docs = self.get_documents(chat_id)
        with self._tx() as c:
            c.execute("DELETE FROM chats WHERE id = ?", (chat_id,))
        return docs.session_path if docs else None

    def _touch(self, c, chat_id: int) -> None:
        # updated_at must strictly increase so the sidebar order is stable
        row = c.execute("SELECT updated_at FROM chats WHERE id = ?", (chat_id,)).fetchone()
        latest = c.execute("SELECT MAX(updated_at) FROM chats").fetchone()[0] or 0.0
        now = max(time.time(), latest + 1e-6) if row else time.time()
        c.execute("UPDATE chats SET updated_at = ? WHERE id = ?", (now, chat_id))

    # -- messages ----------------------------------------------------------

    def add_message(self, chat_id: int, role: str, content: str, status: str = "ok", meta: Optional[dict] = None) -> Message:
        meta = meta or {}
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO messages (chat_id, role, content, status, meta, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (chat_id, role, content, status, json.dumps(meta), time.time()),
            )
            self._touch(c, chat_id)
        return Message(cur.lastrowid, chat_id, role, content, status, meta)

    def update_message(self, message_id: int, content: str, status: str, meta: Optional[dict] = None) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE messages SET content = ?, status = ?, meta = ? WHERE id = ?",
                (content, status, json.dumps(meta or {}), message_id),
            )

    def list_messages(self, chat_id: int) -> list:
        rows = self.conn.execute("SELECT * FROM messages WHERE chat_id = ? ORDER BY id", (chat_id,)).fetchall()
        out = []
        for r in rows:
            try:
                meta = json.loads(r["meta"])
            except ValueError:
                meta = {}
            out.append(Message(r["id"], r["chat_id"], r["role"], r["content"], r["status"], meta))
        return out

    def delete_messages_from(self, chat_id: int, message_id: int) -> None:
        """Delete ``message_id`` and everything after it (edit / regenerate)."""
        with self._tx() as c:
            c.execute("DELETE FROM messages WHERE chat_id = ? AND id >= ?", (chat_id, message_id))

    # -- documents ---------------------------------------------------------

    def session_path_for(self, chat_id: int) -> str:
        base = self.data_dir
        if base is None:  # in-memory store: keep sessions in a temp dir
            import tempfile

            base = Path(tempfile.gettempdir()) / APP_NAME
        return str(base / "sessions" / f"chat-{chat_id}.session")

    def set_documents(self, chat_id: int, info: DocumentInfo, model: str = "") -> None:
        sources = json.dumps([s.to_dict() for s in info.sources])
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO documents"
                " (chat_id, sources, token_count, session_path, system_prompt, model, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (chat_id, sources, info.token_count, info.session_path, info.system_prompt, model, time.time()),
            )

    def get_documents(self, chat_id: int) -> Optional[DocumentInfo]:
        row = self.conn.execute("SELECT * FROM documents WHERE chat_id = ?", (chat_id,)).fetchone()
        if row is None:
            return None
        try:
            sources = [DocumentSource.from_dict(d) for d in json.loads(row["sources"])]
        except (ValueError, TypeError):
            sources = []
        return DocumentInfo(sources, row["token_count"], row["session_path"], system_prompt=row["system_prompt"])

    def clear_documents(self, chat_id: int) -> Optional[str]:
        docs = self.get_documents(chat_id)
        with self._tx() as c:
            c.execute("DELETE FROM documents WHERE chat_id = ?", (chat_id,))
        return docs.session_path if docs else None

    # -- small app settings -------------------------------------------------

    def get_setting(self, key: str, default: Optional[str] = None) -> Optional[str]:
        row = self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_setting(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))


def _split_sql(script: str) -> list:
    # Migrations are plain DDL without semicolons inside literals or triggers.
    return [s.strip() for s in script.split(";") if s.strip()]
