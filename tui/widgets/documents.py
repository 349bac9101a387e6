"""Document chips: one per attached file or directory, with its token count."""
from __future__ import annotations

from typing import Optional

from textual.containers import Horizontal
from textual.content import Content
from textual.widgets import Static

from ..engine import DocumentInfo, DocumentSource


def fmt_tokens(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.2f}M"
    if n >= 10_000:
        return f"{n / 1000:.0f}k"
    return f"{n:,}"


class DocumentChip(Static):
    def __init__(self, source: DocumentSource):
        icon = "▸" if source.kind == "dir" else "▪"
        files = f" ({source.files} files)" if source.kind == "dir" else ""
        super().__init__(f"{icon} {source.label}{files} · {fmt_tokens(source.tokens)} tok", classes="doc-chip", markup=False)
        self.source = source
        self.tooltip = Content(f"{source.path}\n{source.tokens:,} tokens")  # plain: paths may hold "[...]"


class DocumentBar(Horizontal):
    """Hidden when the chat has no documents."""

    def on_mount(self) -> None:
        self.display = False

    async def set_documents(self, info: Optional[DocumentInfo], restoring: bool = False) -> None:
        await self.remove_children()
        if info is None or not info.sources:
            self.display = False
            return
        chips = [DocumentChip(s) for s in info.sources]
        state = " · restoring…" if restoring else ""
        chips.append(Static(f"Σ {info.token_count:,} tokens{state}", classes="doc-total"))
        await self.mount_all(chips)
        self.display = True

    @property
    def chips(self) -> list:
        return list(self.query(DocumentChip))
