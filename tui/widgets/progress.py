"""Prefill progress: a bar plus tokens, tokens/s and ETA; Esc cancels."""
from __future__ import annotations

import math
import time

from textual.containers import Vertical
from textual.widgets import Label, ProgressBar

from ..engine import PrefillProgress


def fmt_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PrefillPanel(Vertical):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.started_at = 0.0
        self.last: PrefillProgress | None = None
        self._prefill_start: tuple | None = None  # (time, done) when the prefill stage began

    def compose(self):
        yield Label("Reading documents…", id="prefill-title")
        yield ProgressBar(total=None, show_eta=False, id="prefill-bar")
        yield Label("", id="prefill-detail", markup=False)

    def on_mount(self) -> None:
        self.display = False

    def start(self, title: str) -> None:
        self.started_at = time.monotonic()
        self.last = None
        self._prefill_start = None
        self.query_one("#prefill-title", Label).update(title)
        self.query_one("#prefill-detail", Label).update("Esc or Ctrl+C cancels")
        self.query_one(ProgressBar).update(total=None, progress=0)
        self.display = True

    def stop(self) -> None:
        self.display = False

    def detail_text(self, p: PrefillProgress, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        if p.stage == "reading":
            return f"reading file {p.done + 1} of {p.total} · Esc cancels"
        if p.stage == "saving":
            return f"{p.total:,} tokens · saving the snapshot…"
        t0, d0 = self._prefill_start or (now, p.done)
        elapsed = now - t0
        # The engine's figures when it gives them (it knows how the cost grows with depth).
        rate = p.tokens_per_s or ((p.done - d0) / elapsed if elapsed > 0 and p.done > d0 else 0.0)
        eta = p.eta_s if p.eta_s is not None else ((p.total - p.done) / rate if rate > 0 else None)
        if p.done >= p.total:
            eta_text = "0:00"
        elif eta is None or not math.isfinite(eta) or p.done == 0:
            eta_text = "estimating…"
        else:
            eta_text = fmt_eta(eta)
        speed = f"{rate:,.0f} tok/s" if rate > 0 else "– tok/s"
        return f"{p.done:,} / {p.total:,} tokens · {speed} · ETA {eta_text} · Esc cancels"

    def update_progress(self, p: PrefillProgress) -> None:
        if p.stage == "prefill" and self._prefill_start is None:
            self._prefill_start = (time.monotonic(), p.done)
        self.last = p
        bar = self.query_one(ProgressBar)
        if p.stage == "prefill" and p.total:
            self.query_one("#prefill-title", Label).update("Prefilling documents")
            bar.update(total=p.total, progress=p.done)
        self.query_one("#prefill-detail", Label).update(self.detail_text(p))
