"""fmlm serve: the JSON and streaming endpoints, validation, the bounded queue, the page."""

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from fmlm.api import Model  # noqa: E402
from fmlm.config import build_config  # noqa: E402
from fmlm.data import PhrasesTask  # noqa: E402
from fmlm.methods import build_method  # noqa: E402
from fmlm.serve import BadRequest, Job, ServeLimits, Worker, create_app, parse_ckpt_args, wrap_model  # noqa: E402


def tiny_model(method: str, path: Path) -> Model:
    """A randomly initialised tiny model (serving does not care whether it is trained)."""
    cfg = build_config("tiny", [f"train.method={method}", "threads=1"])
    task = PhrasesTask(n=4, k=2, phrases_per_seq=1, seed=0)
    cfg.model.vocab_size = task.tokenizer.vocab_size
    cfg.model.max_seq_len = cfg.data.seq_len
    torch.manual_seed(0)
    return Model(cfg, build_method(cfg).eval(), task.tokenizer, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return [wrap_model(m, tiny_model(m, d / m)) for m in ("flm", "semigroup", "mdlm", "duo", "ar")]


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(models, ServeLimits(max_steps=64, max_samples=4, max_body_bytes=2048,
                                                   max_text_chars=100))) as c:
        yield c


def events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_health_lists_models(client):
    r = client.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok"
    assert list(h["models"]) == ["flm", "semigroup", "mdlm", "duo", "ar"]
    assert h["models"]["flm"]["vocab_size"] == 10 and h["models"]["flm"]["separator"] == " "
    assert h["queue"]["max"] == 8 and h["limits"]["max_steps"] == 64


def test_generate_is_deterministic_and_timed(client):
    body = {"model": "flm", "num_samples": 3, "steps": 4, "seed": 7}
    a, b = client.post("/v1/generate", json=body).json(), client.post("/v1/generate", json=body).json()
    assert len(a["texts"]) == 3 and a["texts"] == b["texts"]
    assert all(len(row) == 2 for row in a["ids"])
    assert a["seconds"] > 0 and a["queue_seconds"] >= 0 and a["steps"] == 4
    c = client.post("/v1/generate", json={**body, "seed": 8}).json()
    assert c["ids"] != a["ids"]
    # Defaults: the first model, one sample, the model's default steps.
    d = client.post("/v1/generate", content=b"").json()
    assert d["model"] == "flm" and d["num_samples"] == 1 and d["steps"] == 8


@pytest.mark.parametrize("body,status,match", [
    (b"{bad", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"steps": 0}', 400, "steps must be in 1..64, got 0"),
    (b'{"steps": 65}', 400, "steps must be in 1..64"),
    (b'{"steps": "4"}', 400, "steps must be an integer"),
    (b'{"num_samples": 5}', 400, "num_samples must be in 1.."),
    (b'{"num_samples": true}', 400, "num_samples must be an integer"),
    (b'{"seed": -1}', 400, "seed must be in"),
    (b'{"seq_len": 3}', 400, "seq_len must be in 1..2"),
    (b'{"stepz": 3}', 400, "unknown field(s) stepz"),
    (b'{"model": "gpt"}', 404, "unknown model"),
    (b'{"gamma": 0.5}', 400, "gamma does not apply to model 'flm'"),
    (b'{"model": "semigroup", "gamma": 1.5}', 400, "gamma must be a number in [0, 1)"),
    (b'{"prefix": "notaword"}', 400, "cannot tokenise"),
    (b'{"model": "ar", "suffix": "a"}', 400, "suffix does not apply to model 'ar' (method ar; it takes prefix)"),
    (b'{"model": "ar", "infill": "[MASK] a"}', 400, "infill does not apply to model 'ar'"),
    (b'{"prefix": "a", "infill": "[MASK] a"}', 400, "either infill or prefix/suffix"),
    (b'{"prefix": 3}', 400, "prefix must be a string"),
    (json.dumps({"prefix": "x" * 101}).encode(), 413, "prefix has 101 characters; the limit is 100"),
    (json.dumps({"seed": 1, "pad": "x" * 3000}).encode(), 413, "the limit is 2048"),
])
def test_bad_requests_get_clear_4xx(client, body, status, match):
    for path in ("/v1/generate", "/v1/stream"):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (path, r.text)
        assert match in r.json()["error"]
    assert client.get("/health").json()["status"] == "ok"  # still serving


def test_stream_only_one_sample_and_unknown_routes(client):
    r = client.post("/v1/stream", json={"num_samples": 2})
    assert r.status_code == 400 and "streams show one sample" in r.json()["error"]
    assert client.get("/nope").status_code == 404
    assert "not allowed" in client.get("/v1/generate").json()["error"]


@pytest.mark.parametrize("model,steps", [("flm", 5), ("semigroup", 2), ("mdlm", 4), ("duo", 3), ("ar", 1)])
def test_stream_emits_every_step_then_the_generate_text(client, model, steps):
    body = {"model": model, "steps": steps, "seed": 3}
    r = client.post("/v1/stream", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    kinds = [k for k, _ in evs]
    total = 2 if model == "ar" else steps  # AR: one event per position (L = 2)
    assert kinds == ["step"] * total + ["done"]
    for n, (_, d) in enumerate(evs[:-1], start=1):
        assert d["step"] == n and d["of"] == total
        assert len(d["tokens"]) == len(d["confidence"]) == (n if model == "ar" else 2)
        assert all(0.0 <= c <= 1.0 for c in d["confidence"])
    done = evs[-1][1]
    same = client.post("/v1/generate", json=body).json()
    assert done["texts"] == same["texts"] and done["ids"] == same["ids"]
    if model in ("flm", "semigroup", "ar"):  # MDLM and Duo draw after their last callback
        assert evs[-2][1]["ids"] == done["ids"][0]


def test_stream_is_thinned_to_max_events(client):
    evs = events(client.post("/v1/stream", json={"steps": 64, "max_events": 8}).text)
    steps = [d["step"] for k, d in evs if k == "step"]
    assert steps == [1, 9, 17, 25, 33, 41, 49, 57, 64]


def test_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/v1/stream" in r.text and "Generate" in r.text


def test_parse_ckpt_args():
    assert parse_ckpt_args(["flm=/a", "/b"]) == [("flm", "/a"), ("", "/b")]
    from fmlm.errors import FmlmError

    with pytest.raises(FmlmError, match="NAME=PATH"):
        parse_ckpt_args(["=/a"])


def test_worker_queue_is_bounded(models):
    w = Worker(ServeLimits(max_queue=2))  # not started: nothing drains the queue
    job = lambda: Job(models[0], 1, 1, 0, 2, {})  # noqa: E731
    w.submit(job())
    w.submit(job())
    with pytest.raises(BadRequest, match="server busy") as e:
        w.submit(job())
    assert e.value.status == 503


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_full_queue_answers_503_over_http(models):
    """A real server: one slow job in the worker, one waiting, the third is refused."""
    import httpx
    import uvicorn

    gate = threading.Event()
    slow = wrap_model("slow", models[0].model)
    orig = slow.model.sample_ids

    class Slow:  # a stand-in model whose sampling waits for the test
        config, tokenizer, path, method = slow.model.config, slow.model.tokenizer, slow.model.path, slow.model.method

        def sample_ids(self, *a, **k):
            gate.wait(10)
            return orig(*a, **k)

        decode = slow.model.decode

    slow.model = Slow()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app([slow], ServeLimits(max_queue=1)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        results = []

        def post():
            results.append(httpx.post(f"{url}/v1/generate", json={"steps": 2}, timeout=20).status_code)

        first = threading.Thread(target=post)
        first.start()
        while not httpx.get(f"{url}/health").json()["queue"]["busy"]:
            time.sleep(0.02)
        second = threading.Thread(target=post)
        second.start()
        while httpx.get(f"{url}/health").json()["queue"]["waiting"] < 1:
            time.sleep(0.02)
        r = httpx.post(f"{url}/v1/generate", json={"steps": 2}, timeout=20)
        assert r.status_code == 503 and "server busy" in r.json()["error"]
        assert r.headers["retry-after"] == "1"
        gate.set()
        first.join()
        second.join()
        assert results == [200, 200]
    finally:
        gate.set()
        server.should_exit = True
        t.join(10)


@pytest.mark.parametrize("argv,match", [
    (["serve", "--ckpt", "=x"], "--ckpt expects NAME=PATH or PATH"),
    (["serve", "--ckpt", "flm=/nonexistent/run"], "checkpoint not found"),
])
def test_cli_serve_bad_checkpoint_is_one_line(argv, match, capsys):
    from fmlm.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("model", ["flm", "semigroup", "mdlm", "duo", "ar"])
def test_prefix_suffix_and_infill_requests_are_honoured(client, models, model):
    """The documented conditioning fields reach the sampler: known tokens come back exactly."""
    tok = models[0].model.tokenizer
    word = tok.decode([3]).strip()
    cond = client.get("/health").json()["models"][model]["conditioning"]
    assert cond == (["prefix"] if model == "ar" else ["prefix", "suffix", "infill"])
    for field, value, pos in (("prefix", word, 0), ("suffix", word, -1), ("infill", f"[MASK] {word}", 1)):
        for path in ("/v1/generate", "/v1/stream"):
            r = client.post(path, json={"model": model, "steps": 2, field: value})
            if field not in cond:
                assert r.status_code == 400 and "does not apply" in r.json()["error"]
                continue
            assert r.status_code == 200, r.text
            ids = r.json()["ids"][0] if path == "/v1/generate" else events(r.text)[-1][1]["ids"][0]
            assert ids[pos] == 3, (field, path, ids)
