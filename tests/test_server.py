"""kimi_mlx.server: a real server (`python -m kimi_mlx.server`, a subprocess) on the tiny fixture model,
driven by the official openai client and by raw HTTP for the error cases.

The fixture's copy here has a 12K-token context (so "longer than the context" is a small request) and a
saved document session. Replies are noise but deterministic at temperature 0; `logit_bias` bans the
end-of-turn tokens where a test needs a reply that doesn't end early.
"""
from __future__ import annotations

import asyncio
import json
import re
import select
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from kimi_mlx.server.bench import start_server, stop_server
from kimi_mlx.server.engine import KEEP_GAP, StopMatcher

from helpers import MODELS

KEY = "test-key"
CONTEXT = 12288
NO_EOS = {"385": -100, "386": -100}  # [EOS], <|im_end|>
DOC = "".join(f"Paragraph {i}: the harbour master logged ship {i * 7} at dawn.\n" for i in range(120))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "tiny_chat"
    shutil.copytree(MODELS / "tiny_chat", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_max_length"] = CONTEXT
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def loaded(model_dir):
    from kimi_mlx.runtime import load

    return load(model_dir)


@pytest.fixture(scope="module")
def session_file(loaded, model_dir):
    from kimi_mlx.runtime import PromptBuilder
    from kimi_mlx.session import DocumentSession

    model, tok = loaded
    path = model_dir.parent / "doc.kimisession"
    DocumentSession.create(model, tok, PromptBuilder(tok).document_prefix(DOC)).save(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir, session_file):
    proc, url = start_server(["--model", str(model_dir), "--api-key", KEY, "--session", str(session_file),
                              "--prefix-cache-mb", "256"])
    yield url
    stop_server(proc)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def _chat(client, content, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    msgs = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return client.chat.completions.create(model="tiny_chat", messages=msgs, **kw)


def _stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def _wait_health(http, pred, timeout=10.0) -> dict:
    t0 = time.monotonic()
    while True:
        h = http.get("/health").json()
        if pred(h):
            return h
        assert time.monotonic() - t0 < timeout, f"health never got there: {h}"
        time.sleep(0.02)


def _idle(h) -> bool:
    return h["running"] is None and h["waiting"] == 0


# -- the openai client ------------------------------------------------------------------------
def test_chat_non_stream_and_stream_agree(client):
    msgs = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Bonjour, ça va ?"}]
    r = _chat(client, msgs, max_tokens=12)
    assert r.object == "chat.completion" and r.model == "tiny_chat"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    text, chunks = _stream_text(_chat(client, msgs, max_tokens=12, stream=True,
                                      stream_options={"include_usage": True}))
    assert text == choice.message.content  # greedy: the same reply, cached or not
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the same prompt again: its state (with the next-token logits) was kept, nothing is prefilled
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # without include_usage no usage chunk comes
    _, plain = _stream_text(_chat(client, msgs, max_tokens=3, stream=True))
    assert plain[-1].choices[0].finish_reason is not None and plain[-1].usage is None


def test_replies_from_the_prefix_cache_equal_fresh_generation(client, loaded):
    """States kept on the way (where the user message begins) continue exactly as a full prefill would."""
    from kimi_mlx.generate import stream_generate
    from kimi_mlx.runtime import PromptBuilder

    model, tok = loaded
    system = "You are terse. " + DOC[:3000]
    first = _chat(client, [{"role": "system", "content": system}, {"role": "user", "content": "Who logged ship 7?"}])
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "And ship 14?"}]
    second = _chat(client, msgs, max_tokens=10)
    starts: list = []
    ids = PromptBuilder(tok).chat(msgs, starts=starts)
    assert starts[-1] > KEEP_GAP
    assert second.usage.prompt_tokens == len(ids)
    assert second.usage.prompt_tokens_details.cached_tokens == starts[-1]  # all but the new question
    fresh = "".join(r.text for r in stream_generate(model, tok, ids, max_tokens=10) if r.finish_reason != "stop")
    assert second.choices[0].message.content == fresh


def test_follow_up_turn_continues_the_reply_state(client):
    q = [{"role": "user", "content": "Name a colour."}]
    a = _chat(client, q, max_tokens=6, logit_bias=NO_EOS)
    assert a.choices[0].finish_reason == "length"
    msgs = q + [{"role": "assistant", "content": a.choices[0].message.content},
                {"role": "user", "content": "Another one?"}]
    b = _chat(client, msgs, max_tokens=4)
    # the reply's sampled ids were remembered: the state after all but its last token (not fed yet) continues
    assert b.usage.prompt_tokens_details.cached_tokens == a.usage.prompt_tokens + a.usage.completion_tokens - 1


def test_document_session_is_a_prefix(client, http, session_file):
    sessions = http.get("/v1/sessions").json()["data"]
    (s,) = sessions
    assert s["id"] == session_file.name and s["user_text_prefix"] == DOC + "\n\n"
    r = _chat(client, s["user_text_prefix"] + "Who logged ship 21?")
    assert r.usage.prompt_tokens_details.cached_tokens == s["tokens"]  # the first request already
    assert http.get("/health").json()["prefix_cache"]["session_tokens"] == s["tokens"]


def test_completions_endpoint(client):
    r = client.completions.create(model="tiny_chat", prompt="Once upon a time", max_tokens=6, temperature=0,
                                  logit_bias=NO_EOS)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.choices[0].text
    chunks = list(client.completions.create(model="tiny_chat", prompt="Once upon a time", max_tokens=6,
                                            temperature=0, logit_bias=NO_EOS, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens
    ids = client.completions.create(model="tiny_chat", prompt=[10, 11, 12, 13], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 4


def test_sampling_seed_and_stop(client):
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.9, logit_bias=NO_EOS)
    a = _chat(client, "Roll some dice.", seed=7, **kw).choices[0].message.content
    assert _chat(client, "Roll some dice.", seed=7, **kw).choices[0].message.content == a
    base = _chat(client, "Spell a word.", max_tokens=12, logit_bias=NO_EOS).choices[0].message.content
    cut = next(i for i in range(2, len(base) - 2) if base.find(base[i:i + 2]) == i)
    stop = base[cut:cut + 2]
    for stream in (False, True):
        r = _chat(client, "Spell a word.", max_tokens=12, logit_bias=NO_EOS, stop=[stop, "\x00never"],
                  stream=stream)
        text = _stream_text(r)[0] if stream else r.choices[0].message.content
        assert text == base[:cut]


def test_stop_matcher_holds_back_a_possible_start():
    m = StopMatcher(["END", "xy"])
    assert m.feed("abcE") == "abc" and m.feed("N") == "" and m.feed("D tail") == "" and m.hit
    m = StopMatcher(["END"])
    assert m.feed("aEN") == "a" and m.feed("x") == "ENx" and m.flush() == "" and not m.hit


def test_models_and_health(client, http, server):
    assert [m.id for m in client.models.list()] == ["tiny_chat"]
    assert client.models.retrieve("tiny_chat").id == "tiny_chat"
    _chat(client, "hello")
    h = httpx.get(f"{server}/health").json()  # no key needed
    assert h["status"] == "ok" and h["context_length"] == CONTEXT
    cache = h["prefix_cache"]
    assert 0 < cache["bytes"] <= cache["max_bytes"] == 256 * 2**20 and cache["states"] >= 2
    assert h["requests"]["completed"] >= 1


# -- raw HTTP: errors ---------------------------------------------------------------------------
def _post(http, body, path="/v1/chat/completions", **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return http.post(path, content=data, headers={"Content-Type": "application/json", **kw.pop("headers", {})}, **kw)


def _msgs(**kw):
    return {"model": "tiny_chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


@pytest.mark.parametrize("body, status, param, code", [
    (b'{"model": "tiny_chat", "messages": [', 400, None, "invalid_json"),
    (b'[1, 2]', 400, None, "invalid_json"),
    (_msgs(model="gpt-4o"), 404, "model", "model_not_found"),
    (_msgs(max_tokens=-5), 400, "max_tokens", None),
    (_msgs(max_completion_tokens=0), 400, "max_completion_tokens", None),
    (b'{"model": "tiny_chat", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "temperature", None),
    (_msgs(temperature=3), 400, "temperature", None),
    (_msgs(top_p="high"), 400, "top_p", None),
    (_msgs(n=2), 400, "n", None),
    (_msgs(stop=[""]), 400, "stop", None),
    (_msgs(logit_bias={"99999": 1}), 400, "logit_bias", None),
    ({"model": "tiny_chat", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", None),
    ({"model": "tiny_chat", "messages": []}, 400, "messages", None),
    ({"model": "tiny_chat", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", None),
])
def test_bad_requests_get_openai_errors(http, body, status, param, code):
    r = _post(http, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param
    assert err["code"] == code


def test_prompt_longer_than_the_context(http, client):
    words = " ".join(f"w{i}" for i in range(CONTEXT))
    r = _post(http, {"model": "tiny_chat", "messages": [{"role": "user", "content": words}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = _post(http, {"model": "tiny_chat", "prompt": words}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        _chat(client, words)
    assert _chat(client, "still there?").choices[0].message.content


def test_auth_routes_and_methods(server, http):
    r = httpx.post(f"{server}/v1/chat/completions", json=_msgs())
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert http.get("/v1/nothing").status_code == 404 and http.get("/v1/nothing").json()["error"]["code"]
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def _raw(server, head: bytes, body_chunks, timeout=10.0) -> bytes:
    """Send a request by hand, stop sending once the server answers, return the answer."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head)
        for chunk in body_chunks:
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(chunk)
            except OSError:  # the server answered and closed
                break
        out, deadline = b"", time.monotonic() + timeout
        while not out.rstrip().endswith(b"}"):
            assert time.monotonic() < deadline, out
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
    return out


def test_a_50mb_body_is_refused_unread(server, http):
    size = 50 * 2**20
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode()
    t0 = time.monotonic()
    out = _raw(server, head, [b"{" + b" " * 65535])  # 64 KB of the 50 MB: the answer comes anyway
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    assert b'"request_too_large"' in out and time.monotonic() - t0 < 5
    # without a Content-Length: refused once the limit is passed, long before 50 MB
    head = head.replace(f"Content-Length: {size}".encode(), b"Transfer-Encoding: chunked")
    mb = b" " * 2**20
    chunks = [b"100000\r\n" + mb + b"\r\n"] * 50
    out = _raw(server, head, chunks)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    assert _post(http, _msgs()).status_code == 200


# -- serving behaviour ----------------------------------------------------------------------------
@contextmanager
def _streaming(server, body):
    """A streaming request left open (its first chunk read) until the block ends, then closed."""
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()  # kept: a line iterator that goes away closes the response
            assert next(line for line in lines if line.startswith("data: "))
            yield


def test_a_client_that_disconnects_cancels_its_generation(server, http):
    _wait_health(http, _idle)
    before = http.get("/health").json()["requests"]
    body = _msgs(max_tokens=5000, logit_bias=NO_EOS, stream=True, temperature=0)
    with _streaming(server, body):
        h = http.get("/health").json()
        assert h["running"] is not None and h["running"]["phase"] == "generate"
    # the connection is closed: the generation stops within a few tokens, not after 5000
    h = _wait_health(http, _idle, timeout=30)
    assert h["requests"]["cancelled"] == before["cancelled"] + 1
    assert h["requests"]["completed"] == before["completed"]
    # a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        _post(http, {**body, "stream": False}, timeout=httpx.Timeout(30, read=0.5))
    h = _wait_health(http, lambda h: _idle(h) and h["requests"]["cancelled"] == before["cancelled"] + 2, timeout=30)
    assert h["requests"]["completed"] == before["completed"]


def test_a_queued_request_whose_client_leaves_never_runs(server, http):
    _wait_health(http, _idle)
    before = http.get("/health").json()["requests"]
    with _streaming(server, _msgs(max_tokens=5000, logit_bias=NO_EOS, stream=True, temperature=0)):
        # queued behind the long one; its client gives up while it waits
        with pytest.raises(httpx.ReadTimeout):
            _post(http, _msgs(max_tokens=20, logit_bias=NO_EOS), timeout=httpx.Timeout(30, read=0.3))
        assert http.get("/health").json()["waiting"] == 1  # still in the queue, marked cancelled
    h = _wait_health(http, lambda h: _idle(h) and h["requests"]["cancelled"] == before["cancelled"] + 2, timeout=30)
    assert h["requests"]["completed"] == before["completed"]  # it would have completed had it run


def test_a_prompt_that_departs_from_a_kept_one_is_kept_there(client):
    """Three completions of one long token sequence with different endings: the second keeps the state where
    it departs from the first, and the third continues from there."""
    base = [(i * 37) % 500 + 20 for i in range(KEEP_GAP + 300)]
    cached = [client.completions.create(model="tiny_chat", prompt=base + end, max_tokens=2, temperature=0)
              .usage.prompt_tokens_details.cached_tokens for end in ([1, 2, 3], [4, 5, 6], [7, 8, 9])]
    assert cached == [0, 0, len(base)]


def test_health_answers_during_a_long_prefill(server, http, loaded):
    _wait_health(http, _idle)
    words = "Log: " + DOC + DOC[:3000]  # about 9K tokens: a second or two of prefill
    assert 8000 < len(loaded[1].encode(words)) < CONTEXT - 100
    result = {}
    t = threading.Thread(target=lambda: result.update(r=_post(http, _msgs(messages=[
        {"role": "user", "content": words}], max_tokens=1))))
    t.start()
    seen, slowest = [], 0.0
    while t.is_alive():
        t0 = time.monotonic()
        h = http.get("/health", timeout=5).json()
        slowest = max(slowest, time.monotonic() - t0)
        if h["running"] and h["running"]["phase"] == "prefill":
            seen.append(h["running"])
        time.sleep(0.02)
    t.join()
    assert result["r"].status_code == 200
    assert any(0 < s["done"] < s["total"] for s in seen), seen  # answered mid-prefill, with its progress
    assert slowest < 5.0  # not blocked for the prefill (generous: CI machines can be busy)


def test_concurrent_streams_all_finish_in_arrival_order(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60) as c:
            streams = []
            for i in range(6):  # each create() returns once the server queued it: arrival order is i
                streams.append(await c.chat.completions.create(
                    model="tiny_chat", messages=[{"role": "user", "content": f"client {i}"}], max_tokens=30,
                    temperature=0, logit_bias=NO_EOS, stream=True, stream_options={"include_usage": True}))

            async def consume(s):
                first, chunks = None, []
                async for ch in s:
                    if first is None:
                        first = time.monotonic()
                    chunks.append(ch)
                return first, chunks

            return await asyncio.gather(*(consume(s) for s in streams))

    results = asyncio.run(run())
    timings = []
    for _, chunks in results:
        last = chunks[-1]
        assert last.usage.completion_tokens == 30 and chunks[-2].choices[0].finish_reason == "length"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        timings.append(last.model_extra["timings"])
    seqs = [t["seq"] for t in timings]
    assert seqs == sorted(seqs)  # arrival order is creation order
    assert [t["started"] for t in timings] == list(range(timings[0]["started"], timings[0]["started"] + 6))
    assert all(t["queue_position"] <= i for i, t in enumerate(timings))  # none waited behind a later one
    queued = [t["queue_ms"] for t in timings]
    assert queued == sorted(queued)


def test_prefix_cache_is_bounded_lru(model_dir):
    proc, url = start_server(["--model", str(model_dir), "--prefix-cache-mb", "2"])
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in range(8):
                body = _msgs(messages=[{"role": "user", "content": f"{i} " + DOC[:1500]}])
                assert c.post("/v1/chat/completions", json=body).status_code == 200
            cache = c.get("/health").json()["prefix_cache"]
            assert cache["max_bytes"] == 2 * 2**20 and 0 < cache["bytes"] <= 2 * 2**20 and cache["evicted"] > 0
            # the most recent prompt is still there
            again = c.post("/v1/chat/completions", json=body).json()
            assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"]
    finally:
        stop_server(proc)


@pytest.mark.parametrize("bad", ["model", "session"])
def test_cli_errors_exit_cleanly(tmp_path, model_dir, bad):
    argv = ["--model", str(tmp_path / "none")] if bad == "model" else [
        "--model", str(model_dir), "--session", str(tmp_path / "gone.kimisession")]
    r = subprocess.run([sys.executable, "-m", "kimi_mlx.server", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert ("no such model directory" if bad == "model" else "session file not found") in r.stderr


def _readme_section_blocks(lang: str) -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## The server (OpenAI-compatible)"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(rf"^```{lang}\n(.*?)^```", section, flags=re.M | re.S)


def _for_this_server(text: str, server: str) -> str:
    return text.replace("http://127.0.0.1:8080", server).replace("Kimi-Linear-4bit", "tiny_chat")


def test_the_readme_examples_work(server, tmp_path):
    """The README's curl lines (sent with httpx: curl may not be installed) and its openai-client block."""
    curls = [line for line in _readme_section_blocks("sh")[0].splitlines() if line.startswith("curl ")]
    assert len(curls) == 3
    for line in curls:
        argv = shlex.split(_for_this_server(line, server))
        url = next(a for a in argv if a.startswith("http"))
        headers = dict(h.split(": ", 1) for h in (argv[i + 1] for i, a in enumerate(argv) if a == "-H"))
        data = next((argv[i + 1] for i, a in enumerate(argv) if a == "-d"), None)
        r = httpx.request("POST" if data else "GET", url, content=data, timeout=60,
                          headers={**headers, "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, (line, r.text)
        assert ("data: [DONE]" in r.text) if "-N" in argv else r.json()
    (code,) = _readme_section_blocks("py")
    code = _for_this_server(code, server).replace('api_key="unused"', f'api_key="{KEY}"')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"\d+ of \d+ prompt tokens cached", r.stdout)
