"""Token ids of a conversation, from the tokenizer's chat template.

Message contents are encoded as plain text (special-token text typed by a user stays text)
and the template's own markup with its special tokens: the template is rendered with
private-use markers in place of the contents and split on them. Documents always come first,
right after the template's text before the first user message, so the state after them is a
true prefix of every conversation about them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

_MARK = "\ue000kimi-msg-{}\ue001"  # private-use: never in real text


class PromptError(ValueError):
    pass


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str
    # a reply's token ids as sampled (end-of-turn excluded): used instead of re-encoding the content,
    # which can tokenize differently, so the prompt continues exactly the state after the reply
    ids: Optional[tuple] = field(default=None, compare=False)

    def as_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


def as_messages(messages) -> list[Message]:
    """Message objects from Message / dicts / anything with .role and .content."""
    out = []
    for m in messages:
        if isinstance(m, Message):
            out.append(m)
        elif isinstance(m, dict):
            out.append(Message(m["role"], m["content"], m.get("ids")))
        else:
            out.append(Message(m.role, m.content, getattr(m, "ids", None)))
    return out


class PromptBuilder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def chat(self, messages: Sequence, after_documents: bool = False, starts: Optional[list] = None) -> list[int]:
        """The whole conversation, ending with the generation prompt.

        after_documents: only what follows `document_prefix` (the first user message onwards).
        starts: when given, where each message's content begins in the ids is appended to it (the
        ids before it depend only on the earlier messages and this one's role: a shared prefix)."""
        tok = self.tokenizer
        messages = as_messages(messages)
        msgs = [{"role": m.role, "content": _MARK.format(i)} for i, m in enumerate(messages)]
        rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        first_user = next((i for i, m in enumerate(messages) if m.role == "user"), None)
        if after_documents and first_user is None:
            raise PromptError("a question is needed after the documents")
        ids, pos = [], 0
        for i, m in enumerate(messages):
            mark = _MARK.format(i)
            if rendered.count(mark) != 1:
                raise PromptError("the chat template does not place every message exactly once")
            j = rendered.index(mark, pos)
            skip = after_documents and i <= first_user  # in the document prefix already
            if not skip and rendered[pos:j]:
                ids += tok.encode(rendered[pos:j], allow_special=True)
            if starts is not None:
                starts.append(len(ids))
            if not (after_documents and i < first_user):
                ids += list(m.ids) if m.ids is not None else tok.encode(m.content)
            pos = j + len(mark)
        if rendered[pos:]:
            ids += tok.encode(rendered[pos:], allow_special=True)
        return list(ids)

    def user(self, text: str, system_prompt: Optional[str] = None) -> list[int]:
        """One user message (after an optional system prompt) and the generation prompt."""
        return self.chat(_with_system(system_prompt, [Message("user", text)]))

    def _halves(self, system_prompt: Optional[str]) -> tuple[list[int], list[int]]:
        """Ids of the template before and after a lone user message's content."""
        ids = self.chat(_with_system(system_prompt, [Message("user", _MARK.format("doc"))]))
        mark = self.tokenizer.encode(_MARK.format("doc"))
        hits = [i for i in range(len(ids) - len(mark) + 1) if ids[i:i + len(mark)] == mark]
        if len(hits) != 1:
            raise PromptError("the chat template does not place the user message exactly once")
        return ids[:hits[0]], ids[hits[0] + len(mark):]

    def document_prefix(self, doc_text: str, system_prompt: Optional[str] = None) -> list[int]:
        """The chat prefix and the documents; any conversation's `chat(..., after_documents=True)` follows."""
        before, _ = self._halves(system_prompt)
        return before + self.tokenizer.encode(doc_text + "\n\n")

    def question(self, question: str, system_prompt: Optional[str] = None) -> list[int]:
        """One question after `document_prefix`: the rest of the user turn and the generation prompt."""
        _, after = self._halves(system_prompt)
        return self.tokenizer.encode(question) + after


def _with_system(system_prompt: Optional[str], msgs: list[Message]) -> list[Message]:
    return ([Message("system", system_prompt)] if system_prompt else []) + msgs
