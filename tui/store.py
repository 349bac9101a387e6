"""Conversations in SQLite.

* Schema versioned with ``PRAGMA user_version``: ``MIGRATIONS[i]`` takes the
  database from version ``i`` to ``i + 1``; each runs in its own transaction
  together with the version bump, so a crash mid-migration changes nothing.
* Every write is one transaction (``BEGIN IMMEDIATE`` .. ``COMMIT``) with
  ``synchronous=FULL`` in WAL mode: a committed message survives a crash.
* Only a database that SQLite reports as damaged (not a database, or failing
  ``PRAGMA integrity_check``) is moved aside, to a new
  ``<name>.corrupt-<timestamp>[-n]`` (never over an earlier backup), and a fresh
  one started; ``Store.notices`` tells the app what happened.  One that is
  locked by another process, unreadable, or in a directory we can't write
  raises :class:`StoreUnavailableError` and nothing is touched.
* The data directory is 0700 and the database files 0600 (chats are private).

All calls are made from the UI thread (sqlite3's default same-thread check).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import sqlite3
import stat
import tempfile
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
    from kimi_mlx.settings import settings

    env = settings().home
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


class StoreUnavailableError(StoreError):
    """Locked by another process, unreadable, or not writable: left as it is."""


class _Damaged(sqlite3.DatabaseError):
    """integrity_check found damage."""


# SQLite primary result codes (sqlite3.Error.sqlite_errorcode & 0xff).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26
_SUFFIXES = ("", "-wal", "-shm")


def _private(path: Union[str, Path], mode: int) -> None:
    """Take away group/other access (never add any: a read-only file stays read-only)."""
    try:
        st = os.stat(path)
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & ~mode:
            os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
    except FileNotFoundError:
        pass


def private_dir(path: Path) -> Path:
    """``path`` created (with parents) and made 0700; raises StoreUnavailableError."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        _private(path, 0o700)
    except OSError as e:
        raise StoreUnavailableError(f"Cannot create the data directory {path}: {e.strerror or e}.") from None
    return path


def _rename_no_replace(src: str, dst: str) -> None:
    """Rename that fails with FileExistsError instead of replacing ``dst``."""
    try:
        os.link(src, dst)  # atomic, and refuses an existing dst
    except FileExistsError:
        raise
    except OSError:  # no hard links on this filesystem
        if os.path.lexists(dst):
            raise FileExistsError(dst) from None
        os.rename(src, dst)
        return
    os.unlink(src)


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
    # Seconds to wait for another process's lock before giving up (SQLite busy timeout).
    BUSY_TIMEOUT = 10.0

    def __init__(self, path: Union[str, Path] = ":memory:"):
        self.path = str(path)
        self.notices: list = []
        self._temp_sessions: Optional[str] = None
        self.conn: Optional[sqlite3.Connection] = self._open()

    # -- opening, corruption, migrations ----------------------------------

    @classmethod
    def open_default(cls, data_dir: Optional[Path] = None) -> "Store":
        data_dir = private_dir(Path(data_dir) if data_dir else default_data_dir())
        return cls(data_dir / DB_NAME)

    @property
    def data_dir(self) -> Optional[Path]:
        return None if self.path == ":memory:" else Path(self.path).parent

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (see _tx).
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.BUSY_TIMEOUT)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                rows = conn.execute("PRAGMA integrity_check").fetchall()
                if [r[0] for r in rows] != ["ok"]:
                    raise _Damaged("integrity check failed: " + "; ".join(str(r[0]) for r in rows[:3]))
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_private(self) -> None:
        # SQLite gives -wal and -shm the mode of the database file: make that 0600 first.
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            for suffix in _SUFFIXES:
                _private(self.path + suffix, 0o600)
        except OSError as e:
            raise StoreUnavailableError(f"Cannot create the chat database {self.path}: {e.strerror or e}.") from None

    def _open(self) -> sqlite3.Connection:
        if self.path == ":memory:":
            conn = self._connect()
            self._migrate(conn)
            return conn
        self._create_private()
        try:
            conn = self._connect()
        except sqlite3.DatabaseError as e:
            code = getattr(e, "sqlite_errorcode", 0) & 0xFF
            if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
                raise StoreUnavailableError(
                    f"The chat database {self.path} is locked by another process "
                    f"(waited {self.BUSY_TIMEOUT:g} s). Close it and start kimi-chat again; nothing was changed."
                ) from None
            if not isinstance(e, _Damaged) and code not in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                raise StoreUnavailableError(f"Cannot open the chat database {self.path} ({e}); nothing was changed.") from None
            try:
                backup = self._move_corrupt()
            except OSError as err:
                raise StoreUnavailableError(
                    f"The chat database {self.path} is damaged ({e}) and could not be moved aside "
                    f"({err.strerror or err}); nothing was changed."
                ) from None
            self.notices.append(
                f"The chat database could not be read ({e}). It was moved to {backup} "
                "and a new, empty one was started."
            )
            self._create_private()
            conn = self._connect()
        self._migrate(conn)
        return conn

    def _move_corrupt(self) -> str:
        """Move the database and its journals to a backup name no file has yet."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in itertools.count():
            backup = f"{self.path}.corrupt-{stamp}" + (f"-{n}" if n else "")
            if any(os.path.lexists(backup + s) for s in _SUFFIXES):
                continue
            try:
                _rename_no_replace(self.path, backup)
            except FileExistsError:  # taken meanwhile
                continue
            break
        for suffix in _SUFFIXES[1:]:  # stale journals belong to the old file
            if os.path.lexists(self.path + suffix):
                _rename_no_replace(self.path + suffix, backup + suffix)
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
        """Checkpoint the WAL into the database file, then close (idempotent)."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            if self.path != ":memory:":
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass  # busy with another process's reader: the WAL is still valid
        finally:
            conn.close()

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

    @property
    def sessions_dir(self) -> Path:
        """Where document sessions are saved (0700); the only place we delete from."""
        if self.data_dir is not None:
            return private_dir(self.data_dir / "sessions")
        if self._temp_sessions is None:  # in-memory store: a private temp dir, not a shared path
            self._temp_sessions = tempfile.mkdtemp(prefix=f"{APP_NAME}-sessions-")
        return Path(self._temp_sessions)

    def session_path_for(self, chat_id: int) -> str:
        return str(self.sessions_dir / f"chat-{chat_id}.session")

    def checkpoint_path_for(self, chat_id: int) -> str:
        """The chat's last conversation state (the engine writes it after each reply)."""
        return str(self.sessions_dir / f"chat-{chat_id}.state")

    def remove_session(self, path: Optional[str]) -> bool:
        """Delete a document session, only if it is directly inside ``sessions_dir``
        (a row may name any path).  Returns False if refused."""
        if not path:
            return True
        p = Path(path)
        real = p.parent.resolve() / p.name  # the entry itself, not what a symlink points to
        if real.parent != self.sessions_dir.resolve() or p.name in ("", ".", ".."):
            return False
        try:
            if real.is_dir() and not real.is_symlink():  # an engine may save a session as a directory
                shutil.rmtree(real)
            else:
                real.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True

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

    # -- search --------------------------------------------------------------

    def search(self, query: str, limit: int = 50) -> list:
        """Chats whose title or any message contains ``query`` (case-insensitive
        for ASCII, as SQLite's LIKE), newest first: [SearchHit]."""
        query = query.strip()
        if not query:
            return []
        pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.conn.execute(
            "SELECT c.*, (SELECT m.content FROM messages m WHERE m.chat_id = c.id"
            "  AND m.content LIKE :p ESCAPE '\\' ORDER BY m.id LIMIT 1) AS hit"
            " FROM chats c WHERE c.title LIKE :p ESCAPE '\\' OR hit IS NOT NULL"
            " ORDER BY c.updated_at DESC, c.id DESC LIMIT :n",
            {"p": pattern, "n": limit},
        ).fetchall()
        return [SearchHit(self._chat(r), _snippet(r["hit"], query) if r["hit"] else "") for r in rows]

    # -- small app settings -------------------------------------------------

    def get_setting(self, key: str, default: Optional[str] = None) -> Optional[str]:
        row = self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_setting(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))


@dataclass
class SearchHit:
    chat: Chat
    snippet: str  # the first matching message around the match; "" if only the title matched


def _snippet(text: str, query: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    at = max(0, flat.lower().find(query.lower()))
    start = max(0, at - width // 3)
    out = flat[start : start + width]
    return ("…" if start else "") + out + ("…" if start + width < len(flat) else "")


def _split_sql(script: str) -> list:
    # Migrations are plain DDL without semicolons inside literals or triggers.
    return [s.strip() for s in script.split(";") if s.strip()]
