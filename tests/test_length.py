"""Variable length (fmlm.length): samples end at their first EOS in the API, the CLI and the server;
--min-length redraws short samples within a bound; --bos starts a wrap-packed model at a document start."""

import copy
import json

import pytest
import torch

from fmlm.api import Model
from fmlm.cli import main
from fmlm.config import build_config
from fmlm.data import PhrasesTask
from fmlm.length import retry_seed, split_at_eos
from fmlm.methods import build_method
from fmlm.methods.registry import METHODS

GENERATORS = [m for m in METHODS if m != "classifier"]  # flm, the flow maps, ar, mdlm, duo, dcd, sdtt
L = 8
# The flow maps share FMLM's sampler, whose known-token inversion is the slow part; one runs by default.
EVERY = [pytest.param(m, marks=pytest.mark.slow) if m in ("lagrangian", "eulerian") else m for m in GENERATORS]


def tiny_model(method: str, tmp_path, text: bool = False) -> Model:
    """A randomly initialised tiny model over the phrases vocabulary with blocks of L tokens;
    ``text``: its config says it was trained on wrap-packed text (for --bos)."""
    cfg = build_config("tiny", [f"train.method={method}", "threads=1"])
    task = PhrasesTask(n=4, k=2, phrases_per_seq=L // 2, seed=0)
    cfg.model.vocab_size = task.tokenizer.vocab_size
    cfg.data.seq_len = cfg.model.max_seq_len = L
    if text:
        cfg.data.dataset, cfg.data.packing = "shakespeare", "wrap"
    torch.manual_seed(0)
    return Model(cfg, build_method(cfg).eval(), task.tokenizer, tmp_path / method)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("length")
    return {m: tiny_model(m, d) for m in GENERATORS}


def assert_cut_at_eos(model: Model, out, start: int = 0) -> None:
    eos = model.tokenizer.eos_id
    assert len(out.ids) == len(out.texts) == len(out.ended) == out.raw.shape[0]
    for raw, ids, text, ended in zip(out.raw.tolist(), out.ids, out.texts, out.ended):
        body = raw[start:]
        cut = body.index(eos) if eos in body else len(body)
        assert ids == body[:cut] and ended == (eos in body)
        assert text == model.tokenizer.decode(ids) and model.tokenizer.eos_text not in text


def test_split_at_eos_with_a_start():
    ids = torch.tensor([[9, 1, 9, 2], [9, 1, 2, 3], [1, 9, 9, 9]])
    assert split_at_eos(ids, 9) == ([[], [], [1]], [True, True, True])
    assert split_at_eos(ids, 9, start=1) == ([[1], [1, 2, 3], []], [True, False, True])
    assert split_at_eos(ids, None) == (ids.tolist(), [False, False, False])


@pytest.mark.parametrize("method", EVERY)
def test_every_method_ends_at_the_first_eos(models, method):
    model = models[method]
    eos = model.tokenizer.eos_id
    # A known EOS at position 2 ends every sample there, whatever the network does.
    forced = model.generate(6, 2, seed=1, prefix=torch.tensor([3, 5, eos]))
    assert forced.ids == [[3, 5]] * 6 and forced.ended == [True] * 6
    assert forced.texts == [model.tokenizer.decode([3, 5])] * 6
    assert all(row[:3] == [3, 5, eos] and len(row) == L for row in forced.raw.tolist())
    # Free samples: cut before their own first EOS; the raw blocks are sample_ids' output.
    out = model.generate(32, 2, seed=4)
    assert_cut_at_eos(model, out)
    assert torch.equal(out.raw, model.sample_ids(32, 2, 4))
    assert any(out.ended) and not all(out.ended)  # this seed has both kinds
    assert model.sample(32, 2, 4) == out.texts


def test_min_length_redraws_short_samples_deterministically(models):
    model, n, k, seed = models["flm"], 16, 3, 5
    out = model.generate(n, 2, seed, min_length=k, max_tries=4)
    again = model.generate(n, 2, seed, min_length=k, max_tries=4)
    assert out.ids == again.ids and torch.equal(out.raw, again.raw) and out.tries == again.tries
    assert out.tries > 1  # this seed's first draw has short samples
    assert all(len(r) >= k for r in out.ids) and len(out.ids) + out.rejected == n
    assert out.seeds == [retry_seed(seed, t) for t in range(out.tries)] and len(set(out.seeds)) == out.tries
    # Row i is the first draw's row i that is long enough (the rejected ones are left out).
    draws = [split_at_eos(model.sample_ids(n, 2, s), model.tokenizer.eos_id)[0] for s in out.seeds]
    expected = []
    for i in range(n):
        long_enough = [d[i] for d in draws if len(d[i]) >= k]
        if long_enough:
            expected.append(long_enough[0])
    assert out.ids == expected and len(expected) == n - out.rejected


@pytest.mark.parametrize("method", ["flm", "ar", "mdlm"])
def test_min_length_stops_after_max_tries_and_counts_the_rejected(models, method, monkeypatch):
    model = models[method]
    draws = []
    real = model.sample_ids

    def counted(n, steps, seed, **kw):
        draws.append(seed)
        return real(n, steps, seed, **kw)

    monkeypatch.setattr(model, "sample_ids", counted)
    # Every sample is one token long (a known EOS at position 1): none can reach 2 tokens.
    out = model.generate(4, 2, 7, min_length=2, max_tries=3, prefix=[1, model.tokenizer.eos_id])
    assert draws == [7, retry_seed(7, 1), retry_seed(7, 2)] and out.tries == 3
    assert out.rejected == 4 and out.ids == [] and out.texts == [] and out.raw.shape == (0, L)
    draws.clear()
    assert model.generate(4, 2, 7, min_length=1, max_tries=3, prefix=[1, model.tokenizer.eos_id]).tries == 1
    assert draws == [7]  # nothing short: one draw


@pytest.mark.parametrize("method", EVERY)
def test_bos_puts_the_separator_first(tmp_path, method):
    model = tiny_model(method, tmp_path, text=True)
    eos = model.tokenizer.eos_id
    out = model.generate(8, 2, seed=2, bos=True)
    assert (out.raw[:, 0] == eos).all()
    assert_cut_at_eos(model, out, start=1)
    with_prefix = model.generate(4, 2, seed=2, bos=True, prefix=[3, 5])
    assert all(row[:3] == [eos, 3, 5] for row in with_prefix.raw.tolist())
    assert all(ids[:2] == [3, 5] for ids in with_prefix.ids)
    if "suffix" in model.conditioning:  # a template moves one position on too
        t = model.generate(2, 2, seed=2, bos=True, suffix=model.tokenizer.decode([6]))
        assert all(row[0] == eos and row[-1] == 6 for row in t.raw.tolist())


def run_cli(monkeypatch, capsys, model, *argv):
    monkeypatch.setattr("fmlm.api.load", lambda *a, **k: model)
    try:
        code = main(["sample", "--ckpt", "unused", *argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_samples_cut_at_eos(models, monkeypatch, capsys):
    model = models["duo"]
    code, out, _ = run_cli(monkeypatch, capsys, model, "--steps", "2", "-n", "32", "--seed", "4", "--json")
    assert code == 0
    (rec,) = json.loads(out)["results"]
    expected = model.generate(32, 2, 4)
    assert rec["texts"] == expected.texts and rec["lengths"] == [len(r) for r in expected.ids]
    code, out, _ = run_cli(monkeypatch, capsys, model, "--steps", "2", "-n", "3", "--seed", "4")
    assert code == 0 and out == "".join(t + "\n\n" for t in model.generate(3, 2, 4).texts)


def test_cli_min_length_resamples(models, monkeypatch, capsys):
    model = models["flm"]
    code, out, _ = run_cli(monkeypatch, capsys, model, "--steps", "2", "-n", "16", "--seed", "5", "--min-length", "3")
    assert code == 0
    assert out == "".join(t + "\n\n" for t in model.generate(16, 2, 5, min_length=3).texts)


def assert_one_line_error(code, err, match):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--min-length", "-1"], "min_length must be an integer >= 0"),
        (["--min-length", str(L + 1)], f"more than the {L} tokens"),
        (["--min-length", "x"], "invalid int value"),
        (["--max-tries", "0"], "max_tries must be an integer >= 1"),
        (["--bos"], "--bos applies to models trained on wrap-packed text"),
    ],
)
def test_cli_bad_length_options_are_one_line(models, monkeypatch, capsys, argv, match):
    code, _, err = run_cli(monkeypatch, capsys, models["mdlm"], "--steps", "2", *argv)
    assert_one_line_error(code, err, match)


def test_cli_bos_needs_an_eos_token(tmp_path, monkeypatch, capsys):
    model = tiny_model("flm", tmp_path, text=True)
    code, _, err = run_cli(monkeypatch, capsys, model, "--bos", "--min-length", str(L))
    assert_one_line_error(code, err, f"more than the {L - 1} tokens")  # the BOS takes one position
    model.tokenizer = copy.copy(model.tokenizer)
    model.tokenizer.eos_id = None
    code, _, err = run_cli(monkeypatch, capsys, model, "--bos")
    assert_one_line_error(code, err, "--bos needs a tokenizer with an EOS token")


def test_server_min_length_and_bos_fields(models, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from fmlm.serve import ServeLimits, create_app, wrap_model

    text = tiny_model("semigroup", tmp_path, text=True)
    served = [wrap_model("flm", models["flm"]), wrap_model("ar", models["ar"]), wrap_model("text", text)]
    limits = ServeLimits(max_steps=8, max_tries=3)
    with TestClient(create_app(served, limits)) as client:
        body = {"model": "flm", "num_samples": 16, "steps": 2, "seed": 5, "min_length": 3}
        r = client.post("/v1/generate", json=body).json()
        expected = models["flm"].generate(16, 2, 5, min_length=3, max_tries=3)
        assert r["ids"] == expected.ids and r["texts"] == expected.texts and r["rejected"] == expected.rejected
        assert r["tries"] == expected.tries and r["raw_ids"] == expected.raw.tolist()
        assert all(len(ids) >= 3 for ids in r["ids"])
        plain = client.post("/v1/generate", json={"model": "ar", "num_samples": 8, "steps": 2, "seed": 1}).json()
        assert plain["ids"] == models["ar"].generate(8, 2, 1).ids
        assert all(raw[: len(ids)] == ids for raw, ids in zip(plain["raw_ids"], plain["ids"]))
        r = client.post("/v1/generate", json={"model": "text", "steps": 2, "bos": True, "num_samples": 4}).json()
        assert all(raw[0] == text.tokenizer.eos_id for raw in r["raw_ids"])
        for bad, match in [
            ({"min_length": -1}, "min_length must be in 0..8"),
            ({"min_length": 9}, "min_length must be in 0..8"),
            ({"model": "text", "bos": True, "min_length": 8}, "min_length must be in 0..7"),
            ({"bos": "yes"}, "bos must be true or false"),
            ({"bos": True}, "--bos applies to models trained on wrap-packed text"),
        ]:
            r = client.post("/v1/generate", json={"model": "flm", "steps": 2, **bad})
            assert r.status_code == 400 and match in r.json()["error"], (bad, r.json())


def test_server_length_and_context_fields(models):
    """A long text over HTTP is the API's block-by-block text of the same seed (fmlm.long)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from fmlm.serve import ServeLimits, create_app, wrap_model

    served = [wrap_model("flm", models["flm"]), wrap_model("ar", models["ar"])]
    with TestClient(create_app(served, ServeLimits(max_steps=8, max_tries=3, max_length=64))) as client:
        for name in ("flm", "ar"):
            body = {"model": name, "num_samples": 3, "steps": 2, "seed": 4, "length": 20, "context": 3}
            r = client.post("/v1/generate", json=body)
            assert r.status_code == 200, r.json()
            r = r.json()
            expected = models[name].generate(3, 2, 4, length=20, context=3, max_tries=3)
            assert r["ids"] == expected.ids and r["texts"] == expected.texts
            assert r["raw_ids"] == expected.raw.tolist() and len(r["raw_ids"][0]) == 20
        r = client.post("/v1/generate", json={"model": "flm", "steps": 2, "seed": 4, "length": 20, "min_length": 12})
        assert r.status_code == 200 and all(len(ids) >= 12 for ids in r.json()["ids"])
        for bad, match in [
            ({"length": 65}, "length must be in 0..64"),
            ({"length": 20, "context": 8}, "context must be in 0..7"),
            ({"context": 2}, "context applies only with a length"),
            ({"length": 20, "min_length": 21}, "min_length must be in 0..20"),
        ]:
            r = client.post("/v1/generate", json={"model": "flm", "steps": 2, **bad})
            assert r.status_code == 400 and match in r.json()["error"], (bad, r.json())
        r = client.post("/v1/stream", json={"model": "flm", "steps": 2, "length": 20})
        assert r.status_code == 400 and "not a stream" in r.json()["error"]
