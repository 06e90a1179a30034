"""fmlm serve's OpenAI-compatible API, through the official ``openai`` client against a real loopback server.

Tiny models are trained in the fixture (a one-step semigroup flow map and an AR model, blocks of 8
words). Servers run uvicorn in a thread on 127.0.0.1 (a socket bound to port 0) and are waited
for on a readiness event; batches are made deterministic by closing them when full (a long
window, ``batch_max`` equal to the rows sent), never by timing.
"""

import json
import threading

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from fmlm.api import load  # noqa: E402
from fmlm.config import build_config  # noqa: E402
from fmlm.serve import ServeLimits, bind_socket, create_app, wrap_model  # noqa: E402
from fmlm.serve.batching import JobQueue, RowStreams, Unsplittable  # noqa: E402
from fmlm.train import Trainer  # noqa: E402


def _train(tmp, name: str, method: list[str]):
    cfg = build_config(
        "tiny",
        [
            "threads=1",
            "max_steps=4",
            "eval_every=100",
            "save_every=100",
            "log_every=100",
            "eval_batches=1",
            "data.phrases_per_seq=4",
            "data.seq_len=8",
            f"data.cache_dir={tmp / 'cache'}",
            *method,
        ],
    )
    Trainer(cfg, tmp / name, progress=False, log=lambda *a: None).fit()
    return wrap_model(name, load(tmp / name, device="cpu"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai")
    return [
        _train(tmp, "fmlm", ["train.method=semigroup", "distill.self_distill=true"]),
        _train(tmp, "ar", ["train.method=ar"]),
    ]


class _Server(uvicorn.Server):
    """uvicorn with a readiness event (set once the socket accepts connections)."""

    def __init__(self, config):
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        self.ready.set()


class Running:
    def __init__(self, models, limits: ServeLimits):
        self.app = create_app(models, limits)
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = _Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        assert self.server.ready.wait(120), "server did not start"
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def close(self):
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def _running(models, **limits):
    return Running(models, ServeLimits(max_samples=8, **limits))


@pytest.fixture(scope="module")
def server(models):
    r = _running(models)
    yield r
    r.close()


@pytest.fixture(scope="module")
def batched(models):
    """Batches close only when 4 sequences are gathered (the window is far longer than any test)."""
    r = _running(models, batch_max=4, batch_window=300.0)
    yield r
    r.close()


@pytest.fixture(scope="module")
def unbatched(models):
    r = _running(models, batch_max=1)
    yield r
    r.close()


def _word(models, i: int) -> str:
    return models[0].model.tokenizer.decode([i]).strip()


# ------------------------------------------------------------------------------------ the API
def test_models_are_listed_and_retrieved(server):
    ids = [m.id for m in server.client.models.list().data]
    assert ids == ["fmlm", "ar"]
    card = server.client.models.retrieve("fmlm")
    assert card.id == "fmlm" and card.object == "model" and card.owned_by == "fmlm"
    assert card.model_extra["method"] == "semigroup" and card.model_extra["seq_len"] == 8
    with pytest.raises(openai.NotFoundError) as e:
        server.client.models.retrieve("gpt-4")
    err = e.value.response.json()["error"]
    assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"


def test_completion_is_seeded_and_continues_the_prompt(server, models):
    c = server.client
    prompt = _word(models, 3)
    kw = dict(model="fmlm", prompt=prompt, n=3, seed=11, extra_body={"steps": 1})
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert a.object == "text_completion" and len(a.choices) == 3
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert all(ch.finish_reason in ("stop", "length") for ch in a.choices)
    assert a.model_extra["seed"] == 11 and a.model_extra["steps"] == 1
    assert a.usage.prompt_tokens == 1 and a.usage.total_tokens == 1 + a.usage.completion_tokens
    # The same draw as /v1/generate with that prefix: the completion is what follows the prompt.
    g = httpx.post(
        server.url + "/v1/generate", json={"model": "fmlm", "prefix": prompt, "num_samples": 3, "seed": 11, "steps": 1}
    ).json()
    tok = models[0].model.tokenizer
    for ch, raw in zip(a.choices, g["raw_ids"]):
        assert raw[0] == 3
        rest = raw[1 : raw.index(tok.eos_id, 1)] if tok.eos_id in raw[1:] else raw[1:]
        assert ch.text == (" " + tok.decode(rest) if rest else "")
        assert ch.finish_reason == ("stop" if tok.eos_id in raw[1:] else "length")
    texts = {tuple(ch.text for ch in c.completions.create(**{**kw, "prompt": "", "seed": s}).choices) for s in range(6)}
    assert len(texts) > 1  # other seeds, other samples


def test_max_tokens_cuts_and_defaults_to_the_rest_of_the_block(server, models):
    c, tok = server.client, models[0].model.tokenizer
    full = c.completions.create(model="fmlm", prompt="", seed=2, n=4, extra_body={"steps": 1})
    cut = c.completions.create(model="fmlm", prompt="", seed=2, n=4, max_tokens=2, extra_body={"steps": 1})
    g = httpx.post(server.url + "/v1/generate", json={"model": "fmlm", "num_samples": 4, "seed": 2, "steps": 1})
    for f, k, raw in zip(full.choices, cut.choices, g.json()["raw_ids"]):
        ended = tok.eos_id in raw
        rest = raw[: raw.index(tok.eos_id)] if ended else raw
        assert f.text == tok.decode(rest) and f.finish_reason == ("stop" if ended else "length")
        assert k.text == tok.decode(rest[:2]) and k.finish_reason == ("stop" if ended and len(rest) <= 2 else "length")
    assert full.usage.completion_tokens > cut.usage.completion_tokens


def test_stream_is_openai_server_sent_events(server):
    c = server.client
    kw = dict(model="fmlm", prompt=["", "zogu"], n=2, seed=5, extra_body={"steps": 1})
    whole = c.completions.create(**kw)
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    got = {ch.index: ch for chunk in chunks for ch in chunk.choices}
    assert [got[i].text for i in range(4)] == [ch.text for ch in whole.choices]
    assert [got[i].finish_reason for i in range(4)] == [ch.finish_reason for ch in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    raw = httpx.post(server.url + "/v1/completions", json={**kw.pop("extra_body"), **kw, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in raw.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: {") for line in lines[:-1])
    assert json.loads(lines[0][len("data: ") :])["object"] == "text_completion"


@pytest.mark.parametrize(
    "kw,status,param,match",
    [
        (dict(model="gpt-4", prompt="a"), 404, "model", "unknown model"),
        (dict(model="fmlm", prompt="a", temperature=0.5), 400, "temperature", "not supported"),
        (dict(model="fmlm", prompt="a", logprobs=2), 400, "logprobs", "not supported"),
        (dict(model="fmlm", prompt="zogu", max_tokens=8), 400, "max_tokens", "max_tokens must be in 1..7"),
        (dict(model="fmlm", prompt="a", n=9), 400, "n", "n must be in 1..8"),
        (dict(model="fmlm", prompt=["zogu"] * 3, n=3), 400, "n", "the limit is 8"),
        (dict(model="fmlm", prompt="notaword"), 400, "prompt", "cannot tokenise"),
        (dict(model="fmlm", prompt="zogu " * 8), 400, "prompt", "no room is left"),
        (dict(model="fmlm", prompt=[1, 2]), 400, "prompt", "token ids is not supported"),
        (dict(model="fmlm", prompt="a", seed=-1), 400, "seed", "seed must be in"),
        (dict(model="fmlm", prompt="a", extra_body={"steps": 0}), 400, "steps", "steps must be in"),
        (dict(model="ar", prompt="a", extra_body={"gamma": 0.5}), 400, "gamma", "does not apply"),
        (dict(model="ar", prompt=["zogu", "sare"]), 400, "prompt", "one prompt per request"),
        (dict(model="fmlm", prompt="a", extra_body={"stepz": 1}), 400, "stepz", "unknown field"),
    ],
)
def test_bad_requests_get_openai_errors(server, kw, status, param, match):
    kw = dict(kw)
    if "prompt" in kw and kw["prompt"] == "a":
        kw["prompt"] = "zogu"
    with pytest.raises(openai.APIStatusError) as e:
        server.client.completions.create(**kw)
    assert e.value.status_code == status
    err = e.value.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and match in err["message"]
    assert "\n" not in err["message"]


def test_neutral_values_of_unsupported_parameters_are_accepted(server):
    r = server.client.completions.create(
        model="fmlm", prompt="zogu", temperature=1, top_p=1.0, echo=False, stop=None, presence_penalty=0, seed=1
    )
    assert len(r.choices) == 1


# ----------------------------------------------------------------------------------- batching
def _concurrently(fns):
    out = [None] * len(fns)

    def call(i):
        out[i] = fns[i]()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("prompted", [True, False])
def test_batched_requests_get_their_unbatched_texts(batched, unbatched, models, steps, prompted):
    """Three requests (different seeds, prompts and n; 4 sequences) share one forward pass, and each
    gets exactly the texts it gets alone."""
    w = [_word(models, i) for i in (3, 4, 5)] if prompted else ["", "", ""]
    reqs = [dict(prompt=w[0], n=1, seed=101), dict(prompt=w[1], n=1, seed=102), dict(prompt=[w[2], w[0]], seed=103)]

    def call(srv, r):
        return lambda: srv.client.completions.create(model="fmlm", extra_body={"steps": steps}, **r)

    together = _concurrently([call(batched, r) for r in reqs])
    alone = [call(unbatched, r)() for r in reqs]
    for t, a in zip(together, alone):
        assert t.model_extra["fmlm"]["batch_requests"] == 3 and t.model_extra["fmlm"]["batch_rows"] == 4
        assert a.model_extra["fmlm"]["batch_requests"] == 1
        assert [c.text for c in t.choices] == [c.text for c in a.choices]
        assert [c.finish_reason for c in t.choices] == [c.finish_reason for c in a.choices]


def test_ar_requests_with_one_prompt_share_a_batch(batched, unbatched):
    reqs = [dict(prompt="zogu", n=n, seed=s) for n, s in ((2, 7), (1, 8), (1, 9))]

    def call(srv, r):
        return lambda: srv.client.completions.create(model="ar", **r)

    together = _concurrently([call(batched, r) for r in reqs])
    assert all(t.model_extra["fmlm"]["batch_rows"] == 4 for t in together)
    for r, t in zip(reqs, together):
        assert [c.text for c in t.choices] == [c.text for c in call(unbatched, r)().choices]


def test_generate_requests_are_batched_too(batched, unbatched):
    bodies = [{"model": "fmlm", "steps": 2, "seed": s, "num_samples": 2} for s in (1, 2)]

    def post(srv, b):
        return lambda: httpx.post(srv.url + "/v1/generate", json=b, timeout=300).json()

    together = _concurrently([post(batched, b) for b in bodies])
    for b, t in zip(bodies, together):
        assert t["batch_requests"] == 2 and t["batch_rows"] == 4
        assert t["raw_ids"] == post(unbatched, b)()["raw_ids"]
    assert httpx.get(batched.url + "/health").json()["batching"]["batches"] >= 1


# --------------------------------------------------------------------------- the parts alone
def test_row_streams_draw_each_requests_noise_bit_for_bit():
    parts = [(5, 2), (9, 1), (5, 3)]
    with RowStreams(parts, "cpu") as rs:
        a = torch.randn(6, 3, 4, generator=torch.Generator())
        b = torch.rand((6, 2), generator=torch.Generator())
        c = torch.randint(7, (6, 3), generator=torch.Generator())
        d = torch.randn(2, 2)  # no generator: untouched
    assert rs.draws == 3 and d.shape == (2, 2)
    start = 0
    for seed, n in parts:
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(a[start : start + n], torch.randn(n, 3, 4, generator=g))
        assert torch.equal(b[start : start + n], torch.rand((n, 2), generator=g))
        assert torch.equal(c[start : start + n], torch.randint(7, (n, 3), generator=g))
        start += n
    with pytest.raises(Unsplittable, match="not batch-first"), RowStreams(parts, "cpu"):
        torch.randn(5, generator=torch.Generator())
    with pytest.raises(Unsplittable, match="cannot be split"), RowStreams(parts, "cpu"):
        torch.randperm(6, generator=torch.Generator())


class _Job:
    def __init__(self, key, rows, enqueued=0.0):
        self.batch_key, self.num_samples, self.enqueued = key, rows, enqueued
        self.cancelled = threading.Event()


def test_job_queue_gathers_by_key_up_to_max_rows():
    now = [0.0]
    q = JobQueue(8, clock=lambda: now[0])
    jobs = [_Job("a", 1), _Job("b", 1), _Job("a", 2), _Job(None, 1), _Job("a", 2), _Job("a", 1)]
    for j in jobs:
        q.put_nowait(j)
    jobs[5].cancelled.set()
    now[0] = 10.0  # past every window
    assert q.take(4, window=1.0) == [jobs[0], jobs[2]]  # jobs[4] would make 5 rows, jobs[5] left
    assert q.take(4, window=1.0) == [jobs[1]]
    assert q.take(4, window=1.0) == [jobs[3]]  # no key: alone
    assert q.take(4, window=1.0) == [jobs[4]]  # the cancelled job is not gathered ...
    assert q.take(4, window=1.0) == [jobs[5]]  # ... and comes out alone (the worker drops it)
    assert q.qsize() == 0
    q.put_nowait(_Job("a", 1))
    q.close()
    assert q.take(4, window=1.0) is None


def test_job_queue_waits_for_the_window_or_a_full_batch():
    now = [0.0]
    q = JobQueue(8, clock=lambda: now[0])
    first = _Job("a", 1, enqueued=0.0)
    q.put_nowait(first)
    got = []
    t = threading.Thread(target=lambda: got.append(q.take(2, window=1e6)))
    t.start()
    second = _Job("a", 1)
    q.put_nowait(second)  # fills the batch: take returns before the window ends
    t.join(60)
    assert got == [[first, second]]
    q.put_nowait(_Job("a", 1, enqueued=0.0))
    now[0] = 5.0
    assert len(q.take(2, window=1.0)) == 1  # the window has passed: what is there goes
    with pytest.raises(Exception):
        for _ in range(9):
            q.put_nowait(_Job("a", 1))


@pytest.mark.parametrize("flag,value", [("--batch-window", "-1"), ("--batch-window", "nan"), ("--batch-max", "0")])
def test_bad_batching_flags_are_one_line(flag, value, capsys):
    from fmlm.cli import main

    with pytest.raises(SystemExit) as e:  # argparse usage errors
        main(["serve", "--ckpt", "x", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and "Traceback" not in err


@pytest.mark.slow
def test_loadtest_batching_mode_reports_every_cell(models, tmp_path, capsys):
    """benchmarks/loadtest.py --batching against two real `fmlm serve` processes (on and off)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "loadtest.py"
    spec = importlib.util.spec_from_file_location("loadtest", script)
    lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    out = tmp_path / "lt.json"
    argv = ["--batching", "--ckpt", f"fmlm={models[0].model.path}", "--requests", "8", "--levels", "1,4"]
    assert lt.main([*argv, "--warmup", "1", "--max-seconds", "600", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    cells = [(c["batching"], c["concurrency"], c["ok"]) for c in r["cells"]]
    assert cells == [("on", 1, 8), ("off", 1, 8), ("on", 4, 8), ("off", 4, 8)] and r["errors"] == 0
    assert all(c["latency_ms"]["p50"] <= c["latency_ms"]["p99"] for c in r["cells"])
    assert all(c["mean_batch_rows"] == 1.0 for c in r["cells"] if c["batching"] == "off")
    assert "| on (max 32) | 4 | 8/8 |" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["flm", "semigroup", "mdlm", "duo", "ar"])
def test_every_sampler_draws_batch_first(tmp_path, method):
    """For every method's sampler, one batched draw (RowStreams) gives each job its unbatched blocks, bit
    for bit (random tiny models, blocks of 4 words, 3 steps)."""
    from fmlm.api import Model
    from fmlm.data import PhrasesTask
    from fmlm.methods import build_method
    from fmlm.serve.completions import parse_completion
    from fmlm.serve.worker import draw_batch, job_conditioning

    cfg = build_config("tiny", [f"train.method={method}", "threads=1", "data.phrases_per_seq=2", "data.seq_len=4"])
    task = PhrasesTask(n=4, k=2, phrases_per_seq=2, seed=0)
    cfg.model.vocab_size, cfg.model.max_seq_len = task.tokenizer.vocab_size, 4
    torch.manual_seed(0)
    served = wrap_model("m", Model(cfg, build_method(cfg).eval(), task.tokenizer, tmp_path))
    word = task.tokenizer.decode([3]).strip()
    other = task.tokenizer.decode([4]).strip()
    prompts = [word] * 3 if method == "ar" else [word, [other, ""], other]  # "" in a prompted job: nothing known
    jobs = [
        parse_completion(
            json.dumps({"model": "m", "prompt": p, "seed": s, "n": n, "steps": 3}).encode(),
            {"m": served},
            ServeLimits(),
        )
        for p, s, n in zip(prompts, (5, 6, 7), (2, 1, 1))
    ]
    assert len({j.batch_key for j in jobs}) == 1

    def callback(i, z, d):
        pass

    for job, raw in zip(jobs, draw_batch(jobs, callback)):
        kw = dict(job.options, **job_conditioning(job))
        alone = served.model.sample_ids(job.num_samples, job.steps, job.seed, seq_len=4, callback=callback, **kw)
        assert torch.equal(raw, alone), (method, job.seed)
