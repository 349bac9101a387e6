"""The chat database: nothing lost, nothing leaked (tui/store.py and its use by the app)."""
from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from tui.store import DB_NAME, Store, StoreUnavailableError

ROOT = Path(__file__).resolve().parent.parent


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def healthy_db(data: Path, title: str = "precious") -> Path:
    s = Store.open_default(data)
    c = s.create_chat(title)
    for i in range(50):
        s.add_message(c.id, "user", f"message {i} " * 20)
    s.close()
    return data / DB_NAME


@pytest.fixture
def world_dir():
    """A directory another (unprivileged) user can reach: pytest's tmp_path is 0700."""
    d = Path(tempfile.mkdtemp(prefix="kimi-tui-store-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_unprivileged(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run Python as a user without root's override of file permissions."""
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions can't be tested")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME=str(cwd))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def test_locked_database_waits_then_says_so_and_is_never_moved(tmp_path, monkeypatch):
    db = healthy_db(tmp_path)
    before = db.read_bytes()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr(Store, "BUSY_TIMEOUT", 0.2)
    try:
        with pytest.raises(StoreUnavailableError, match="locked by another process"):
            Store(db)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not list(tmp_path.glob("*.corrupt-*")) and db.read_bytes() == before
    assert [c.title for c in Store(db).list_chats()] == ["precious"]


def test_lock_released_while_waiting_opens_normally(tmp_path):
    db = healthy_db(tmp_path)
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")  # WAL readers are blocked only by an exclusive-mode lock
    released = threading.Event()
    threading.Timer(0.3, lambda: (holder.close(), released.set())).start()
    s = Store(db)  # busy timeout: waits instead of giving up or moving it aside
    assert released.is_set() and [c.title for c in s.list_chats()] == ["precious"]


def test_only_damaged_databases_are_moved_aside_never_over_a_backup(tmp_path, monkeypatch):
    import time as time_mod

    monkeypatch.setattr(time_mod, "strftime", lambda fmt, *a: "20250101-000000")  # same second every time
    db = tmp_path / DB_NAME
    backups = []
    for n in range(3):
        db.write_bytes(f"not a database {n} ".encode() * 100)
        s = Store(db)
        assert "moved to" in s.notices[0] and s.list_chats() == []
        s.close()
        backups = sorted(tmp_path.glob(DB_NAME + ".corrupt-*"))
        assert len(backups) == n + 1
    assert sorted(b.read_bytes() for b in backups) == [f"not a database {n} ".encode() * 100 for n in range(3)]

    # a real database whose pages are damaged fails integrity_check: moved aside too
    db.unlink()
    healthy_db(tmp_path)
    raw = bytearray(db.read_bytes())
    page = 4096
    raw[page * 2 : page * 2 + 200] = b"\xff" * 200  # a b-tree page of the messages
    db.write_bytes(bytes(raw))
    s = Store(db)
    assert s.notices and "moved to" in s.notices[0]
    assert len(list(tmp_path.glob(DB_NAME + ".corrupt-*"))) == 4


def test_unreadable_or_read_only_is_one_line_and_untouched(world_dir):
    data = world_dir / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    db = healthy_db(data)
    os.chmod(data, 0o755)
    os.chmod(db, 0o644)
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    before = db.read_bytes()
    # another user's data dir: not writable (no -wal/-shm can be made), file readable
    out = run_unprivileged(f"import sys; from tui.__main__ import main; sys.exit(main(['--fake-engine', '--data-dir', {str(data)!r}]))", world_dir)
    assert out.returncode == 1, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("kimi-chat: ") and "Traceback" not in out.stderr and str(db) in line
    # unreadable database file
    os.chmod(db, 0o600)
    os.chmod(data, 0o777)
    out = run_unprivileged(f"import sys; from tui.__main__ import main; sys.exit(main(['--fake-engine', '--data-dir', {str(data)!r}]))", world_dir)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "kimi-chat: " in out.stderr, out.stderr
    assert sorted(p.name for p in data.iterdir()) == [DB_NAME] and db.read_bytes() == before


def test_read_only_dir_with_damaged_database_is_one_line(world_dir):
    data = world_dir / "data"
    data.mkdir()
    (data / DB_NAME).write_bytes(b"junk" * 1000)
    os.chmod(data / DB_NAME, 0o644)
    os.chmod(data, 0o755)  # not writable by the unprivileged user: can't be moved aside
    out = run_unprivileged(f"import sys; from tui.__main__ import main; sys.exit(main(['--fake-engine', '--data-dir', {str(data)!r}]))", world_dir)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "could not be moved aside" in out.stderr and out.stderr.count("\n") == 1
    assert [p.name for p in data.iterdir()] == [DB_NAME]


def test_database_files_and_directories_are_private(tmp_path):
    data = tmp_path / "new"
    s = Store.open_default(data)
    c = s.create_chat("x")
    s.add_message(c.id, "user", "secret")
    s.session_path_for(c.id)
    for suffix in ("", "-wal", "-shm"):
        assert mode(str(data / DB_NAME) + suffix) == 0o600, suffix
    assert mode(data) == 0o700 and mode(data / "sessions") == 0o700
    s.close()
    # an existing installation is fixed on open
    os.chmod(data, 0o755)
    os.chmod(data / "sessions", 0o755)
    os.chmod(data / DB_NAME, 0o644)
    s = Store.open_default(data)
    s.session_path_for(1)
    assert mode(data) == 0o700 and mode(data / DB_NAME) == 0o600 and mode(data / "sessions") == 0o700
    assert all(mode(str(data / DB_NAME) + x) == 0o600 for x in ("-wal", "-shm"))
    # an in-memory store keeps sessions in its own private temp dir, not a shared fixed path
    mem = Store(":memory:")
    d = Path(mem.session_path_for(1)).parent
    assert mode(d) == 0o700 and d != Path(tempfile.gettempdir()) / "kimi-mlx" / "sessions"


def test_sessions_are_only_removed_inside_the_sessions_dir(tmp_path):
    from tui.engine import DocumentInfo

    s = Store.open_default(tmp_path / "data")
    outside = tmp_path / "important"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    c1, c2, c3 = s.create_chat("a"), s.create_chat("b"), s.create_chat("c")
    s.set_documents(c1.id, DocumentInfo([], 1, str(outside)))
    s.set_documents(c2.id, DocumentInfo([], 1, str(Path(s.session_path_for(c2.id)).parent / ".." / "..")))
    link = Path(s.session_path_for(c3.id))
    link.symlink_to(outside)
    s.set_documents(c3.id, DocumentInfo([], 1, str(link)))
    assert s.remove_session(s.delete_chat(c1.id)) is False
    assert s.remove_session(s.delete_chat(c2.id)) is False
    assert s.remove_session(s.delete_chat(c3.id)) is True  # the link inside is removed, not its target
    assert (outside / "keep.txt").read_text() == "keep" and not link.is_symlink()
    inside = Path(s.session_path_for(9))
    inside.mkdir()
    (inside / "part").write_text("x")
    assert s.remove_session(str(inside)) and not inside.exists()


def test_clean_quit_checkpoints_the_wal(tmp_path):
    import asyncio

    from tui.app import KimiChatApp
    from tui.engine import FakeEngine

    async def run():
        app = KimiChatApp(FakeEngine(), data_dir=tmp_path, start_dir=str(tmp_path))
        async with app.run_test(size=(100, 30)) as pilot:
            while not (app.engine_state == "ready" and app.chat_screen and app.chat_screen.chat):
                await pilot.pause(0.02)
            app.chat_screen.store.add_message(app.chat_screen.chat.id, "user", "kept")

    asyncio.run(run())
    # The .sqlite3 file alone (copied without its -wal) holds everything.
    alone = tmp_path / "copy.sqlite3"
    shutil.copyfile(tmp_path / DB_NAME, alone)
    assert not os.path.exists(str(tmp_path / DB_NAME) + "-wal") or os.path.getsize(str(tmp_path / DB_NAME) + "-wal") == 0
    conn = sqlite3.connect(alone)
    assert conn.execute("SELECT content FROM messages").fetchall() == [("kept",)]


def test_search_titles_and_messages(tmp_path):
    s = Store.open_default(tmp_path)
    a = s.create_chat("Holiday plans")
    b = s.create_chat("Taxes")
    s.add_message(b.id, "user", "What is 100% of the deductible for a home_office?")
    c = s.create_chat("Other")
    s.add_message(c.id, "assistant", "nothing relevant")
    assert [h.chat.id for h in s.search("holiday")] == [a.id]
    [hit] = s.search("HOME_OFFICE")
    assert hit.chat.id == b.id and "home_office" in hit.snippet
    assert [h.chat.id for h in s.search("100%")] == [b.id]  # LIKE wildcards are literal
    assert s.search("_") == [] or all("_" in h.chat.title or "_" in h.snippet for h in s.search("_"))
    assert s.search("   ") == [] and s.search("zzz") == []
