"""The OpenAI-compatible gateway over a real local cluster: real etcd, simulated engine agents served on
loopback and registered there, the real queue and router, and the gateway's uvicorn server on a loopback port,
called with the official ``openai`` client (and raw ``httpx`` for malformed input)."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import openai
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.membership import MembershipWatcher
from services.common.security import SecuritySettings
from services.gateway.app import GatewayConfig, GatewayServer
from services.gateway.tokenizer import Detokenizer, SimpleTokenizer, load_tokenizer
from services.queue.server import serve as serve_queue
from services.queue.store import QueueConfig
from services.router.routing import RouterConfig
from services.router.server import RouterService
from services.router.server import serve as serve_router
from tests.conftest import eventually, start_etcd, start_sim_engine

pytestmark = pytest.mark.timeout(180)
in_module_loop = pytest.mark.asyncio(loop_scope="module")  # the cluster lives in the module's event loop
MODEL = "llama-3-8b"
TOKEN = "test-token-1"
LIMIT = 64 * 1024  # the strict gateway's body limit [bytes]


class Cluster:
    def __init__(self, url: str, strict_url: str, router, engine, tok, app) -> None:
        self.url, self.strict_url, self.router, self.engine, self.tok = url, strict_url, router, engine, tok
        self.app = app  # the open gateway's ASGI app (its router channel is open while the server runs)

    def client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kw)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    etcd = start_etcd(tmp / "etcd")
    queue = await serve_queue(QueueConfig(db_path=str(tmp / "q.db")), port=0)
    queue_addr = f"127.0.0.1:{queue.port}"
    parts = []
    for role, speedup, q in (("interactive", 10.0, None), ("batch", 50.0, queue_addr)):
        parts.append(await start_sim_engine(role, role, cap=8, speedup=speedup, queue_address=q, etcd=etcd.endpoint))
    watcher = MembershipWatcher(etcd.endpoint)
    await watcher.start()
    await watcher.wait_for(lambda m: len(m) == 2, timeout_s=20)
    router = await serve_router(RouterService(RouterConfig(), watcher, queue_addr, stats_interval_s=0.1), port=0)
    base = dict(router=f"127.0.0.1:{router.port}", port=0)
    gw = GatewayServer(GatewayConfig(**base), security=SecuritySettings(auth_tokens=[]))
    strict = GatewayServer(GatewayConfig(**base, max_body_bytes=LIMIT), security=SecuritySettings(auth_tokens=[TOKEN]))
    await gw.start()
    await strict.start()
    yield Cluster(gw.url, strict.url, router, parts[0][0], gw.app.state.tokenizer, gw.app)
    await strict.stop()
    await gw.stop()
    await router.stop()
    await watcher.stop()
    for srv, reg in parts:
        await reg.close()
        await srv.stop(grace_s=1.0)
    await queue.stop()
    etcd.stop()


# ---- the openai client -----------------------------------------------------------------------------------
@in_module_loop
async def test_streaming_chat_completion_with_usage(cluster):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
    stream = await cluster.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # tokens came as several chunks
    assert len(content.split()) == 12  # simulated engines: one placeholder word per token
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    usage = chunks[-1].usage
    prompt_ids = cluster.tok.encode(cluster.tok.apply_chat_template(messages), add_special_tokens=False)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(prompt_ids), 12, len(prompt_ids) + 12)
    assert chunks[0].id.startswith("chatcmpl-") and all(c.id == chunks[0].id for c in chunks)


@in_module_loop
async def test_non_streaming_completion(cluster):
    c = await cluster.client().completions.create(model=MODEL, prompt="Say hello to the world.", max_tokens=7)
    assert c.object == "text_completion" and c.model == MODEL
    assert len(c.choices) == 1 and c.choices[0].finish_reason == "length"
    assert len(c.choices[0].text.split()) == 7
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (6, 7)  # Say hello to the world .


@in_module_loop
async def test_streaming_completion_and_token_id_prompt(cluster):
    stream = await cluster.client().completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=5, stream=True)
    chunks = [c async for c in stream]
    assert len("".join(c.choices[0].text for c in chunks).split()) == 5
    assert chunks[-1].choices[0].finish_reason == "length"
    chat = await cluster.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], max_completion_tokens=3)
    assert chat.choices[0].message.role == "assistant" and len(chat.choices[0].message.content.split()) == 3
    assert chat.usage.completion_tokens == 3


async def _asgi_writes(app, path: str, body: dict) -> list[dict]:
    """The ``http.response.body`` messages the app sends for one POST, called in-process (each is one write)."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    sent: list[dict] = []
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return [m for m in sent if m["type"] == "http.response.body"]


def _events(write: dict) -> list[bytes]:
    return [e for e in write["body"].split(b"\n\n") if e]


@in_module_loop
async def test_a_stream_writes_each_token_once_and_ends_with_its_last_token_in_one_write(cluster):
    writes = await _asgi_writes(cluster.app, "/v1/completions",
                                {"model": MODEL, "prompt": "hello there", "max_tokens": 5, "stream": True})
    assert [w["more_body"] for w in writes] == [True] * (len(writes) - 1) + [False]  # no empty write to end the body
    *tokens, last = writes
    assert all(len(_events(w)) == 1 for w in tokens)  # one token event per write while the stream runs
    end = _events(last)
    assert end[-1] == b"data: [DONE]"
    assert json.loads(end[-2][6:])["choices"][0]["finish_reason"] == "length"
    texts = [json.loads(e[6:])["choices"][0]["text"] for w in writes for e in _events(w) if e != b"data: [DONE]"]
    assert texts[-2] != ""  # the last token went out with the end of the stream
    assert len([t for t in texts if t]) == 5
    # A chat stream's opening role chunk goes out with the first token.
    writes = await _asgi_writes(cluster.app, "/v1/chat/completions",
                                {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                 "stream": True})
    first = [json.loads(e[6:])["choices"][0]["delta"] for e in _events(writes[0])]
    assert first[0] == {"role": "assistant", "content": ""}
    assert first[1].get("content")
    assert writes[-1]["more_body"] is False


@in_module_loop
async def test_models(cluster):
    client = cluster.client()
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["instances"] == {"interactive": 1, "mixed": 0, "batch": 1}
    assert (await client.models.retrieve(MODEL)).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        await client.models.retrieve("gpt-nope")
    assert e.value.code == "model_not_found"


@in_module_loop
async def test_unknown_model_is_404_in_openai_shape(cluster):
    with pytest.raises(openai.NotFoundError) as e:
        await cluster.client().chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found" and e.value.param == "model" and MODEL in e.value.message


@in_module_loop
async def test_admission_control_is_429(cluster):
    client = cluster.client()
    await client.completions.create(model=MODEL, prompt="warm up", max_tokens=2)
    # Once the router's stats show the engine's TTFT (tens of ms), a 1 ms TTFT SLO cannot be admitted.
    await eventually(lambda: _ttft_known(cluster))
    with pytest.raises(openai.RateLimitError) as e:
        await client.completions.create(model=MODEL, prompt="now", max_tokens=2, extra_body={"ttft_ms": 1})
    assert e.value.code == "resource_exhausted" and "TTFT SLO" in e.value.message


async def _ttft_known(cluster) -> bool:
    return any(ld.ttft_p50_ms > 1 for ld in cluster.router.service.loads() if ld.role == "interactive")


@in_module_loop
async def test_slo_class_from_header_or_body(cluster):
    client = cluster.client()
    # The batch class goes through the queue; a batch engine serves it; the answer waits for the result.
    c = await client.completions.create(model=MODEL, prompt="one two three", max_tokens=4,
                                        extra_headers={"X-Chiron-SLO-Class": "batch"})
    assert len(c.choices[0].text.split()) == 4 and c.usage.completion_tokens == 4 and c.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:  # queued work does not stream
        await client.completions.create(model=MODEL, prompt="x", stream=True, extra_body={"slo_class": "batch"})
    assert e.value.param == "stream"
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(model=MODEL, prompt="x", extra_body={"slo_class": "gold"})
    assert e.value.param == "slo_class" and "interactive" in e.value.message
    # The body field wins over the header.
    c = await client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"slo_class": "chat"},
                                        extra_headers={"X-Chiron-SLO-Class": "gold"})
    assert c.usage.completion_tokens == 2


@in_module_loop
async def test_authentication(cluster):
    url = f"{cluster.strict_url}/v1"
    with pytest.raises(openai.AuthenticationError) as e:
        await openai.AsyncOpenAI(base_url=url, api_key="wrong-token", max_retries=0).models.list()
    assert e.value.code == "invalid_api_key" and "wrong-token" not in e.value.message
    ok = openai.AsyncOpenAI(base_url=url, api_key=TOKEN, max_retries=0)
    assert [m.id async for m in ok.models.list()] == [MODEL]
    c = await ok.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert c.usage.completion_tokens == 2
    async with httpx.AsyncClient(base_url=cluster.strict_url) as h:  # probes need no token
        assert (await h.get("/health")).status_code == 200
        assert (await h.get("/metrics")).status_code == 200
        err = _assert_openai_error(await h.get("/v1/models"), 401)  # no Authorization header
        assert "Bearer" in err["message"]
        # Authentication comes before the body is looked at.
        _assert_openai_error(await h.post("/v1/completions", content=b"{not json"), 401)


def _assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert set(err) == {"message", "type", "param", "code"}
    return err


@in_module_loop
async def test_oversized_bodies_get_413_and_the_gateway_keeps_serving(cluster):
    as_json = {"Content-Type": "application/json"}
    big = json.dumps({"model": MODEL, "prompt": "word " * LIMIT}).encode()
    async with httpx.AsyncClient(base_url=cluster.strict_url, headers={"Authorization": f"Bearer {TOKEN}"}) as h:
        err = _assert_openai_error(await h.post("/v1/completions", content=big, headers=as_json), 413)
        assert str(LIMIT) in err["message"] and err["code"] == "request_too_large"

        async def chunked():  # no Content-Length: the limit applies as the body streams in
            for i in range(0, len(big), 8192):
                yield big[i:i + 8192]

        _assert_openai_error(await h.post("/v1/chat/completions", content=chunked(), headers=as_json), 413)
        # Uploads too (the Batch API's multipart files).
        r = await h.post("/v1/files", files={"file": ("x.jsonl", b"x" * (LIMIT + 1))}, data={"purpose": "batch"})
        _assert_openai_error(r, 413)
        r = await h.post("/v1/completions", json={"model": MODEL, "prompt": "still here", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@in_module_loop
async def test_bad_input_gets_openai_errors_while_a_stream_runs_on(cluster):
    async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as h:
        async def long_stream() -> int:
            n = 0
            async with h.stream("POST", "/v1/completions",
                                json={"model": MODEL, "prompt": "go", "max_tokens": 300, "stream": True,
                                      "stream_options": {"include_usage": True}}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        n = usage["completion_tokens"] if usage else n
            return n

        running = asyncio.create_task(long_stream())
        err = _assert_openai_error(await h.post("/v1/completions", content=b'{"model": '), 400)
        assert err["code"] == "invalid_json"
        err = _assert_openai_error(await h.post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"}), 400)
        assert err["param"] == "messages"
        err = _assert_openai_error(await h.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": "5"}), 400)
        assert err["param"] == "max_tokens"
        err = _assert_openai_error(await h.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2}), 400)
        assert err["param"] == "n"
        err = _assert_openai_error(await h.post("/v1/completions", json={"model": MODEL, "prompt": "!!", "max_tokens": 99_999}), 400)
        assert "context" in err["message"]  # the router's message comes through
        _assert_openai_error(await h.post("/v1/completions", json={"model": MODEL, "prompt": [-1]}), 400)
        _assert_openai_error(await h.post("/v1/completions", json={"model": MODEL, "prompt": "   "}), 400)
        _assert_openai_error(await h.get("/v1/nothing-here"), 404)
        _assert_openai_error(await h.get("/v1/batches/batch_unknown"), 404)
        _assert_openai_error(await h.delete("/v1/completions"), 405)
        assert await running == 300  # accepted work is untouched by the bad requests


@in_module_loop
async def test_client_disconnect_cancels_the_engine_request(cluster):
    backend = cluster.engine.agent.backend
    before = backend.snapshot().generated_tokens_total
    async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as h:
        async with h.stream("POST", "/v1/chat/completions",
                            json={"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 6000,
                                  "stream": True}) as r:
            lines = r.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            await anext(lines)
    # The engine stops generating long before 6,000 tokens (~4 s of simulated decoding at this speed-up).
    await eventually(lambda: _idle(backend), timeout_s=10)
    assert backend.snapshot().generated_tokens_total - before < 6000


@in_module_loop
async def test_client_disconnect_cancels_a_non_streaming_request(cluster):
    backend = cluster.engine.agent.backend
    before = backend.snapshot().generated_tokens_total
    async with httpx.AsyncClient(base_url=cluster.url) as h:
        # The client gives up (read timeout) long before 6,000 tokens and closes the connection.
        with pytest.raises(httpx.ReadTimeout):
            await h.post("/v1/completions", json={"model": MODEL, "prompt": "long", "max_tokens": 6000},
                         timeout=httpx.Timeout(10.0, read=0.5))
    await eventually(lambda: _idle(backend), timeout_s=10)
    assert backend.snapshot().generated_tokens_total - before < 6000

    async def counted_499() -> bool:
        async with httpx.AsyncClient(base_url=cluster.url) as h:
            return 'chiron_gateway_requests_total{endpoint="/v1/completions",status="499"}' in (await h.get("/metrics")).text
    await eventually(counted_499, timeout_s=10)


async def _idle(backend) -> bool:
    s = backend.snapshot()
    return s.num_running == 0 and s.num_waiting == 0


@in_module_loop
async def test_metrics(cluster):
    await cluster.client().completions.create(model=MODEL, prompt="count me", max_tokens=2)
    async with httpx.AsyncClient(base_url=cluster.url) as h:
        text = (await h.get("/metrics")).text
    assert 'chiron_gateway_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'chiron_gateway_request_duration_seconds_count{endpoint="/v1/completions"}' in text
    assert 'chiron_gateway_ttft_seconds_count{endpoint="/v1/completions"}' in text


# ---- property-based: malformed bodies ------------------------------------------------------------------------
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                     max_leaves=6)


def _not(valid) -> st.SearchStrategy:
    return _JSON.filter(lambda v: not valid(v))


def _int_in(lo: int, hi: int):
    return lambda v: type(v) is int and lo <= v <= hi


_BAD_FIELDS = {
    "model": _not(lambda v: isinstance(v, str) and v == MODEL),
    "max_tokens": _not(lambda v: v is None or _int_in(1, 2**31 - 1)(v)),
    "stream": _not(lambda v: type(v) is bool),
    "n": _not(lambda v: v == 1 and type(v) is int),
    "temperature": _not(lambda v: v is None or (type(v) in (int, float) and 0 <= v <= 2)),
    "stream_options": _not(lambda v: v is None or (isinstance(v, dict) and type(v.get("include_usage", False)) is bool)),
    "slo_class": _not(lambda v: v is None or v in ("interactive", "chat", "batch", "batch-24h")),
    "ttft_ms": _not(lambda v: v is None or _int_in(0, 2**62)(v)),
}
_BAD_PROMPT = st.one_of(_not(lambda v: isinstance(v, str | list)), st.just(""), st.just([]), st.text(" \n\t", max_size=3),
                        st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
                        st.lists(st.text(max_size=3), min_size=2, max_size=3))
def _valid_content(v) -> bool:
    return v is None or isinstance(v, str) or (isinstance(v, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v))


_BAD_MESSAGES = st.one_of(_not(lambda v: isinstance(v, list)), st.just([]),
                          st.lists(st.fixed_dictionaries({"role": st.text(max_size=8).filter(lambda r: r not in (
                              "system", "developer", "user", "assistant", "tool")), "content": st.text(max_size=4)}),
                              min_size=1, max_size=2),
                          st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": _not(_valid_content)}),
                                   min_size=1, max_size=2))


@st.composite
def _bad_request(draw) -> tuple[str, bytes]:
    endpoint = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    kind = draw(st.sampled_from(["bytes", "field", "prompt"]))
    if kind == "bytes":
        return endpoint, draw(st.binary(max_size=64))
    chat = endpoint.endswith("chat/completions")
    body = {"model": MODEL, "max_tokens": 2}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    body |= draw(st.dictionaries(st.sampled_from(["xyz", "logit_bias", "tools", "suffix"]), _JSON, max_size=2))
    if kind == "field":
        name = draw(st.sampled_from(sorted(_BAD_FIELDS)))
        body[name] = draw(_BAD_FIELDS[name])
    else:
        body["messages" if chat else "prompt"] = draw(_BAD_MESSAGES if chat else _BAD_PROMPT)
    return endpoint, json.dumps(body).encode()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@in_module_loop
@given(case=_bad_request())
async def test_malformed_bodies_get_a_4xx_and_the_gateway_keeps_serving(cluster, case):
    endpoint, content = case
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as h:
        r = await h.post(endpoint, content=content, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (content, r.status_code, r.text)
        _assert_openai_error(r, r.status_code)
        ok = await h.post("/v1/completions", json={"model": MODEL, "prompt": "fine", "max_tokens": 1})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


# ---- tokenizers ----------------------------------------------------------------------------------------------------
def test_simple_tokenizer_is_deterministic_and_stays_in_the_vocabulary():
    tok = SimpleTokenizer(vocab_size=1000)
    ids = tok.encode("Hello, world! Hello again.")
    assert len(ids) == 7 and ids[0] == ids[4] and all(0 <= i < 1000 for i in ids)
    assert ids == SimpleTokenizer(vocab_size=1000).encode("Hello, world! Hello again.")
    out = [3, 999_999, 17, 3]
    detok = Detokenizer(tok)
    assert "".join(detok.step([i]) for i in out) + detok.flush() == tok.decode(out)
    assert len(tok.decode(out).split()) == 4
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|assistant|>\n")
    with pytest.raises(RuntimeError, match="not 'simple' and not a directory"):
        load_tokenizer("/no/such/dir")


def test_a_model_directory_without_tokenizer_files_gets_the_simple_tokenizer_over_its_vocabulary(tmp_path):
    from services.engine.vllm_backend import write_tiny_model

    tok = load_tokenizer(str(write_tiny_model(tmp_path / "tiny", vocab_size=1024)))
    assert isinstance(tok, SimpleTokenizer) and tok.vocab_size == 1024
    assert all(0 <= i < 1024 for i in tok.encode("every id fits the tiny model's vocabulary"))
    with pytest.raises(RuntimeError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))


def test_hugging_face_tokenizer_from_a_model_directory(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "hello", "world", "héllo", ",", "!"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", bos_token="<s>").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.vocab_size == 7
    assert tok.encode("hello world!", add_special_tokens=False) == [2, 3, 6]
    assert tok.decode([2, 3]) == "hello world"
    detok = Detokenizer(tok)
    assert "".join(detok.step([i]) for i in (2, 5, 4)) + detok.flush() == tok.decode([2, 5, 4])
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}]) == "<|user|>\nhello\n<|assistant|>\n"


# ---- chiron bench gateway's interval --------------------------------------------------------------------------
def test_the_bench_interval_of_the_p99_overhead_is_tight_for_a_constant_shift_and_wide_for_bursts():
    from bench.gateway import overhead_interval

    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 30, 3000))
    direct = np.column_stack([t, rng.exponential(4.0, t.size)])
    shifted = np.column_stack([t, direct[:, 1] + 2.0])  # the gateway adds exactly 2 ms to every request
    lo, hi = overhead_interval(shifted, direct, 99)
    assert lo == pytest.approx(2.0, abs=1e-6) and hi == pytest.approx(2.0, abs=1e-6)
    # Three 100-ms bursts in which every gateway request waits 30 ms more: the p99 moves by them, and resampling
    # 1-s windows shows how much that depends on which seconds the run happened to see.
    bursty = shifted.copy()
    bursty[np.isin((t * 10).astype(int), [52, 171, 263]), 1] += 30.0
    point = np.percentile(bursty[:, 1], 99) - np.percentile(direct[:, 1], 99)
    lo, hi = overhead_interval(bursty, direct, 99)
    assert lo < point < hi and hi - lo > 5.0
    with pytest.raises(ValueError):
        overhead_interval(bursty[:0], direct, 99)
