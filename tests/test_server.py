"""`edgeq serve` as a client sees it: the `openai` library (and plain HTTP for what it would not send) against a
real server on loopback, serving the default android bundle through llama.cpp."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")

EDGEQ = [sys.executable, "-m", "edgeq.cli"]
PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@contextmanager
def running_server(bundle: Path, *args: str):
    """`edgeq serve BUNDLE --port 0 ARGS` until the block ends (then Ctrl-C); yields its base URL."""
    p = subprocess.Popen([*EDGEQ, "serve", str(bundle), "--port", "0", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stderr], daemon=True).start()
    seen = []
    url = None
    deadline = time.monotonic() + 180
    while url is None and time.monotonic() < deadline and p.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        if "serving" in line and "http://" in line:
            url = line.split(" at ", 1)[1].split("/v1", 1)[0]
    assert url, f"the server did not start: {''.join(seen)}"
    try:
        yield url
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=60)
        assert rc == 0, "".join(seen)


def http(url: str, path: str, body=None, method: str | None = None, headers: dict | None = None):
    """(status, JSON body) of one request; `body` bytes are sent as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def bundle(android) -> Path:
    return android[0]


@pytest.fixture(scope="module")
def server(bundle):
    with running_server(bundle) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def session(bundle):
    """The same bundle in this process: what the server must answer, token for token (greedy)."""
    from edgeq import runtime

    with runtime.load(bundle) as s:
        yield s


def test_streaming_chat_names_paris(client, session):
    stream = client.chat.completions.create(model="out", messages=PARIS, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    text = "".join(pieces)
    assert "Paris" in text and len(pieces) >= 4                       # it came in pieces, as decoded
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 10
    assert text == session.chat(PARIS, 4096)                          # greedy by default, as the runtime
    whole = client.chat.completions.create(model="out", messages=PARIS)
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens


def test_ten_concurrent_requests_each_get_their_own_reply(client, session):
    questions = ["What is the capital of France?", "What is the capital of Italy?", "Name a colour.",
                 "What is 2 + 2?", "Say hello.", "What is the capital of Spain?", "Name an animal.",
                 "What is water made of?", "Name a planet.", "What is the capital of Germany?"]

    def ask(i: int) -> str:
        msgs = [{"role": "user", "content": questions[i]}]
        if i % 2:
            r = client.chat.completions.create(model="out", messages=msgs, max_tokens=32)
            return r.choices[0].message.content
        chunks = client.chat.completions.create(model="out", messages=msgs, max_tokens=32, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(ask, range(10)))
    want = [session.chat([{"role": "user", "content": q}], 32) for q in questions]
    assert replies == want
    assert len(set(replies)) >= 8 and all(replies)


def test_completions_whole_streamed_echo_stop_and_n(client, session):
    prompt = "The capital of France is"
    r = client.completions.create(model="out", prompt=prompt, max_tokens=12)
    want = session.stream(prompt, 12)
    assert r.choices[0].text == want.result() and "Paris" in r.choices[0].text
    assert r.usage.completion_tokens == want.completion_tokens and r.choices[0].finish_reason == want.finish_reason
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="out", prompt=prompt,
                                                                            max_tokens=12, stream=True))
    assert streamed == r.choices[0].text
    echo = client.completions.create(model="out", prompt=prompt, max_tokens=12, echo=True, stop=["."])
    assert echo.choices[0].text == prompt + r.choices[0].text.split(".")[0]
    assert echo.choices[0].finish_reason == "stop"
    many = client.completions.create(model="out", prompt=prompt, max_tokens=16, n=3, temperature=1.0, seed=4)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert len({c.text for c in many.choices}) > 1                          # seeds 4, 5, 6
    again = client.completions.create(model="out", prompt=prompt, max_tokens=16, n=3, temperature=1.0, seed=4)
    assert [c.text for c in again.choices] == [c.text for c in many.choices]
    ids = session.tokenize(prompt)
    by_ids = client.completions.create(model="out", prompt=ids, max_tokens=12)
    assert by_ids.choices[0].text == r.choices[0].text


def test_models_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["out"] and models[0].owned_by == "edgeq"
    status, body = http(server, "/health")
    assert status == 200 and body["status"] == "ok" and body["backend"] == "gguf"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server):
    cases = {
        "bad json": (b'{"messages": [', 400, None),
        "negative max_tokens": ({"messages": PARIS, "max_tokens": -1}, 400, "max_tokens"),
        "messages not a list": ({"messages": "hi"}, 400, "messages"),
        "a message without role": ({"messages": [{"content": "hi"}]}, 400, "messages"),
        "top_p out of range": ({"messages": PARIS, "top_p": 1.5}, 400, "top_p"),
        "unknown model": ({"messages": PARIS, "model": "gpt-9"}, 404, "model"),
        "oversized prompt": ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "prompt"),
        "tools": ({"messages": PARIS, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    }
    for name, (body, status, param) in cases.items():
        got, err = http(server, "/v1/chat/completions", body)
        assert got == status, (name, err)
        assert set(err) == {"error"} and err["error"]["message"] and err["error"]["type"], name
        assert err["error"]["param"] == param, (name, err)
    assert http(server, "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "word " * 3000}]})[1]["error"]["code"] == \
        "context_length_exceeded"
    assert http(server, "/v1/embeddings", {"input": "hi"})[0] == 400              # a decoder bundle
    assert http(server, "/v1/nothing")[0] == 404
    assert http(server, "/v1/chat/completions", method="GET")[0] == 405
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="out", messages=PARIS, max_tokens=-5)
    r = client.chat.completions.create(model="out", messages=PARIS)
    assert "Paris" in r.choices[0].message.content


def test_full_queue_is_503_a_dropped_stream_stops_and_the_key_is_required(bundle, session):
    eog = sorted(session.stop_ids)
    with running_server(bundle, "--queue-size", "1", "--api-key", "sesame", "--model-name", "smol") as url:
        assert http(url, "/v1/models")[0] == 401
        assert http(url, "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert http(url, "/health")[0] == 200
        key = {"Authorization": "Bearer sesame"}
        assert http(url, "/v1/models", headers=key)[1]["data"][0]["id"] == "smol"
        # A: a long stream (its end-of-generation tokens banned), read a little and then dropped
        long = {"model": "smol", "prompt": "Once upon a time", "max_tokens": 1500, "stream": True,
                "logit_bias": {str(t): -100 for t in eog}}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(long).encode(),
                                     headers={"Content-Type": "application/json", **key})
        a = urllib.request.urlopen(req, timeout=120)
        assert a.readline().startswith(b"data: ")
        assert http(url, "/health")[1]["busy"]
        # B waits in the queue (its one place) ...
        b: list = []
        tb = threading.Thread(target=lambda: b.append(http(url, "/v1/completions", {
            "model": "smol", "prompt": "The capital of France is", "max_tokens": 8}, headers=key)))
        tb.start()
        deadline = time.monotonic() + 30
        while http(url, "/health")[1]["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        # ... so C is turned away at once
        status, err = http(url, "/v1/completions", {"model": "smol", "prompt": "x", "max_tokens": 4}, headers=key)
        assert status == 503 and err["error"]["code"] == "server_busy"
        t0 = time.monotonic()
        a.close()                                   # the client goes away: A stops at its next token
        tb.join(timeout=60)
        assert b and b[0][0] == 200 and b[0][1]["choices"][0]["text"] == session.generate("The capital of France is", 8)
        assert time.monotonic() - t0 < 20           # 1500 tokens of A would take minutes on one thread
        assert not http(url, "/health")[1]["busy"]


@pytest.fixture(scope="module")
def encoder_bundle(tmp_path_factory) -> Path:
    from edgeq.api import ExportOptions, export
    from edgeq.models.recipes.synthetic import write_bert_folder

    root = tmp_path_factory.mktemp("serve-encoder")
    out = root / "enc"
    export(ExportOptions(model=str(write_bert_folder(root / "bert")), backend="onnx", quant="f32", out=str(out)))
    return out


def test_embeddings_from_an_encoder_bundle(encoder_bundle):
    from edgeq import runtime

    texts = ["the capital of it is a value.", "a model and a function"]
    with runtime.load(encoder_bundle) as s:
        want = s.embed(texts)
    with running_server(encoder_bundle) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.embeddings.create(model="enc", input=texts)             # base64, as the client asks by default
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
        assert np.array_equal(got, want) and [d.index for d in r.data] == [0, 1]
        assert r.usage.prompt_tokens > 10
        status, body = http(url, "/v1/embeddings", {"input": texts[0], "encoding_format": "float"})
        assert status == 200 and np.allclose(body["data"][0]["embedding"], want[0], atol=1e-6)
        assert http(url, "/v1/chat/completions", {"messages": PARIS})[0] == 400


def test_an_onnx_bundle_is_served_the_same_and_a_body_needs_no_content_type(tiny_decoder_dir, tmp_path):
    from edgeq import runtime
    from edgeq.api import ExportOptions, export

    out = tmp_path / "tiny-onnx"
    export(ExportOptions(model=str(tiny_decoder_dir), backend="onnx", quant="f32", out=str(out), check=False))
    with runtime.load(out) as s:
        want = s.generate("snow falls on the", 16)
    with running_server(out, "--backend", "onnx") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        chunks = client.completions.create(model="tiny-onnx", prompt="snow falls on the", max_tokens=16, stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        req = urllib.request.Request(url + "/v1/completions", method="POST", data=json.dumps(
            {"prompt": "snow falls on the", "max_tokens": 16}).encode())       # `curl -d` labels it form data
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["choices"][0]["text"] == want
