"""kimi-chat in a real terminal (tmux): it draws, answers a message and quits cleanly.

Uses the scripted engine (--fake-engine); skipped where tmux isn't installed.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")


def test_runs_in_a_real_terminal(tmp_path):
    # A private server (-L) and no user config (-f /dev/null): nothing shared with other tmux users.
    tmux = [TMUX, "-L", f"kimi-tui-{uuid.uuid4().hex[:8]}", "-f", "/dev/null"]
    data, rc_file = tmp_path / "data", tmp_path / "rc"
    app = f"{shlex.quote(sys.executable)} -m tui --fake-engine --data-dir {shlex.quote(str(data))}"
    cmd = f"KIMI_MLX_FAKE_DELAY=0.005 {app}; echo $? > {shlex.quote(str(rc_file))}"

    def screen() -> str:
        out = subprocess.run(tmux + ["capture-pane", "-p", "-t", "kimi"], capture_output=True, text=True)
        return out.stdout

    def wait_for(pred, what, timeout=40.0):
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen:\n{screen()}")
            time.sleep(0.1)

    try:
        subprocess.run(tmux + ["new-session", "-d", "-s", "kimi", "-x", "100", "-y", "30", "sh", "-c", cmd], check=True)
        wait_for(lambda: "Chats" in screen() and "fake-kimi" in screen() and "ctx 0 / 32,768" in screen(), "first draw")
        subprocess.run(tmux + ["send-keys", "-t", "kimi", "-l", "hello from tmux"], check=True)
        subprocess.run(tmux + ["send-keys", "-t", "kimi", "Enter"], check=True)
        wait_for(lambda: "You asked: hello from tmux" in screen() and "Done." in screen(), "streamed reply")
        subprocess.run(tmux + ["send-keys", "-t", "kimi", "C-q"], check=True)
        wait_for(lambda: rc_file.exists() and rc_file.read_text().strip(), "exit")
        assert rc_file.read_text().strip() == "0"
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)

    from tui.store import Store

    store = Store.open_default(data)
    [chat] = store.list_chats()
    assert [(m.role, m.status) for m in store.list_messages(chat.id)] == [("user", "ok"), ("assistant", "ok")]
