"""runtime.Conversation: turn checkpoints (each turn prefills only what is new), regenerate,
edit, restart from a saved checkpoint, system prompt changes, bounded memory."""
import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx.generate import stream_generate
from kimi_mlx.runtime import Checkpoint, CheckpointStore, Conversation, load
from kimi_mlx.session import SessionError
from helpers import MODELS

QUESTIONS = ["hello there", "what is two plus two", "and three?"]


class Spy:
    """The model, counting the tokens passed to it (prefill chunks and decode steps)."""

    def __init__(self, model):
        self._m, self.tokens = model, 0
        spy = self

        class Core:
            def __call__(self, x, cache):
                spy.tokens += x.shape[1]
                return model.model(x, cache)

        self.model = Core()

    def __call__(self, x, cache=None, last_n=None):
        self.tokens += x.shape[1]
        return self._m(x, cache=cache, last_n=last_n)

    def __getattr__(self, name):
        return getattr(self._m, name)


@pytest.fixture(scope="module")
def tiny():
    return load(MODELS / "tiny_chat")


def _tokens(rs):
    return [r.token for r in rs]


def _full(model, tok, ids, n):
    return _tokens(stream_generate(model, tok, ids, max_tokens=n))


def _fed(rs):
    """The sampled tokens the model was fed: all but the last when max_tokens ran out."""
    return _tokens(rs)[:len(rs) - (rs[-1].finish_reason == "length")]


def test_each_turn_prefills_only_the_new_tokens_and_matches_a_full_prefill(tiny):
    model, tok = tiny
    spy = Spy(model)
    conv = Conversation(spy, tok, system_prompt="Be brief.")
    held = []  # what the state after the previous reply holds
    for q in QUESTIONS:
        before = spy.tokens
        rs = list(conv.send(q, max_tokens=10))
        ids = conv.prompt_ids(conv.messages[:-1])
        assert ids[:len(held)] == held and conv.reused_tokens == len(held) == rs[-1].cached_tokens
        assert conv.prefilled_tokens == len(ids) - len(held)
        # the new tokens' prefill + one decode step per fed token, nothing else
        assert spy.tokens - before == len(ids) - len(held) + len(_fed(rs))
        assert _tokens(rs) == _full(model, tok, ids, 10)
        held = ids + _fed(rs)


def test_a_changed_reply_falls_back_to_the_prompt_checkpoint(tiny):
    model, tok = tiny
    conv = Conversation(model, tok)
    list(conv.send(QUESTIONS[0], max_tokens=6))
    prompt = conv.prompt_ids(conv.messages[:-1])
    history = [m for m in conv.messages[:-1]] + [type(conv.messages[-1])("assistant", "an edited reply")]
    rs = list(conv.respond(history + [type(history[0])("user", QUESTIONS[1])], max_tokens=6))
    ids = conv.prompt_ids(conv.messages[:-1])
    assert conv.reused_tokens == len(prompt) and conv.prefilled_tokens == len(ids) - len(prompt)
    assert _tokens(rs) == _full(model, tok, ids, 6)


def test_regenerate_and_edit_restore_the_prefix_they_need(tiny):
    model, tok = tiny
    spy = Spy(model)
    conv = Conversation(spy, tok)
    first = _tokens(conv.send(QUESTIONS[0], max_tokens=6))
    ids = conv.prompt_ids(conv.messages[:-1])
    again = _tokens(conv.regenerate(max_tokens=6))
    before = spy.tokens
    assert again == first and conv.prefilled_tokens == 0  # the prompt's checkpoint kept its logits
    rs = list(conv.regenerate(max_tokens=6))
    assert spy.tokens - before == len(_fed(rs))  # decode steps only
    list(conv.send(QUESTIONS[1], max_tokens=6))
    got = _tokens(conv.edit_last("something else entirely", max_tokens=6))
    new_ids = conv.prompt_ids(conv.messages[:-1])
    assert conv.reused_tokens >= len(ids) and conv.reused_tokens + conv.prefilled_tokens == len(new_ids)
    assert got == _full(model, tok, new_ids, 6)


def test_restart_continues_from_the_saved_checkpoint(tiny, tmp_path):
    model, tok = tiny
    conv = Conversation(model, tok, system_prompt="Be brief.")
    for q in QUESTIONS[:2]:
        list(conv.send(q, max_tokens=8))
    path = conv.save(tmp_path / "chat.kimisession")
    saved = conv.last_checkpoint().num_tokens

    later = Conversation(model, tok, system_prompt="Be brief.")  # a new process: nothing in memory
    later.messages = list(conv.messages)
    assert later.restore(path).num_tokens == saved
    got = _tokens(later.send(QUESTIONS[2], max_tokens=8))
    ids = later.prompt_ids(later.messages[:-1])
    assert later.reused_tokens == saved
    assert got == _full(model, tok, ids, 8)

    (tmp_path / "bad.kimisession").write_bytes(path.read_bytes()[:-8])
    with pytest.raises(SessionError):
        later.restore(tmp_path / "bad.kimisession")


def test_a_new_system_prompt_drops_the_checkpoints_sampling_does_not(tiny):
    model, tok = tiny
    conv = Conversation(model, tok, system_prompt="Be brief.")
    list(conv.send(QUESTIONS[0], max_tokens=4, temp=0.0))
    list(conv.send(QUESTIONS[1], max_tokens=4, temp=0.9, top_k=5, seed=1))  # other sampling: reused
    assert conv.reused_tokens > 0
    conv.set_system_prompt("Answer in French.")
    assert conv.last_checkpoint() is None
    rs = list(conv.send(QUESTIONS[2], max_tokens=4))
    ids = conv.prompt_ids(conv.messages[:-1])
    assert conv.reused_tokens == 0 and conv.prefilled_tokens == len(ids)
    assert _tokens(rs) == _full(model, tok, ids, 4)


def test_documents_are_the_base_of_every_turn(tiny):
    from kimi_mlx.session import DocumentSession

    model, tok = tiny
    conv = Conversation(model, tok, system_prompt="Be brief.")
    doc_ids = conv.prompts.document_prefix("The cat is called Tom.", "Be brief.")
    conv.set_documents(DocumentSession.create(model, tok, doc_ids))
    rs = list(conv.send("What is the cat called?", max_tokens=5))
    ids = conv.prompt_ids(conv.messages[:-1])
    assert ids[:len(doc_ids)] == doc_ids and conv.reused_tokens == len(doc_ids)
    assert _tokens(rs) == _full(model, tok, ids, 5)


def test_arrays_the_documents_hold_are_not_counted(tiny):
    model, tok = tiny
    probe = Conversation(model, tok)
    list(probe.send(QUESTIONS[0], max_tokens=2))
    docs = probe.last_checkpoint().cache
    store = CheckpointStore(2**30)
    store.add(Checkpoint(np.array([1, 2], np.int32), docs.copy(), None, "chat"))  # shares every array
    assert store.nbytes == docs.nbytes
    store.held_elsewhere("chat", docs)
    assert store.nbytes == 0
    store.held_elsewhere("chat", None)
    assert store.nbytes == docs.nbytes
    store.held_elsewhere("chat", docs)
    store.forget("chat")  # a deleted chat: nothing of it is kept, its documents not held
    assert len(store) == 0 and store.nbytes == 0 and not store._held


def test_checkpoint_memory_is_bounded_least_recently_used_first(tiny):
    model, tok = tiny
    probe = Conversation(model, tok)
    list(probe.send(QUESTIONS[0], max_tokens=4))
    one = probe.last_checkpoint().cache.nbytes
    store = CheckpointStore(max_bytes=int(one * 2.5))
    chats = [Conversation(model, tok, store=store, key=f"chat{i}") for i in range(3)]
    for c, q in zip(chats, QUESTIONS):
        list(c.send(q, max_tokens=4))
    assert store.nbytes <= store.max_bytes and store.evicted > 0
    assert chats[0].last_checkpoint() is None and chats[2].last_checkpoint() is not None
    # shared arrays count once: a copy adds nothing
    ck = chats[2].last_checkpoint()
    n = store.nbytes
    store.add(Checkpoint(np.concatenate([ck.ids, [1]]), ck.cache.copy(), None, "other"))
    assert store.nbytes == n
    assert CheckpointStore(0).add(Checkpoint(ck.ids, ck.cache, None)) is not None and len(CheckpointStore(0)) == 0


def test_best_needs_logits_for_a_prompt_it_already_holds(tiny):
    model, _ = tiny
    store = CheckpointStore(2**30)
    c = Checkpoint(np.array([1, 2, 3], np.int32), model.make_cache(), None, "k")
    store.add(c)
    assert store.best([1, 2, 3, 4]) is c and store.best([1, 2, 3]) is None and store.best([1, 2]) is None
    c2 = Checkpoint(np.array([1, 2, 3], np.int32), model.make_cache(), mx.zeros((1, 4)), "k")
    store.add(c2)
    assert store.best([1, 2, 3]) is c2 and len(store) == 1


def test_chat_benchmark_prefills_only_each_new_message(tiny):
    from kimi_mlx.runtime.chatbench import run

    model, tok = tiny
    rows = run(model, tok, turns=3, max_tokens=4)
    assert [r["turn"] for r in rows] == [1, 2, 3]
    assert all(r["prefilled_kept"] < r["prefilled_reprefill"] for r in rows[1:])
    assert rows[2]["prefilled_reprefill"] > rows[1]["prefilled_reprefill"] > rows[2]["prefilled_kept"]
    assert all(r["target_s"] > 0 and isinstance(r["meets_target"], bool) for r in rows)


def test_a_document_chat_saves_only_what_follows_its_documents(tiny, tmp_path):
    from kimi_mlx.session import DocumentSession, info

    model, tok = tiny
    conv = Conversation(model, tok, system_prompt="Be brief.")
    docs = DocumentSession.create(model, tok, conv.prompts.document_prefix("The cat is called Tom. " * 40, "Be brief."))
    full = docs.save(tmp_path / "docs.kimisession")
    conv.set_documents(docs)
    list(conv.send(QUESTIONS[0], max_tokens=5))
    path = conv.save(tmp_path / "chat.state")
    n = conv.last_checkpoint().num_tokens
    assert path.stat().st_size < full.stat().st_size  # the documents' MLA rows aren't written again
    assert f"tokens:         {n:,} (after a document session of {docs.num_tokens:,})" in info(path)

    later = Conversation(model, tok, system_prompt="Be brief.")  # a restart: documents from their file
    later.set_documents(DocumentSession.load(full, model, tok))
    later.messages = list(conv.messages)
    assert later.restore(path).num_tokens == n
    got = _tokens(later.send(QUESTIONS[1], max_tokens=5))
    ids = later.prompt_ids(later.messages[:-1])
    assert later.reused_tokens == n and got == _full(model, tok, ids, 5)

    with pytest.raises(SessionError, match="together with its documents"):
        DocumentSession.load(path, model, tok)
    other = DocumentSession.create(model, tok, conv.prompts.document_prefix("Another text.", "Be brief."))
    with pytest.raises(SessionError, match="other documents"):
        DocumentSession.load(path, model, tok, base=other)
