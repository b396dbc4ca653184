"""`dsdnode api` through real HTTP with the official `openai` client: a server process on an
in-process chain (--local) for the replies and errors, and one backed by a real local swarm
(heavy). Greedy answers must equal what `dsdnode generate` produces for the same prompt."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
import openai
import pytest

import dsdnode
from dsdnode.local_swarm import LocalSwarm
from dsdnode.client.loading import encode_prompt, load_client_models
from tests.helpers import forkserver

MODEL = "smollm2-135m"
PROMPT = "def fibonacci(n):\n    "
QUESTION = "What is the capital of France?"


class ApiProcess:
    """`dsdnode api ARGS --port 0` in its own process; waits for its ready line."""

    def __init__(self, args: list[str], log_path: Path, timeout_s: float = 120.0, api_key: str | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        env.pop("DSDNODE_API_KEY", None)
        if api_key is not None:
            env["DSDNODE_API_KEY"] = api_key
        self.api_key = api_key
        cmd = [sys.executable, "-m", "dsdnode", "api", "--model", MODEL, "--port", "0", "--dtype", "float32",
               "--threads", "2", *args]
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = forkserver.popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                         start_new_session=True)
        ready: dict = {}
        got = threading.Event()

        def pump():
            for line in self.proc.stdout:
                if line.startswith("{") and not got.is_set():
                    ready.update(json.loads(line))
                    got.set()
            got.set()

        threading.Thread(target=pump, daemon=True).start()
        if not got.wait(timeout_s) or not ready:
            self.stop()
            raise RuntimeError(f"dsdnode api did not start:\n{log_path.read_text()[-3000:]}")
        self.url = ready["url"]

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=self.api_key or "unused", max_retries=0, timeout=120, **kw)

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def client_models(smollm2_dir):
    return load_client_models(MODEL, MODEL, "float32")


N = 24  # tokens per greedy answer


@pytest.fixture(scope="module")
def expected(smollm2_dir) -> dict[str, str]:
    """What the library (under `dsdnode generate --local --k 4 [--raw]`) generates, in another process's code path."""
    with dsdnode.connect(MODEL, local=True, hops=3, draft=MODEL, dtype="float32") as client:
        return {name: client.generate(prompt, chat=chat, max_new_tokens=N, k=4).text
                for name, prompt, chat in (("completion", PROMPT, False), ("chat", QUESTION, True))}


# ---- an API server over an in-process chain -----------------------------------------------
@pytest.fixture(scope="module")
def local_api(smollm2_dir, tmp_path_factory):
    api = ApiProcess(["--local", "--hops", "2", "--max-tokens-limit", "64", "--max-prompt-tokens", "100",
                      "--max-concurrent", "1", "--max-queued", "1"],
                     tmp_path_factory.mktemp("api") / "api.log", api_key=API_KEY)
    yield api
    api.stop()


API_KEY = "sk-test-0123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(api: ApiProcess, path: str, body, key: str | None = API_KEY) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(api.url + path, content=content, headers=headers, timeout=60)


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 65}, 400, "max_tokens", "invalid_value"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                           "max_completion_tokens": 1000}, 400, "max_completion_tokens", "invalid_value"),
    ("/completions", {"model": MODEL, "prompt": "word " * 150}, 400, "prompt", "context_length_exceeded"),
    ("/completions", {"model": MODEL, "prompt": "hi", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature", "invalid_value"),
    ("/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p", "invalid_value"),
    ("/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("/completions", b'{"model": "smollm2-135m", "prompt": ', 400, None, "invalid_json"),
    ("/completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "n", "unsupported_value"),
    ("/completions", {"model": MODEL, "prompt": ""}, 400, "prompt", "invalid_value"),
    ("/completions", {"model": MODEL, "prompt": [5, 10**9]}, 400, "prompt", "invalid_value"),
    ("/completions", {"model": MODEL, "prompt": "hi", "dsd_k": "fast"}, 400, "dsd_k", "invalid_value"),
    ("/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "invalid_value"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages",
     "invalid_value"),
    ("/completions", {"prompt": "hi"}, 400, "model", "invalid_value"),
    ("/nowhere", {}, 404, None, "unknown_url"),
    # what we cannot honour is refused, never silently ignored
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                           "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "unsupported_value"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"},
     400, "tool_choice", "unsupported_value"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                           "functions": [{"name": "f"}]}, 400, "functions", "unsupported_value"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                           "response_format": {"type": "json_object"}}, 400, "response_format", "unsupported_value"),
    ("/completions", {"model": MODEL, "prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty",
     "unsupported_value"),
    ("/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": -1}, 400, "presence_penalty",
     "unsupported_value"),
    ("/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"42": 5}}, 400, "logit_bias",
     "unsupported_value"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True},
     400, "logprobs", "unsupported_value"),
    ("/completions", {"model": MODEL, "prompt": "hi", "logprobs": 0}, 400, "logprobs", "unsupported_value"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     400, "top_logprobs", "unsupported_value"),
    ("/completions", {"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo", "unsupported_value"),
    ("/completions", {"model": MODEL, "prompt": "hi", "best_of": 2}, 400, "best_of", "unsupported_value"),
    ("/completions", {"model": MODEL, "prompt": "hi", "suffix": "end"}, 400, "suffix", "unsupported_value"),
])
def test_bad_requests_get_openai_errors(local_api, path, body, status, param, code):
    reply = post(local_api, path, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error" and error["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(local_api):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0,
            "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "frequency_penalty": 0,
            "presence_penalty": 0.0, "logit_bias": {}, "logprobs": False, "n": 1, "user": "someone"}
    reply = post(local_api, "/chat/completions", body)
    assert reply.status_code == 200, reply.text


def test_api_key_is_required_on_every_route_but_health(local_api):
    for key, message in ((None, "didn't provide an API key"), ("sk-wrong", "Incorrect API key")):
        reply = post(local_api, "/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1}, key=key)
        assert reply.status_code == 401, reply.text
        assert reply.json()["error"]["code"] == "invalid_api_key" and message in reply.json()["error"]["message"]
        assert httpx.get(local_api.url + "/models", headers={"Authorization": f"Bearer {key}"} if key else {},
                         timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=local_api.url, api_key="sk-wrong", max_retries=0).models.list()
    assert httpx.get(local_api.root + "/health", timeout=10).json() == {"status": "ok"}
    for path in ("/ready", "/metrics", "/docs", "/openapi.json"):  # they tell an outsider about the swarm
        reply = httpx.get(local_api.root + path, timeout=30)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key", (path, reply.text)
    ready = httpx.get(local_api.root + "/ready", timeout=30, headers=AUTH)
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text


def test_a_seed_reproduces_a_sampled_answer(local_api):
    client = local_api.client()

    def ask(seed: int, stream: bool = False) -> str:
        kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=1.0, seed=seed)
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        return client.completions.create(**kw).choices[0].text

    first = ask(11)
    assert ask(11) == first and ask(11, stream=True) == first
    assert ask(12) != first  # the seed is used at all


def test_openai_client_raises_on_errors(local_api):
    client = local_api.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3)
    # the server still serves after errors
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0).choices[0].text


def test_null_fields_mean_defaults(local_api):
    reply = post(local_api, "/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": None,
                                             "top_p": None, "stop": None, "n": None, "seed": None, "stream": None})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] <= 2


def test_models_are_listed(local_api):
    assert [m.id for m in local_api.client().models.list()] == [MODEL]
    assert local_api.client().models.retrieve(MODEL).owned_by == "dsdnode"


def test_completion_equals_generate_with_usage_and_length(local_api, client_models, expected):
    reply = local_api.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                                                  extra_body={"dsd_k": 4})
    assert reply.choices[0].text == expected["completion"]
    assert reply.choices[0].finish_reason == "length"
    prompt_tokens = len(client_models.tokenizer(PROMPT)["input_ids"])
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, N)
    assert reply.usage.total_tokens == prompt_tokens + N
    whole = post(local_api, "/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
    assert whole.headers["X-Dsdnode-Unaudited-Layers"] == "none" and whole.json()["dsd_unaudited_layers"] == []
    metrics = httpx.get(local_api.root + "/metrics", timeout=10, headers=AUTH)  # scraped from the live API process
    assert metrics.status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics.text) for s in f.samples}
    assert samples[("dsdnode_client_tokens_generated_total", ())] >= N
    assert samples[("dsdnode_client_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("dsdnode_client_generation_seconds_count", ())] >= 1
    assert samples[("dsdnode_client_drafts_total", (("verdict", "accepted"),))] >= 1
    assert samples[("process_resident_memory_bytes", ())] > 0


def test_stop_strings_cut_the_text_whole_and_streamed(local_api, expected):
    full = expected["completion"]
    stop = full[12:15]
    assert stop.strip() and full.find(stop) >= 0
    cut = full[:full.find(stop)]
    client = local_api.client()
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop, "@@@"],
                                      extra_body={"dsd_k": 4})
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (cut, "stop")
    # usage counts the tokens of the returned text: exactly as many as it takes to produce the cut text
    used = whole.usage.completion_tokens
    assert 0 < used < N
    longer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=used, temperature=0,
                                       extra_body={"dsd_k": 4}).choices[0].text
    assert longer.startswith(cut)
    shorter = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=used - 1, temperature=0,
                                        extra_body={"dsd_k": 4}).choices[0].text if used > 1 else ""
    assert len(shorter) < len(cut)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0, stop=stop,
                                            stream=True, extra_body={"dsd_k": 4}))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(stop not in c.choices[0].text for c in chunks)


def test_chat_streams_openai_chunks_ending_with_done(local_api, client_models, expected):
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": N, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "dsd_k": 4}
    with httpx.stream("POST", local_api.url + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected["chat"]
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] == len(encode_prompt(client_models.tokenizer, QUESTION))


def test_a_client_leaving_mid_stream_does_not_disturb_the_server(local_api):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", local_api.url + "/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as reply:
        first = next(line for line in reply.iter_lines() if line)
    assert first.startswith("data: {")
    reply = local_api.client().completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3
    assert local_api.proc.poll() is None


def test_sampling_with_our_knobs_is_accepted(local_api):
    reply = local_api.client().chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
        max_tokens=12, temperature=0.8, top_p=0.9, seed=7, extra_body={"dsd_k": "auto", "adaptive": True})
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 12


def test_a_huge_body_is_refused_before_any_work_and_nothing_stalls(local_api):
    """A 9 MB prompt used to be tokenized on the event loop (8.4 s, /health waited as long). The body
    limit follows from --max-prompt-tokens 100 (64 KiB + 64 B a token): 413 at once, whether the
    length is declared or the body is streamed in chunks."""
    huge = json.dumps({"model": MODEL, "prompt": "hello " * 1_500_000, "max_tokens": 1})
    t0 = time.monotonic()
    declared = post(local_api, "/completions", huge)
    declared_s = time.monotonic() - t0

    def chunks():
        for i in range(0, len(huge), 1 << 16):
            yield huge[i:i + (1 << 16)].encode()

    chunked = httpx.post(local_api.url + "/completions", content=chunks(), timeout=60,
                         headers={"Content-Type": "application/json", **AUTH})
    t0 = time.monotonic()
    health = httpx.get(local_api.root + "/health", timeout=10)
    health_s = time.monotonic() - t0
    print(f"9 MB body: 413 in {declared_s:.2f} s; /health then in {health_s * 1000:.0f} ms")
    for reply in (declared, chunked):
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large", reply.text
    assert declared_s < 2 and health.status_code == 200 and health_s < 1
    long_prompt = post(local_api, "/completions", {"model": MODEL, "prompt": "hello " * 2000, "max_tokens": 1})
    assert long_prompt.status_code == 400 and long_prompt.json()["error"]["code"] == "context_length_exceeded"


def test_beyond_the_running_and_queued_requests_come_429_with_retry_after(local_api):
    """--max-concurrent 1 --max-queued 1: a streamed answer holds the one place, the next request
    waits, the third is told 429 with Retry-After at once; the waiting one is served afterwards."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "stream": True}

    async def scenario():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:
            async with http.stream("POST", local_api.url + "/completions", json=body) as running:
                lines = running.aiter_lines()
                assert (await anext(lines)).startswith("data: {")  # it holds its place now
                waiting = asyncio.create_task(http.post(local_api.url + "/completions",
                                                        json={**body, "stream": False, "max_tokens": 2}))
                await asyncio.sleep(0.5)
                t0 = time.monotonic()
                refused = await http.post(local_api.url + "/completions", json={**body, "max_tokens": 2})
                refused_s = time.monotonic() - t0
                assert not waiting.done()
                async for _ in lines:
                    pass
            return refused, refused_s, await waiting

    refused, refused_s, waited = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "2", refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and refused_s < 2
    assert waited.status_code == 200 and waited.json()["usage"]["completion_tokens"] == 2


def test_a_public_bind_is_told_apart_from_loopback():
    from dsdnode.api.guard import is_public_bind

    assert [is_public_bind(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "192.0.2.7")] == \
        [False, False, False, True, True, True]


# ---- an API server backed by a real swarm -------------------------------------------------
async def two_at_once(api: ApiProcess) -> tuple[str, str]:
    client = openai.AsyncOpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=120)

    async def streamed_chat() -> str:
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                                      max_tokens=N, temperature=0, stream=True,
                                                      extra_body={"dsd_k": 4})
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def completion() -> str:
        reply = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                                                extra_body={"dsd_k": 4})
        return reply.choices[0].text

    try:
        return tuple(await asyncio.gather(streamed_chat(), completion()))
    finally:
        await client.close()


@pytest.mark.heavy
def test_swarm_backed_api_matches_generate_and_serves_two_at_once(expected, tmp_path):
    with LocalSwarm(MODEL, [(0, 15), (15, 30)], tmp_path, dtype="float32") as swarm:
        api = ApiProcess(["--bootstrap", swarm.bootstrap_addrs[0]], tmp_path / "api.log")
        try:
            ready = httpx.get(api.root + "/ready", timeout=30)
            assert ready.status_code == 200 and ready.json()["route"].count("->") == 1, ready.text
            chat, completion = asyncio.run(two_at_once(api))
            single = api.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                                                     extra_body={"dsd_k": 4})
            # one server per span: no independent server can audit either hop, and the answer says so
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}
            unaudited = post(api, "/completions", body, key=None)
            refused = post(api, "/completions", {**body, "dsd_require_audit": True}, key=None)
            for server in swarm.servers:  # every server gone: a clear 503, for a stream too, before any 200
                swarm.kill(server)
            with pytest.raises(openai.InternalServerError, match="swarm could not serve") as failed:
                api.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
            with httpx.stream("POST", api.url + "/completions", timeout=60,
                              json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True}) as reply:
                streamed = (reply.status_code, reply.headers["content-type"], json.loads(reply.read()))
            with pytest.raises(openai.InternalServerError, match="swarm could not serve"):
                list(api.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True))
            for _ in range(20):  # /ready answers from a check at most 5 s old
                unready = httpx.get(api.root + "/ready", timeout=30)
                if unready.status_code != 200:
                    break
                time.sleep(1)
            assert api.proc.poll() is None
        finally:
            api.stop()
    assert failed.value.status_code == 503 and failed.value.body["code"] == "swarm_unavailable"
    assert streamed[:2] == (503, "application/json") and streamed[2]["error"]["code"] == "swarm_unavailable"
    assert unready.status_code == 503 and unready.json()["error"]["code"] == "swarm_unavailable"
    assert "no live servers" in unready.json()["error"]["message"]
    assert completion == single.choices[0].text == expected["completion"]
    assert chat == expected["chat"]
    assert unaudited.status_code == 200 and unaudited.headers["X-Dsdnode-Unaudited-Layers"] == "0:15,15:30"
    assert unaudited.json()["dsd_unaudited_layers"] == [[0, 15], [15, 30]]
    assert refused.status_code == 503 and "cannot be audited" in refused.json()["error"]["message"]


def test_the_web_page_and_its_json_on_a_local_chain(local_api):
    """The page loads without the key (it holds no data); its JSON needs the key like every /v1 route;
    a stream with dsd_stats closes with the generation's figures (the browser tests: test_web.py)."""
    page = httpx.get(local_api.root + "/", timeout=30)
    assert page.status_code == 200 and "/ui/app.js" in page.text and "http" not in page.text.replace("http-equiv", "")
    assert httpx.get(local_api.root + "/ui/app.js", timeout=30).headers["content-type"].startswith("text/javascript")
    assert httpx.get(local_api.root + "/ui/nothing.js", timeout=30).status_code == 404
    assert httpx.get(local_api.url + "/swarm", timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {API_KEY}"}
    swarm = httpx.get(local_api.url + "/swarm", timeout=30, headers=auth).json()
    assert [(p["peer_id"], p["start"], p["end"]) for p in swarm["peers"]] == [("local", 0, 15), ("local", 15, 30)]
    assert swarm["uncovered_layers"] == [] and swarm["coverage"] == [1] * 30 and swarm["route"]["ready"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "temperature": 0,
            "stream": True, "dsd_stats": True, "dsd_k": 4}
    with httpx.stream("POST", local_api.url + "/chat/completions", json=body, timeout=60, headers=auth) as reply:
        chunks = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]
    dsd = chunks[-1]["dsd"]
    assert chunks[-1]["choices"][0]["finish_reason"] and all("dsd" not in c for c in chunks[:-1])
    assert dsd["tokens"] <= 8 and dsd["speculative"] and dsd["rounds"] >= 1 and dsd["audit"] is None
    assert dsd["route"] == [{"peer_id": "local", "start": 0, "end": 15}, {"peer_id": "local", "start": 15, "end": 30}]
    stats = httpx.get(local_api.url + "/stats", timeout=30, headers=auth).json()["generations"]
    assert stats and stats[-1]["tokens"] == dsd["tokens"] and stats[-1]["rounds"] == dsd["rounds"]
