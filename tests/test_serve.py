"""``serve`` through real HTTP clients: the official ``openai`` package, curl for the raw
server-sent events, and a bare socket for what no client library sends.  The server runs as the
console script on a tiny export through the mil driver, on a free loopback port."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

CLI = Path(sys.executable).parent / "anemll-mlx"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
QUESTION = "What is the capital of France?"
MAX = 8


class Server:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}/v1"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=120)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, json.loads(data)


@pytest.fixture(scope="module")
def server(tiny_export) -> Iterator[Server]:
    _, export = tiny_export
    proc = subprocess.Popen(
        [str(CLI), "serve", f"mil:{export}", "--port", "0", "--model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()  # "serving tiny (mil:..., context 128) at http://127.0.0.1:PORT/v1"
    assert line.startswith("serving tiny"), line + proc.stderr.read()
    port = int(line.rsplit(":", 1)[1].split("/")[0])
    yield Server(proc, port)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "stopped" in err, err  # a clean stop, said in one line
    assert "Traceback" not in err


def generate(export: Path, prompt: str, *flags: str) -> str:
    done = subprocess.run(
        [str(CLI), "generate", f"mil:{export}", "--prompt", prompt, "--max-tokens", str(MAX), "--temp", "0", "--json", *flags],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])["text"]


@pytest.fixture(scope="module")
def expected(tiny_export) -> dict[str, str]:
    """What `generate` says with the same driver, greedy: the chat answer and the plain completion."""
    _, export = tiny_export
    return {"chat": generate(export, QUESTION), "completion": generate(export, "The capital of France is", "--no-chat")}


def chat(server: Server, **kwargs):
    messages = kwargs.pop("messages", [{"role": "user", "content": QUESTION}])
    return server.client().chat.completions.create(model="tiny", messages=messages, temperature=0, **kwargs)


def test_models(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_completion_is_generates_text(server, expected):
    response = chat(server, max_tokens=MAX)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected["chat"]
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens == MAX or choice.finish_reason == "stop"


def test_streamed_chat_is_the_same_text(server, expected):
    stream = chat(server, max_tokens=MAX, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["chat"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_completions_plain_and_streamed(server, expected):
    client = server.client()
    plain = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=MAX, temperature=0)
    assert plain.choices[0].text == expected["completion"]
    stream = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=MAX, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected["completion"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_cut_the_text(server, expected, stream):
    text = expected["completion"]
    stop = text[3:5]
    assert len(stop) == 2 and stop.strip(), text
    cut = text[: text.find(stop)]
    client = server.client()
    kwargs = dict(model="tiny", prompt="The capital of France is", max_tokens=MAX, temperature=0, stop=[stop, "never there"])
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        got = "".join(c.choices[0].text for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        response = client.completions.create(**kwargs)
        got = response.choices[0].text
        assert response.choices[0].finish_reason == "stop"
    assert got == cut


def test_four_concurrent_clients_all_get_complete_answers(server):
    questions = ["Tell me about dogs.", "Tell me about cats.", "What is two plus two?", "Name a colour."]

    def ask(q: str):
        response = chat(server, messages=[{"role": "user", "content": q}], max_tokens=MAX)
        return response.choices[0], response.usage

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, questions))
    for choice, usage in answers:
        assert choice.finish_reason in ("stop", "length")
        assert usage.completion_tokens == MAX or choice.finish_reason == "stop"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": "word " * 200}]}, "messages"),  # over the context of 128
    ],
)
def test_bad_chat_requests_get_a_400_with_an_openai_error(server, body, param):
    status, reply = server.raw("POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400, reply
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_bad_completion_requests_and_malformed_json(server):
    status, reply = server.raw("POST", "/v1/completions", b'{"prompt": "hi", ')
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    status, reply = server.raw("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": -3}).encode())
    assert status == 400 and reply["error"]["param"] == "max_tokens"
    status, reply = server.raw("POST", "/v1/completions", json.dumps({"prompt": [1, 2, 10**9]}).encode())
    assert status == 400 and reply["error"]["param"] == "prompt"
    status, reply = server.raw("POST", "/v1/completions", json.dumps({"prompt": "x " * 300}).encode())
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    status, reply = server.raw("GET", "/v1/nothing")
    assert status == 404 and reply["error"]["message"]
    with pytest.raises(openai.BadRequestError):  # the client sees it as OpenAI's own 400
        chat(server, messages=[])
    assert chat(server, max_tokens=2).choices[0].message.content is not None  # and the server goes on


def test_a_dropped_stream_frees_the_server(server):
    """A client that reads one event and hangs up: its decode stops, the next request is served."""
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 120, "stream": True}).encode()
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        seen = b""
        while b"data: " not in seen:  # the headers, then the first event
            seen += sock.recv(4096)
        sock.close()
    start = time.monotonic()
    response = chat(server, max_tokens=2)
    assert response.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - start < 60
    assert server.proc.poll() is None


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_raw_sse_framing_with_curl(server):
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "stream": True})
    done = subprocess.run(
        ["curl", "-sN", "-D", "-", f"{server.url}/chat/completions", "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    head, _, events = done.stdout.decode("utf-8").partition("\r\n\r\n")  # bytes: keep the \r\n
    assert head.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in head.lower()
    assert events.endswith("data: [DONE]\n\n")
    frames = events.split("\n\n")[:-1]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames), frames
    payloads = [json.loads(f[6:]) for f in frames[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(p["object"] == "chat.completion.chunk" and p["model"] == "tiny" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_busy_port_is_one_error_line(server, tiny_export):
    _, export = tiny_export
    done = subprocess.run(
        [str(CLI), "serve", f"mil:{export}", "--port", str(server.port)], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{server.port} (Address already in use)"]
