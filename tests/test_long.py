"""Long texts block by block (fmlm.long): exact lengths, each block continuing the last K tokens of
the previous one through the prefix conditioning, EOS and --min-length/--bos composing, seeds."""

import copy
import json

import pytest
import torch

from fmlm.errors import FmlmError
from fmlm.length import retry_seed
from fmlm.long import block_seed, num_blocks
from test_length import EVERY, GENERATORS, L, assert_cut_at_eos, assert_one_line_error, run_cli, tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    return {m: tiny_model(m, d) for m in GENERATORS}


def without_eos(model):
    """The model with a tokenizer that has no EOS: nothing cuts a text, so lengths are exact."""
    m = copy.copy(model)
    m.tokenizer = copy.copy(model.tokenizer)
    m.tokenizer.eos_id = None
    return m


def spy(model, monkeypatch) -> list:
    """Record every sample_ids call as (seed, its prefix or None, its kwargs, the block it returned)."""
    calls, real = [], model.sample_ids

    def recorded(n, steps, seed, **kw):
        ids = real(n, steps, seed, **kw)
        calls.append((seed, kw.get("prefix"), kw, ids))
        return ids

    monkeypatch.setattr(model, "sample_ids", recorded)
    return calls


def assert_block_by_block(raw: torch.Tensor, calls: list, seed: int, context: int, start: int = 0) -> None:
    """raw is the first block, then each next block's tokens after its prefix, and block b was given
    the last ``context`` tokens before it as its prefix (kept by the sampler) and seed block_seed(seed, b)."""
    total = raw.shape[1]
    assert len(calls) == num_blocks(total, L, context)
    first_seed, first_prefix, _, first = calls[0]
    assert first_seed == seed and first_prefix is None
    assert torch.equal(raw[:, : min(L, total)], first[:, : min(L, total)])
    pos = L
    for b, (s, prefix, kw, ids) in enumerate(calls[1:], start=1):
        assert s == block_seed(seed, b) and not kw.get("bos")
        assert pos - context >= start  # the context never reaches back to the separator
        assert torch.equal(prefix, raw[:, pos - context : pos])
        assert torch.equal(ids[:, :context], prefix)  # the sampler kept its given prefix
        take = min(L - context, total - pos)
        assert torch.equal(raw[:, pos : pos + take], ids[:, context : context + take])
        pos += take
    assert pos >= total


@pytest.mark.parametrize("method", EVERY)
def test_every_method_writes_exact_lengths_block_by_block(models, method, monkeypatch):
    model = without_eos(models[method])
    calls = spy(model, monkeypatch)
    out = model.generate(3, 2, seed=5, length=21, context=3)
    assert out.raw.shape == (3, 21) and [len(r) for r in out.ids] == [21] * 3 and out.ended == [False] * 3
    assert out.ids == out.raw.tolist() and out.texts == model.decode(out.raw)
    assert_block_by_block(out.raw, calls, seed=5, context=3)  # 8, then 5 new per block: 4 blocks
    again = model.generate(3, 2, seed=5, length=21, context=3)
    assert again.ids == out.ids  # seeded: the same seed gives the same text
    assert model.generate(3, 2, seed=6, length=21, context=3).ids != out.ids


def test_the_default_context_is_half_the_block(models, monkeypatch):
    model = without_eos(models["mdlm"])
    calls = spy(model, monkeypatch)
    out = model.generate(2, 2, seed=1, length=L + 9)
    assert_block_by_block(out.raw, calls, seed=1, context=L // 2)
    assert len(calls) == 1 + 3  # ceil(9 / (L - L/2)) more blocks


@pytest.mark.parametrize("method", ["flm", "mdlm", "ar"])
def test_shorter_texts_are_the_start_of_longer_ones(models, method):
    model = without_eos(models[method])
    block = model.sample_ids(4, 2, 3)
    long = model.generate(4, 2, 3, length=3 * L, context=2).ids
    assert [r[:L] for r in long] == block.tolist()  # the first block is the one-block sample
    for n in (1, L - 3, L, L + 1, 2 * L):
        assert model.generate(4, 2, 3, length=n, context=2).ids == [r[:n] for r in long]


def test_a_user_prefix_starts_the_first_block_only(models, monkeypatch):
    model = without_eos(models["duo"])
    calls = spy(model, monkeypatch)
    out = model.generate(2, 2, seed=0, length=2 * L, context=2, prefix=[3, 5, 6])
    assert all(r[:3] == [3, 5, 6] for r in out.ids)
    assert calls[0][2]["prefix"] == [3, 5, 6] and all(torch.is_tensor(c[1]) for c in calls[1:])
    per_row = torch.tensor([[3, 5], [6, 1]])  # a prefix per row, as ids
    assert [r[:2] for r in model.generate(2, 2, 0, length=2 * L, prefix=per_row).ids] == per_row.tolist()


def test_a_long_text_ends_at_its_first_eos(models, monkeypatch):
    model = models["flm"]
    eos = model.tokenizer.eos_id
    out = model.generate(32, 2, seed=0, length=4 * L, context=4)
    assert_cut_at_eos(model, out)
    assert out.raw.shape == (32, 4 * L) and all(len(r) <= 4 * L for r in out.ids)
    assert any(len(r) > L for r in out.ids) and any(out.ended)  # some end in a later block
    # An EOS in every row stops the writing: no block is sampled for texts that have all ended.
    calls = spy(model, monkeypatch)
    ended = model.generate(2, 2, seed=0, length=4 * L, prefix=[3, eos])
    assert len(calls) == 1 and ended.ids == [[3], [3]] and ended.ended == [True, True]
    # The raw ids keep the first block as drawn; what no block was sampled for is EOS.
    assert (ended.raw[:, 1] == eos).all() and (ended.raw[:, L:] == eos).all() and ended.raw.shape == (2, 4 * L)


def test_min_length_redraws_whole_long_texts(models):
    model, seed = models["mdlm"], 2
    out = model.generate(16, 2, seed, length=3 * L, context=4, min_length=L + 2, max_tries=6)
    assert out.ids == model.generate(16, 2, seed, length=3 * L, context=4, min_length=L + 2, max_tries=6).ids
    assert out.tries > 1 and out.seeds == [retry_seed(seed, t) for t in range(out.tries)]
    assert all(len(r) >= L + 2 for r in out.ids) and len(out.ids) + out.rejected == 16
    assert_cut_at_eos(model, out)
    with pytest.raises(FmlmError, match="more than the"):
        model.generate(2, 2, 0, length=L, min_length=L + 1)


@pytest.mark.parametrize("method", ["semigroup", "ar"])
def test_bos_starts_the_first_block_only(tmp_path, method, monkeypatch):
    model = tiny_model(method, tmp_path, text=True)
    eos = model.tokenizer.eos_id
    calls = spy(model, monkeypatch)
    out = model.generate(4, 2, seed=3, length=2 * L, context=3, bos=True)
    assert (out.raw[:, 0] == eos).all() and out.raw.shape[1] == 2 * L + 1  # the text: 2L tokens after it
    assert_cut_at_eos(model, out, start=1)
    assert calls[0][2]["bos"] is True
    if len(calls) > 1:  # some text had not ended after the first block
        assert_block_by_block(out.raw, calls, seed=3, context=3, start=1)


def test_ar_continues_with_a_sliding_window(models, monkeypatch):
    """The AR's positions stop at its block: context L - 1 slides the window one token per block."""
    model = without_eos(models["ar"])
    calls = spy(model, monkeypatch)
    out = model.generate(3, 1, seed=4, length=L + 5, context=L - 1)
    assert len(calls) == 1 + 5 and out.raw.shape == (3, L + 5)
    assert_block_by_block(out.raw, calls, seed=4, context=L - 1)
    # Each new token is the AR's own draw after the L - 1 tokens before it (its KV-cache decoding).
    for b, (s, prefix, _, ids) in enumerate(calls[1:], start=1):
        gen = torch.Generator().manual_seed(block_seed(4, b))
        assert torch.equal(ids, model.method.sample(3, L, 1, generator=gen, known=prefix))
    # Options reach every block: greedy decoding is the same text whatever the seed.
    greedy = [model.generate(2, 1, seed=s, length=3 * L, temperature=0.0).ids for s in (0, 1)]
    assert greedy[0] == greedy[1]


def test_cli_length_and_context(models, monkeypatch, capsys):
    model = models["duo"]
    argv = ["--steps", "2", "-n", "4", "--seed", "3", "--length", str(2 * L + 3), "--context", "2"]
    code, out, _ = run_cli(monkeypatch, capsys, model, *argv, "--json")
    assert code == 0
    (rec,) = json.loads(out)["results"]
    expected = model.generate(4, 2, 3, length=2 * L + 3, context=2)
    assert rec["texts"] == expected.texts and rec["lengths"] == [len(r) for r in expected.ids]
    code, out, _ = run_cli(monkeypatch, capsys, model, *argv)
    assert code == 0 and out == "".join(t + "\n\n" for t in expected.texts)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--length", "0"], "--length: expected a positive integer"),
        (["--length", "-3"], "--length: expected a positive integer"),
        (["--length", "20", "--context", str(L)], f"context {L} must be shorter than the block of {L}"),
        (["--length", "20", "--context", str(L + 5)], "must be shorter than the block"),
        (["--length", "20", "--context", "-1"], "context must be an integer >= 0"),
        (["--context", "2"], "--context needs --length"),
        (["--length", "20", "--prefix", "{too long}"], f"is {L + 1} tokens long, more than the sequence length {L}"),
        (["--length", "20", "--suffix", "{word}"], "suffix conditions one whole block"),
        (["--length", "20", "--infill", "{word} [MASK] {word}"], "infill conditions one whole block"),
        (["--length", "20", "--min-length", "21"], "more than the 20 tokens"),
    ],
)
def test_cli_bad_long_options_are_one_line(models, monkeypatch, capsys, argv, match):
    tok = models["mdlm"].tokenizer
    words = {"{too long}": tok.decode([3] * (L + 1)), "{word}": tok.decode([6])}
    argv = [a.replace("{word}", words["{word}"]) if a != "{too long}" else words[a] for a in argv]
    code, _, err = run_cli(monkeypatch, capsys, models["mdlm"], "--steps", "2", *argv)
    assert_one_line_error(code, err, match)


def test_api_checks(models):
    model = models["flm"]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(FmlmError, match="length must be an integer >= 1"):
            model.generate(1, 2, length=bad)
    with pytest.raises(FmlmError, match="must be shorter than the block"):
        model.generate(1, 2, length=20, context=L)
    with pytest.raises(FmlmError, match="context applies only with a length"):
        model.generate(1, 2, context=2)
    assert model.sample(2, 2, 0, length=2 * L) == model.generate(2, 2, 0, length=2 * L).texts
