"""F1: keys and commands."""
from __future__ import annotations

from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP_TEXT = """\
# kimi-chat

## Keys

- **Enter** send · **Ctrl+J** new line (**Shift+Enter** too where the terminal passes it on; under tmux
  and many terminals it arrives as a plain Enter, so use Ctrl+J)
- **Esc** stop the reply or the document prefill (a partial reply is kept) · **Ctrl+C** the same while the model works
- **Up** in the empty input: edit your last message and resend it
- **Ctrl+R** regenerate the last reply
- **Ctrl+N** new chat · **Ctrl+O** attach a file or directory · **Ctrl+B** show/hide the chat list
- **Ctrl+L** go to the chat list · **Ctrl+F** search chats (titles and messages) · **Ctrl+S** export the chat to Markdown
- **F2** rename chat · **F3** chat settings (system prompt, sampling) · **F4** switch model · **F8** delete chat
- **Tab** move between chat list, messages and input
- On a message: **c** copy it · **y** copy its code blocks (again for the next one) · **e** edit · **r** regenerate
- In the chat list: **Enter** open · **r** rename · **d** delete
- **Ctrl+P** command palette: every action · **F1** this help · **Ctrl+Q** quit

## Commands

- `/load PATH ...` attach files or directories (`/attach` too)
- `/docs` list the attached documents · `/clear-docs` remove them from this chat
- `/new` · `/rename TITLE` · `/delete` manage chats
- `/system TEXT` set the system prompt · `/settings` edit all chat settings
- `/set NAME VALUE` with temperature, top_p, top_k, min_p, max_tokens or seed
- `/search TEXT` find chats · `/export [PATH]` save this chat as Markdown · `/model [PATH]` switch model
- `/regen` · `/help` · `/quit`
- `//text` sends `/text` as a message (an unknown command is kept in the input)

## Documents

Attached documents are read and prefilled once; the snapshot is saved next to the
chat, so further questions, and reopening the chat later, do not read them again.
The system prompt is part of that snapshot: changing it prefills the documents again.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss(None)", "Close")]

    def compose(self):
        with VerticalScroll(classes="help-box"):
            yield Markdown(HELP_TEXT)
