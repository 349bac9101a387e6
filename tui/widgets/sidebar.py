"""The list of chats: Enter opens, n new, r rename, d / Delete deletes."""
from __future__ import annotations

from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Label, ListItem, ListView


class ChatItem(ListItem):
    def __init__(self, chat_id: int, title: str):
        super().__init__(Label(title, classes="chat-title", markup=False))
        self.chat_id = chat_id
        self.title = title


class ChatList(ListView):
    BINDINGS = [
        Binding("n", "screen.new_chat", "New", show=False),
        Binding("r,f2", "screen.rename_chat", "Rename", show=False),
        Binding("d,delete", "screen.delete_chat", "Delete", show=False),
    ]


class Sidebar(Vertical):
    class ChatSelected(Message):
        def __init__(self, chat_id: int):
            super().__init__()
            self.chat_id = chat_id

    def compose(self):
        yield Label("Chats", classes="sidebar-title")
        yield ChatList(id="chat-list")
        yield Label("r rename · d delete", classes="sidebar-hint")

    @property
    def list_view(self) -> ChatList:
        return self.query_one(ChatList)

    async def set_chats(self, chats, current_id) -> None:
        lv = self.list_view
        await lv.clear()
        items = [ChatItem(c.id, c.title) for c in chats]
        if items:
            await lv.extend(items)
        for i, c in enumerate(chats):
            if c.id == current_id:
                lv.index = i
        for item in items:
            item.set_class(item.chat_id == current_id, "-current")

    @property
    def items(self) -> list:
        return list(self.query(ChatItem))

    def highlighted_chat_id(self):
        item = self.list_view.highlighted_child
        return item.chat_id if isinstance(item, ChatItem) else None

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        event.stop()
        if isinstance(event.item, ChatItem):
            self.post_message(self.ChatSelected(event.item.chat_id))
