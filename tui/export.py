"""A chat as a Markdown document (``/export``, Ctrl+S)."""
from __future__ import annotations

import re
import time
from itertools import count
from pathlib import Path
from .widgets.message import ROLE_NAMES, STATUS_NOTES


def slug(title: str) -> str:
    """A file name from a chat title: letters, digits, - and _ only."""
    s = re.sub(r"[^\w-]+", "-", title, flags=re.UNICODE).strip("-_")
    return s[:60] or "chat"


def unique_path(path: Path) -> Path:
    """``path``, or ``name-2.md``, ``name-3.md``… if it exists."""
    if not path.exists():
        return path
    for n in count(2):
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not candidate.exists():
            return candidate


def _hard_breaks(text: str) -> str:
    # The user's line breaks are meant literally; Markdown would join the lines.
    # Two trailing spaces (not a backslash): harmless inside a code fence.
    lines = text.split("\n")
    return "\n".join(
        line + "  " if line.strip() and i + 1 < len(lines) and lines[i + 1].strip() else line
        for i, line in enumerate(lines)
    )


def chat_markdown(chat, messages, docs=None, model: str = "") -> str:
    out = [f"# {chat.title}", ""]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(chat.created_at))
    out.append(f"*Exported from kimi-chat · started {when}" + (f" · model {model}" if model else "") + "*")
    out.append("")
    if chat.system_prompt.strip():
        out += ["**System prompt:**", "", "> " + chat.system_prompt.strip().replace("\n", "\n> "), ""]
    if docs is not None and docs.sources:
        out += ["**Documents:** " + ", ".join(f"`{s.label}` ({s.tokens:,} tokens)" for s in docs.sources), ""]
    for m in messages:
        note = STATUS_NOTES.get(m.status, "")
        out += [f"## {ROLE_NAMES.get(m.role, m.role)}" + (f" ({note})" if note else ""), ""]
        out += [_hard_breaks(m.content) if m.role == "user" else m.content, ""]
    return "\n".join(out)
