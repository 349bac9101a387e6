"""One line: model, context used / max, prompt and generation speed, peak memory."""
from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static


class StatusBar(Static):
    model: reactive[str] = reactive("")
    state: reactive[str] = reactive("loading")  # "loading" | "ready" | "failed"
    context_tokens: reactive[int] = reactive(0)
    max_context: reactive[int] = reactive(0)
    prompt_tps: reactive[float] = reactive(0.0)
    generation_tps: reactive[float] = reactive(0.0)
    peak_memory_gb: reactive[float] = reactive(0.0)
    checkpoint_bytes: reactive[int] = reactive(0)  # kept conversation states

    def render(self) -> str:
        if self.state == "loading":
            model = f"{self.model} (loading…)"
        elif self.state == "failed":
            model = f"{self.model} (no model)"
        else:
            model = self.model
        parts = [model]
        if self.max_context:
            pct = 100.0 * self.context_tokens / self.max_context
            parts.append(f"ctx {self.context_tokens:,} / {self.max_context:,} ({pct:.0f}%)")
        parts.append(f"prompt {self.prompt_tps:,.1f} tok/s")
        parts.append(f"gen {self.generation_tps:,.1f} tok/s")
        parts.append(f"peak {self.peak_memory_gb:.2f} GB")
        if self.checkpoint_bytes:
            parts.append(f"kept {self.checkpoint_bytes / 1e6:,.1f} MB")
        return " │ ".join(parts)

    def update_from(self, delta) -> None:
        if delta.context_tokens:
            self.context_tokens = delta.context_tokens
        if delta.prompt_tps:
            self.prompt_tps = delta.prompt_tps
        if delta.generation_tps:
            self.generation_tps = delta.generation_tps
        if delta.checkpoint_bytes:
            self.checkpoint_bytes = delta.checkpoint_bytes
        if delta.peak_memory_gb:
            self.peak_memory_gb = max(self.peak_memory_gb, delta.peak_memory_gb)
