"""`python -m kimi_mlx.generate`: output modes, documents and sessions, and one-line errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_mlx.generate import main
from fixtures.tiny_tokenizer import write_tiny_tokenizer
from helpers import MODELS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "tiny_grouped"
    shutil.copytree(MODELS / "tiny_grouped", d)
    write_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    p = tmp_path_factory.mktemp("docs") / "notes.txt"
    p.write_text("The launch is on Tuesday.\nThe budget is 40 units.\nAsk Ana about the venue.\n" * 3)
    return p


def _cli(argv, capsys):
    """main() in-process: (exit code, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _subprocess(args, env_extra=None, stdin=None, timeout=120):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "kimi_mlx.generate", *map(str, args)], cwd=REPO, env=env,
                          input=stdin, capture_output=True, timeout=timeout)


def _assert_one_line_error(rc, err):
    assert rc not in (0, None)
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("error: ")
    errs = [l for l in lines if l.startswith("error: ")]
    assert len(errs) == 1
    return errs[0]


# ---------------------------------------------------------------------------
# happy paths
# ---------------------------------------------------------------------------
def test_json_subprocess(model_dir):
    r = _subprocess(["--model", model_dir, "--prompt", "hi", "--max-tokens", 5, "--json"])
    assert r.returncode == 0, r.stderr.decode()
    assert b"Traceback" not in r.stderr
    out = json.loads(r.stdout.decode())
    for k in ("text", "prompt_tokens", "generation_tokens", "prompt_tps", "generation_tps", "peak_memory",
              "finish_reason"):
        assert k in out
    assert 1 <= out["generation_tokens"] <= 5 and out["finish_reason"] in ("stop", "length")
    assert out["prompt_tokens"] > 2  # the chat template wraps "hi"


def test_text_and_verbose(model_dir, capsys):
    rc, out, err = _cli(["--model", model_dir, "--prompt", "hello", "--max-tokens", 4, "--verbose",
                         "--system-prompt", "Be brief."], capsys)
    assert rc == 0
    assert out.endswith("\n")
    assert "Prompt:" in err and "Generation:" in err and "Peak memory:" in err


def test_ignore_chat_template_uses_fewer_tokens(model_dir, capsys):
    rc, out, _ = _cli(["--model", model_dir, "--prompt", "hello", "--max-tokens", 2, "--json",
                       "--ignore-chat-template", "--temp", 0.7, "--top-p", 0.9, "--seed", 1], capsys)
    raw = json.loads(out)
    rc2, out2, _ = _cli(["--model", model_dir, "--prompt", "hello", "--max-tokens", 2, "--json"], capsys)
    assert rc == rc2 == 0
    assert raw["prompt_tokens"] < json.loads(out2)["prompt_tokens"]


def test_document_and_session_give_the_same_answer(model_dir, doc, tmp_path, capsys):
    q = "When is the launch?"
    base = ["--model", model_dir, "--max-tokens", 8, "--json", "--prefill-step-size", 16]
    rc, out, err = _cli(base + ["--document", doc, "--prompt", q], capsys)
    assert rc == 0, err
    direct = json.loads(out)
    assert "for the question); memory needed about" in err
    assert " + runtime " in err and "(weights " in err  # every part of the total is shown
    assert "(an earlier run here)" in err or "prefill time is shown after the first chunk" in err
    assert f"documents: {direct['document_tokens']:,} tokens" in err

    sess = tmp_path / "notes.kimisession"
    rc, out, err = _cli(base + ["--document", doc, "--save-session", sess, "--prompt", q], capsys)
    assert rc == 0, err
    saved_and_answered = json.loads(out)
    assert sess.exists() and "saved session" in err

    rc, out, err = _cli(base + ["--session", sess, "--prompt", q], capsys)
    assert rc == 0, err
    from_session = json.loads(out)

    for other in (saved_and_answered, from_session):
        assert other["tokens"] == direct["tokens"] and other["text"] == direct["text"]
    assert from_session["prompt_tokens"] == direct["prompt_tokens"]  # the question only
    assert from_session["document_tokens"] == direct["document_tokens"] > direct["prompt_tokens"]
    assert len(direct["tokens"]) >= 1

    # a different question from the same session: still runs, from the same snapshot
    rc, out, _ = _cli(base + ["--session", sess, "--prompt", "Who knows the venue?"], capsys)
    assert rc == 0


def test_save_session_only(model_dir, doc, tmp_path, capsys):
    sess = tmp_path / "only.kimisession"
    rc, out, err = _cli(["--model", model_dir, "--document", doc, "--save-session", sess], capsys)
    assert rc == 0, err
    assert out == "" and sess.exists()
    rc, out, err = _cli(["--model", model_dir, "--session", sess, "--prompt", "Budget?", "--max-tokens", 3,
                         "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["generation_tokens"] >= 1


def test_8bit_latent_cache(model_dir, doc, tmp_path, capsys):
    # below 4096 tokens every in-memory MLA page is still the 16-bit tail: the exact answer
    base = ["--model", model_dir, "--document", doc, "--prompt", "Budget?", "--max-tokens", 4, "--json"]
    rc, out, err = _cli(base + ["--mla-cache-bits", 8], capsys)
    assert rc == 0, err
    rc2, out2, _ = _cli(base, capsys)
    assert json.loads(out)["tokens"] == json.loads(out2)["tokens"]
    # a saved 8-bit session stores the whole latent cache quantized, and still answers
    sess = tmp_path / "s8.kimisession"
    rc, _, err = _cli(["--model", model_dir, "--document", doc, "--save-session", sess, "--mla-cache-bits", 8],
                      capsys)
    assert rc == 0, err
    rc, out, err = _cli(["--model", model_dir, "--session", sess, "--prompt", "Budget?", "--max-tokens", 3,
                         "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["generation_tokens"] >= 1


# ---------------------------------------------------------------------------
# bad input: one clear line, non-zero exit, no traceback
# ---------------------------------------------------------------------------
def test_missing_tokenizer(tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(MODELS / "tiny_grouped", d)
    rc, _, err = _cli(["--model", d, "--prompt", "hi"], capsys)
    _assert_one_line_error(rc, err)


def test_model_dir_without_config(model_dir, tmp_path, capsys):
    d = tmp_path / "noconfig"
    shutil.copytree(model_dir, d)
    (d / "config.json").unlink()
    rc, _, err = _cli(["--model", d, "--prompt", "hi"], capsys)
    assert "config.json" in _assert_one_line_error(rc, err)


def test_missing_model_dir(tmp_path, capsys):
    rc, _, err = _cli(["--model", tmp_path / "nowhere", "--prompt", "hi"], capsys)
    assert "no such model directory" in _assert_one_line_error(rc, err)


def test_unknown_repo_offline(tmp_path):
    r = _subprocess(["--model", "nobody-here/no-such-model", "--prompt", "hi"],
                    env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    line = _assert_one_line_error(r.returncode, r.stderr.decode())
    assert "nobody-here/no-such-model" in line and "local cache" in line


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(model_dir, prompt, capsys):
    rc, _, err = _cli(["--model", model_dir, "--prompt", prompt], capsys)
    assert "empty" in _assert_one_line_error(rc, err)


def test_prompt_longer_than_context(model_dir, tmp_path, capsys):
    d = tmp_path / "short"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_max_length"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    rc, _, err = _cli(["--model", d, "--prompt", "word " * 40], capsys)
    assert "longer than the model's context of 16" in _assert_one_line_error(rc, err)


def test_invalid_utf8_stdin(model_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok \xff\xfe bad")))
    rc, _, err = _cli(["--model", model_dir, "--prompt", "-"], capsys)
    assert "not valid UTF-8 (byte 0xff at offset 3)" in _assert_one_line_error(rc, err)


def test_stdin_prompt(model_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("héllo".encode())))
    rc, out, err = _cli(["--model", model_dir, "--prompt", "-", "--max-tokens", 2, "--json"], capsys)
    assert rc == 0, err


def test_bad_document_and_session_paths(model_dir, tmp_path, capsys):
    rc, _, err = _cli(["--model", model_dir, "--document", tmp_path / "missing.txt", "--prompt", "q"], capsys)
    assert "missing.txt" in _assert_one_line_error(rc, err)
    bogus = tmp_path / "bogus.kimisession"
    bogus.write_bytes(b"not a session")
    rc, _, err = _cli(["--model", model_dir, "--session", bogus, "--prompt", "q"], capsys)
    _assert_one_line_error(rc, err)


def test_usage_errors(model_dir, capsys):
    for argv in (["--session", "x"], ["--max-tokens", "0", "--prompt", "q"], ["--temp", "-1", "--prompt", "q"],
                 ["--save-session", "x", "--prompt", "q"]):
        rc, _, err = _cli(["--model", model_dir, *argv], capsys)
        assert rc == 2 and "Traceback" not in err and "error:" in err


def test_ctrl_c_during_generation_keeps_the_text(model_dir, capsys, monkeypatch):
    from kimi_mlx import generate as G

    polls = []

    def fake_poll(self):  # what the first Ctrl-C does: the flag reads True from then on
        polls.append(1)
        return len(polls) >= 4  # 1 prefill chunk, then 3 tokens

    monkeypatch.setattr(G._Interrupt, "__call__", fake_poll)
    rc, out, err = _cli(["--model", model_dir, "--prompt", "go", "--max-tokens", 50, "--json"], capsys)
    d = json.loads(out)
    if d["finish_reason"] != "stop":  # the tiny model may end its turn first
        assert rc == 130 and d["finish_reason"] == "cancelled" and d["generation_tokens"] == 3
        assert "interrupted" in err and "Traceback" not in err


def test_unwritable_save_session_fails_before_the_prefill(model_dir, doc, tmp_path, capsys, monkeypatch):
    from kimi_mlx import session as S

    monkeypatch.setattr(S, "prefill", lambda *a, **k: pytest.fail("prefill ran"))
    (tmp_path / "afile").write_text("x")
    for target, msg in ((tmp_path / "afile" / "s.kimisession", "cannot create its directory"),
                        (tmp_path, "is a directory")):
        rc, _, err = _cli(["--model", model_dir, "--document", doc, "--save-session", target], capsys)
        assert msg in _assert_one_line_error(rc, err)


def test_no_disk_space_for_the_session_fails_before_the_prefill(model_dir, doc, tmp_path, capsys, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    from kimi_mlx import session as S

    monkeypatch.setattr(S, "prefill", lambda *a, **k: pytest.fail("prefill ran"))
    monkeypatch.setattr(sh, "disk_usage", lambda p: namedtuple("u", "total used free")(10**9, 10**9, 100))
    rc, _, err = _cli(["--model", model_dir, "--document", doc, "--save-session", tmp_path / "s.kimisession"],
                      capsys)
    assert "not enough disk space for the session" in _assert_one_line_error(rc, err)


def test_disk_full_while_saving_is_one_line(model_dir, doc, tmp_path, capsys, monkeypatch):
    import mlx.core as mx

    def full(*a, **k):
        raise RuntimeError("[write] Unable to write 4096 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full)
    rc, _, err = _cli(["--model", model_dir, "--document", doc, "--save-session", tmp_path / "s.kimisession"],
                      capsys)
    assert "cannot write the session" in _assert_one_line_error(rc, err)
    assert list(tmp_path.iterdir()) == []
