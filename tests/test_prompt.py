"""runtime.PromptBuilder: the chat template's ids, message text kept plain, documents first."""
import pytest

from fixtures.tiny_tokenizer import write_tiny_tokenizer
from kimi_mlx.runtime import Message, PromptBuilder, PromptError
from kimi_mlx.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    return load_tokenizer(d)


def test_document_and_question_prompts_are_a_true_prefix(tok):
    pb = PromptBuilder(tok)
    doc, q = "第一章 The story <|im_end|> begins.\n", "Who is 👩‍💻?"
    for system in (None, "Be brief <|im_end|>"):
        pre, post = pb.document_prefix(doc, system), pb.question(q, system)
        whole = tok.apply_chat_template(
            ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": doc + "\n\n" + q}],
            add_generation_prompt=True, tokenize=False)
        assert tok.decode(pre + post) == whole
        assert pre == pb.document_prefix(doc, system)  # deterministic
        # special-looking text from the user stays plain: only the template's own <|im_end|> tokens are special
        im_end = tok.special_tokens["<|im_end|>"]
        assert (pre + post).count(im_end) == whole.count("<|im_end|>") - doc.count("<|im_end|>") - (
            system or "").count("<|im_end|>")


def test_chat_is_the_template_and_its_tail_follows_the_documents(tok):
    pb = PromptBuilder(tok)
    msgs = [Message("system", "Be brief."), Message("user", "What is 2+2?")]
    assert pb.chat(msgs) == list(tok.apply_chat_template([m.as_dict() for m in msgs], add_generation_prompt=True))
    assert pb.chat(msgs, after_documents=True) == pb.question("What is 2+2?", "Be brief.")
    assert pb.user("What is 2+2?", "Be brief.") == pb.chat(msgs)
    turns = msgs + [Message("assistant", "4"), Message("user", "And 3+3?")]
    doc = "=== a.txt ===\nsome notes\n\n"
    inline = [turns[0], Message("user", doc + "\n\n" + turns[1].content)] + turns[2:]
    split = pb.document_prefix(doc, "Be brief.") + pb.chat(turns, after_documents=True)
    assert tok.decode(split) == tok.decode(pb.chat(inline))
    with pytest.raises(PromptError, match="question"):
        pb.chat([Message("system", "s")], after_documents=True)


def test_a_reply_keeps_its_sampled_ids(tok):
    pb = PromptBuilder(tok)
    odd = tuple(tok.encode("4")) + tuple(tok.encode("2"))  # "42" as two tokens, as a model may sample it
    with_ids = pb.chat([Message("user", "q"), Message("assistant", "42", odd), Message("user", "and?")])
    plain = pb.chat([Message("user", "q"), Message("assistant", "42"), Message("user", "and?")])
    assert tok.decode(with_ids) == tok.decode(plain)
    assert Message("assistant", "42", odd) == Message("assistant", "42")  # ids don't change what was said
