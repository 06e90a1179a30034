"""``fmlm import flm-official``: the authors' stage-1 FLM DiT (david3684/flm) converted into fmlm's.

The fixture (tests/fixtures/flm_official, made by its make_fixture.py from their models/dit.py at the
commit in meta.json) holds a tiny DiT of theirs with random weights in their key layout, fixed inputs
and the outputs their code gave; the converted model must reproduce them to 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fmlm
from fmlm.cli import main
from fmlm.data.tokenizers.symbols import CharTokenizer
from fmlm.errors import CheckpointError, DataError
from fmlm.hub import official
from fmlm.nn.dit import DiT

FIXTURE = Path(__file__).parent / "fixtures" / "flm_official"
META = json.loads((FIXTURE / "meta.json").read_text())
V, L = META["vocab_size"], META["seq_len"]


@pytest.fixture(scope="module")
def their_state() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "state_dict.safetensors"))  # keys backbone.* as in their .ckpt


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "io.safetensors"))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer with the fixture's V ids (V - 3 characters and the char tokenizer's 3 specials)."""
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    chars = list("abcdefghijklmnopqrstuvwxyz .,;:!?ABCDEFGHIJ")[: V - 3]
    tok = CharTokenizer(chars)
    assert tok.vocab_size == V
    tok.save(d)
    return d


def _import(src: Path, out: Path, tokenizer_dir: Path, *extra: str) -> int:
    return main(["import", "flm-official", str(src), "--out", str(out), "--tokenizer", str(tokenizer_dir)]
                + ["--seq-len", str(L), *extra])  # fmt: skip


def test_converted_model_reproduces_their_outputs(tmp_path, tokenizer_dir, io):
    src = FIXTURE / "state_dict.safetensors"
    assert _import(src, tmp_path / "m", tokenizer_dir, "--weights", "raw") == 0
    model = fmlm.from_pretrained(tmp_path / "m", device="cpu")
    cfg = model.config.model
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.cond_dim, cfg.vocab_size) == (2, 32, 2, 16, V)
    with torch.no_grad():
        logits = model.method.net(io["x"], io["tau"])
        probs = model.method.denoise(io["x"], io["tau"])
    assert (logits - io["logits"]).abs().max() <= 1e-5
    assert (probs - io["logits"].softmax(-1)).abs().max() <= 1e-5
    # The card says where it came from.
    card = (tmp_path / "m" / "README.md").read_text()
    assert "david3684/flm" in card and "raw (non-EMA)" in card


def test_each_switch_is_needed(their_state, io):
    """Without the soft cap, the rotary permutation or ε = 1e-5 the outputs move (the fixture can tell)."""
    state = official._backbone(their_state, FIXTURE)
    size = official.dims(state)
    conv = {k[4:]: v for k, v in official.convert(state, size["n_heads"]).items()}

    def err(**over):
        kw = {**dict(logit_cap=0.0, time_scale=1.0, norm_affine=True, norm_eps=1e-5, attn_softcap=50.0), **over}
        net = DiT(V, L, size["n_blocks"], size["d_model"], size["n_heads"], size["cond_dim"], **kw).eval()
        net.load_state_dict(conv)
        with torch.no_grad():
            return (net(io["x"], io["tau"]) - io["logits"]).abs().max().item()

    assert err() <= 1e-5
    assert err(attn_softcap=0.0) > 1e-2
    assert err(time_scale=1000.0) > 1e-2
    assert err(norm_eps=1e-6) > 1e-7  # small at this size, but there
    # Their qkv rows as they are (no permutation): the rotary pairs differ.
    raw = dict(conv)
    for i in range(size["n_blocks"]):
        raw[f"blocks.{i}.qkv.weight"] = state[f"blocks.{i}.attn_qkv.weight"]
    net = DiT(V, L, 2, 32, 2, 16, logit_cap=0.0, time_scale=1.0, norm_affine=True, norm_eps=1e-5, attn_softcap=50.0)
    net.load_state_dict(raw)
    with torch.no_grad():
        assert (net.eval()(io["x"], io["tau"]) - io["logits"]).abs().max() > 1e-2


def test_parameter_order_is_theirs(their_state):
    """The EMA's shadow_params follow their DIT's named_parameters(), recorded from their code."""
    state = official._backbone(their_state, FIXTURE)
    assert official.param_order(state, 2) == META["param_order"]
    llw = {**state, **{k: torch.zeros(1) for k in META["param_order_loss_weighting"] if k.startswith("learnable")}}
    assert official.param_order(llw, 2) == META["param_order_loss_weighting"]


def _lightning(their_state: dict, ema_shift: float | None, **extra) -> dict:
    """A checkpoint as Lightning and their on_save_checkpoint write it (without hyper_parameters)."""
    order = ["backbone." + k for k in META["param_order"]]
    sd = {k: their_state[k] for k in order}
    sd["backbone.rotary_emb.inv_freq"] = their_state["backbone.rotary_emb.inv_freq"]
    ck = {"epoch": 0, "global_step": 7, "pytorch-lightning_version": "2.5.0", "state_dict": sd, "loops": {}, **extra}
    if ema_shift is not None:
        shadow = [v + ema_shift * (i + 1) for i, v in enumerate(their_state[k] for k in order)]
        ck["ema"] = {"decay": 0.9999, "num_updates": 7, "shadow_params": shadow}
    return ck


def test_lightning_ckpt_with_ema(tmp_path, their_state, tokenizer_dir):
    torch.save(_lightning(their_state, 0.01), tmp_path / "last.ckpt")
    assert _import(tmp_path / "last.ckpt", tmp_path / "ema", tokenizer_dir) == 0
    assert _import(tmp_path / "last.ckpt", tmp_path / "raw", tokenizer_dir, "--weights", "raw") == 0
    ema = fmlm.from_pretrained(tmp_path / "ema").method.state_dict()
    raw = fmlm.from_pretrained(tmp_path / "raw").method.state_dict()
    state = official._backbone(their_state, FIXTURE)
    # raw: their weights, converted; EMA: the i-th shadow parameter under the i-th name.
    want_raw = official.convert(state, 2)
    shifted = {k: state[k] + 0.01 * (i + 1) for i, k in enumerate(META["param_order"])}
    want_ema = official.convert({**state, **shifted}, 2)
    assert all(torch.equal(raw[k], v) for k, v in want_raw.items())
    assert all(torch.equal(ema[k], v) for k, v in want_ema.items())
    # The same EMA through a safetensors export of the checkpoint (what docs/flm-official.md shows).
    ck = _lightning(their_state, 0.01)
    flat = {**ck["state_dict"], **{f"ema.shadow_params.{i}": p for i, p in enumerate(ck["ema"]["shadow_params"])}}
    save_file(flat, str(tmp_path / "flm.safetensors"))
    assert _import(tmp_path / "flm.safetensors", tmp_path / "ema2", tokenizer_dir) == 0
    again = fmlm.from_pretrained(tmp_path / "ema2").method.state_dict()
    assert all(torch.equal(again[k], v) for k, v in want_ema.items())


class Opaque:
    """Stands for their hyper_parameters' OmegaConf object; unpickling it would write a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __setstate__(self, state):
        Path(state["marker"]).write_text("unpickled")


def _one_line(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_refusals_are_one_line(tmp_path, their_state, tokenizer_dir, capsys):
    marker = tmp_path / "ran"
    torch.save(_lightning(their_state, 0.01, hyper_parameters={"config": Opaque(str(marker))}), tmp_path / "hp.ckpt")
    err = _one_line(capsys, _import(tmp_path / "hp.ckpt", tmp_path / "o", tokenizer_dir))
    assert "refusing to unpickle" in err and "Opaque" in err and "safetensors" in err and not marker.exists()
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert "cannot read" in _one_line(capsys, _import(tmp_path / "junk.ckpt", tmp_path / "o", tokenizer_dir))
    torch.save(_lightning(their_state, None), tmp_path / "noema.ckpt")
    err = _one_line(capsys, _import(tmp_path / "noema.ckpt", tmp_path / "o", tokenizer_dir))
    assert "no EMA weights" in err and "--weights raw" in err
    # A flow-map checkpoint (double_temb), an unknown key, a causal DiT.
    for name, change, words in (
        ("fm", {"backbone.sigma_map_prime.mlp.0.weight": torch.zeros(16, 256)}, "flow-map checkpoint"),
        ("extra", {"backbone.blocks.0.extra": torch.zeros(3)}, "unexpected 1 keys (e.g. blocks.0.extra)"),
    ):
        save_file({**their_state, **change}, str(tmp_path / f"{name}.safetensors"))
        assert words in _one_line(capsys, _import(tmp_path / f"{name}.safetensors", tmp_path / "o", tokenizer_dir))
    causal = {k: v for k, v in their_state.items() if "sigma_map" not in k}
    save_file(causal, str(tmp_path / "ar.safetensors"))
    assert "causal (AR)" in _one_line(capsys, _import(tmp_path / "ar.safetensors", tmp_path / "o", tokenizer_dir))
    # A tokenizer of another size; heads that do not fit the rotary table.
    other = tmp_path / "tok5"
    CharTokenizer(list("abc")).save(other)
    err = _one_line(capsys, _import(FIXTURE / "state_dict.safetensors", tmp_path / "o", other, "--weights", "raw"))
    assert f"vocabulary has {V} ids" in err
    err = _one_line(
        capsys,
        _import(
            FIXTURE / "state_dict.safetensors", tmp_path / "o", tokenizer_dir, "--weights", "raw", "--n-heads", "4"
        ),  # fmt: skip
    )
    assert "does not fit the rotary table" in err
    assert not (tmp_path / "o").exists()


def test_gpt2_tokenizer_gets_their_pad_token():
    """Their get_tokenizer adds [PAD] to GPT-2 (50258 ids): a checkpoint one id larger gets the same."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from fmlm.data.tokenizers.pretrained import HFTokenizer

    backend = Tokenizer(WordLevel({"a": 0, "b": 1, "<|endoftext|>": 2}, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = Whitespace()
    tok = HFTokenizer(backend, "gpt2", eos_id=2, pad_id=2, eos_text="<|endoftext|>")
    fitted = official.fit_tokenizer(tok, 4)
    assert fitted.vocab_size == 4 and fitted.pad_id == 3 and fitted.encode("a b") == tok.encode("a b") == [0, 1]
    assert official.fit_tokenizer(tok, 3) is tok
    with pytest.raises(DataError, match="vocabulary has 9 ids"):
        official.fit_tokenizer(tok, 9)


def test_fmlm_eval_scores_an_imported_model(tmp_path, tokenizer_dir, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text(("abc defg hij klmno pqr stuvw xyz " * 40 + "\n") * 4)
    assert _import(FIXTURE / "state_dict.safetensors", tmp_path / "m", tokenizer_dir, "--weights", "raw",
                   "--dataset", str(text)) == 0  # fmt: skip
    capsys.readouterr()
    argv = ["eval", "--ckpt", str(tmp_path / "m"), "--scorer", "none", "--steps", "1,4", "-n", "4"]
    assert main([*argv, "--val-batches", "1", "--threads", "1", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["steps"] for r in result["results"]] == [1, 4] and result["method"] == "flm"
    assert all(0 < r["entropy"] for r in result["results"]) and 0 < result["val_ce"] < 20


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        official.read_checkpoint(tmp_path / "nope.ckpt")


def test_real_gpt2_files_get_their_pad_token(shared_dir, tmp_path):
    """GPT-2's own files (../shared/tokenizers/gpt2): 50257 ids, their checkpoints' 50258 with [PAD]; saved and
    loaded back with the model unchanged."""
    from fmlm.data import load_tokenizer

    files = shared_dir / "tokenizers" / "gpt2"
    if not files.is_dir():
        pytest.skip("no GPT-2 tokenizer files in ../shared")
    tok = official.load_any_tokenizer(f"gpt2:{files}")
    fitted = official.fit_tokenizer(tok, 50258)
    assert (tok.vocab_size, fitted.vocab_size, fitted.pad_id, fitted.eos_id) == (50257, 50258, 50257, 50256)
    text = "The flow map jumps along the flow."
    assert fitted.encode(text) == tok.encode(text) and fitted.decode(fitted.encode(text)) == text
    fitted.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert back.vocab_size == 50258 and back.encode(text) == tok.encode(text)
    tok.backend.save(str(tmp_path / "tokenizer.json"))  # a bare tokenizer.json: its EOS found by name
    bare = official.load_any_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (bare.vocab_size, bare.eos_id) == (50257, 50256) and bare.encode(text) == tok.encode(text)
