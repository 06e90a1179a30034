"""``fmlm import flm-official``: the authors' stage-1 FLM checkpoints (github.com/david3684/flm) as fmlm
model directories.

Their backbone (``models/dit.py``, ``DIT``) is fmlm's DiT with these settings, all switches of
:class:`fmlm.nn.dit.DiT`: τ enters the time embedding as it is (``time_scale=1``); LayerNorms
have a gain and no bias (``norm_affine``, the bias set to 0) and ε = 1e-5 (``norm_eps``); the
attention logits are soft-capped at 50 (``attn_softcap``, flash-attn's ``softcap``); the output
is not capped (``logit_cap=0``). Their rotary embedding rotates the halves of each head
(i, i + hd/2) where fmlm rotates neighbours (2i, 2i+1): the converter permutes the rows of the q
and k projections within each head, which leaves q·k, and so the network, unchanged.

Their time is fmlm's: the network sees τ ∈ [0, 1], the interpolant t(τ) is the inverse of the
decoding-error schedule of the vocabulary (their ``alpha_to_gamma``), the output is the
denoiser's logits. Their flow-map checkpoints (``double_temb``: a second time embedding
``sigma_map_prime``) learn a second-order correction added to the teacher's velocity, not a
two-time denoiser, so they are refused.

Reading: a Lightning ``.ckpt`` with ``torch.load(weights_only=True)`` (tensors and plain
containers only; a file holding other objects, e.g. their ``hyper_parameters``' OmegaConf
config, is refused with one line), or a ``.safetensors`` file of the LightningModule's state
dict, optionally with the EMA as ``ema.shadow_params.<i>`` (docs/flm-official.md shows the
one-line export).
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from fmlm.errors import CheckpointError, DataError, FmlmError

FREQ_DIM = 256  # their TimestepEmbedder's frequency_embedding_size
SOFTCAP = 50.0  # their DDiTBlock.softcap
NORM_EPS = 1e-5  # F.layer_norm's default, which their LayerNorm uses
_BLOCK = ("norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight", "mlp.0.weight", "mlp.0.bias")
_BLOCK += ("mlp.2.weight", "mlp.2.bias", "adaLN_modulation.weight", "adaLN_modulation.bias")
_MLP = ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")
_FINAL = ("norm_final.weight", "linear.weight", "linear.bias", "adaLN_modulation.weight", "adaLN_modulation.bias")
_LLW = tuple(f"learnable_loss_weighting.s_embed.{k}" for k in _MLP) + tuple(
    f"learnable_loss_weighting.{k}" for k in _MLP
)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], list[torch.Tensor] | None]:
    """(the backbone's state dict, the EMA's shadow parameters or None) of a .ckpt or .safetensors file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            flat = load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"corrupt safetensors file {p}: {str(e).splitlines()[0]}") from None
        shadow = {int(k.rsplit(".", 1)[1]): v for k, v in flat.items() if re.fullmatch(r"ema\.shadow_params\.\d+", k)}
        if shadow and sorted(shadow) != list(range(len(shadow))):
            raise CheckpointError(f"{p}: the ema.shadow_params.<i> keys are not numbered 0..{len(shadow) - 1}")
        state = {k: v for k, v in flat.items() if not k.startswith("ema.")}
        return _backbone(state, p), [shadow[i] for i in range(len(shadow))] if shadow else None
    ck = _torch_load(p)
    if not isinstance(ck, dict) or not isinstance(ck.get("state_dict"), dict):
        raise CheckpointError(f"{p} is not a Lightning checkpoint (no state_dict)")
    ema = ck.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if shadow is not None and not (isinstance(shadow, list) and all(isinstance(t, torch.Tensor) for t in shadow)):
        raise CheckpointError(f"{p}: its ema.shadow_params is not a list of tensors")
    return _backbone(ck["state_dict"], p), shadow


def _torch_load(p: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if not found:  # not a pickle at all, or a damaged one
            why = next(
                (ln.strip() for ln in str(e).splitlines() if ln.startswith("Unsupported")), str(e).splitlines()[0]
            )
            raise CheckpointError(f"cannot read {p} as a torch checkpoint: {why[:200]}") from None
        what = f"a {found.group(1)}"
        raise CheckpointError(
            f"refusing to unpickle {p}: it holds {what} (a checkpoint must not run code); export its state dict "
            "and EMA to .safetensors where you trust the file (docs/flm-official.md) and import that"
        ) from None
    except Exception as e:  # not a torch.save file at all, truncated, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read {p} as a torch checkpoint: {first[:200]}") from None


def _backbone(state: dict, p: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights under their own names (``backbone.`` and torch.compile's ``_orig_mod.`` removed)."""
    clean = {k.replace("._orig_mod.", ".").replace("_orig_mod.", ""): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in clean):
        clean = {k[len("backbone.") :]: v for k, v in clean.items() if k.startswith("backbone.")}
    if not all(isinstance(v, torch.Tensor) for v in clean.values()):
        raise CheckpointError(f"{p}: its state dict holds something other than tensors")
    return clean


def dims(state: dict[str, torch.Tensor], n_heads: int | None = None) -> dict[str, int]:
    """The sizes of their DiT from the shapes of its weights (the heads from the rotary table)."""
    for key in ("vocab_embed.embedding", "sigma_map.mlp.0.weight", "blocks.0.mlp.0.weight"):
        if key not in state:
            if key == "sigma_map.mlp.0.weight" and "blocks.0.attn_qkv.weight" in state:
                raise CheckpointError("a causal (AR) checkpoint of their DiT: only stage-1 FLM checkpoints import")
            raise CheckpointError(f"not the authors' DiT: no {key} in the state dict")
    if any(k.startswith("sigma_map_prime.") for k in state):
        raise CheckpointError(
            "a flow-map checkpoint (sigma_map_prime: their double_temb distillation, a second-order correction, "
            "not a two-time denoiser): only stage-1 FLM checkpoints import"
        )
    V, D = state["vocab_embed.embedding"].shape
    C, freq = state["sigma_map.mlp.0.weight"].shape
    if freq != FREQ_DIM:
        raise CheckpointError(f"their time embedding has {freq} frequencies, expected {FREQ_DIM}")
    n_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    if "rotary_emb.inv_freq" in state:
        inv = state["rotary_emb.inv_freq"].double()
        hd = 2 * inv.numel()
        want = 1.0 / (10_000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        if not torch.allclose(inv, want, rtol=1e-5):
            raise CheckpointError("their rotary table is not base 10000; fmlm's DiT cannot reproduce it")
        if n_heads is not None and n_heads * hd != D:
            raise FmlmError(f"--n-heads {n_heads} does not fit the rotary table (head size {hd}, width {D})")
        n_heads = D // hd
    elif n_heads is None:
        raise FmlmError(
            "the checkpoint has no rotary table (rotary_emb.inv_freq) to read the heads from: give --n-heads"
        )
    if D % n_heads or (D // n_heads) % 2:
        raise FmlmError(f"--n-heads {n_heads} does not divide the width {D} into heads of even size")
    return {"vocab": V, "d_model": D, "cond_dim": C, "n_blocks": n_blocks, "n_heads": n_heads}


def param_order(state: dict[str, torch.Tensor], n_blocks: int) -> list[str]:
    """Their DIT's parameters in registration order (the order of the EMA's shadow parameters)."""
    order = ["vocab_embed.embedding", *(f"sigma_map.{k}" for k in _MLP)]
    if any(k.startswith("learnable_loss_weighting.") for k in state):
        order += list(_LLW)
    order += [f"blocks.{i}.{k}" for i in range(n_blocks) for k in _BLOCK]
    return order + [f"output_layer.{k}" for k in _FINAL]


def convert(state: dict[str, torch.Tensor], n_heads: int) -> dict[str, torch.Tensor]:
    """Their backbone's weights as fmlm DiT weights (the ``net.`` of an FLM)."""
    D = state["vocab_embed.embedding"].shape[1]
    hd = D // n_heads
    # fmlm dim 2i <- their dim i, 2i+1 <- their i + hd/2 (within each head, q and k rows only).
    half = torch.arange(hd // 2)
    within = torch.stack([half, half + hd // 2], -1).flatten()
    rows = torch.cat([part * D + h * hd + within for part in range(2) for h in range(n_heads)])
    rows = torch.cat([rows, torch.arange(2 * D, 3 * D)])
    out = {"embed": state["vocab_embed.embedding"]}
    for k in _MLP:
        out[f"time1.{k}"] = state[f"sigma_map.{k}"]
    n_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(n_blocks):
        b = f"blocks.{i}."
        out[b + "qkv.weight"] = state[b + "attn_qkv.weight"][rows]
        out[b + "proj.weight"] = state[b + "attn_out.weight"]
        for n in ("norm1", "norm2"):
            out[b + f"{n}.weight"] = state[b + f"{n}.weight"]
            out[b + f"{n}.bias"] = torch.zeros_like(state[b + f"{n}.weight"])
        for k in _MLP:
            out[b + k] = state[b + k]
        out[b + "ada.weight"], out[b + "ada.bias"] = (
            state[b + "adaLN_modulation.weight"],
            state[b + "adaLN_modulation.bias"],
        )
    f = "output_layer."
    out["norm_out.weight"] = state[f + "norm_final.weight"]
    out["norm_out.bias"] = torch.zeros_like(state[f + "norm_final.weight"])
    out["ada_out.weight"], out["ada_out.bias"] = (
        state[f + "adaLN_modulation.weight"],
        state[f + "adaLN_modulation.bias"],
    )
    out["out.weight"], out["out.bias"] = state[f + "linear.weight"], state[f + "linear.bias"]
    return {f"net.{k}": v.float().contiguous() for k, v in out.items()}


def select_weights(
    state: dict[str, torch.Tensor], shadow: list[torch.Tensor] | None, weights: str, n_blocks: int
) -> dict[str, torch.Tensor]:
    """The raw weights, or the EMA's shadow parameters put under their names; strict about keys and shapes."""
    order = param_order(state, n_blocks)
    known = set(order) | {"rotary_emb.inv_freq"}
    extra = sorted(set(state) - known)
    missing = sorted(set(order) - set(state))
    if extra or missing:
        parts = ([f"unexpected {len(extra)} keys (e.g. {extra[0]})"] if extra else []) + (
            [f"missing {len(missing)} keys (e.g. {missing[0]})"] if missing else []
        )
        raise CheckpointError("not the authors' stage-1 FLM DiT: " + "; ".join(parts))
    if weights == "raw":
        return dict(state)
    if shadow is None:
        raise CheckpointError("the checkpoint has no EMA weights (ema.shadow_params): import with --weights raw")
    if len(shadow) != len(order):
        raise CheckpointError(f"the EMA has {len(shadow)} parameters, the DiT {len(order)}: not this model's EMA")
    out = dict(state)
    for k, v in zip(order, shadow):
        if v.shape != state[k].shape:
            raise CheckpointError(f"the EMA's {k} has shape {tuple(v.shape)}, the weight {tuple(state[k].shape)}")
        out[k] = v
    return out


def fit_tokenizer(tok, vocab: int):
    """Their tokenizer: GPT-2 plus the [PAD] their ``get_tokenizer`` adds (50258 ids) when the checkpoint
    has one id more than the tokenizer; otherwise the vocabulary sizes must agree."""
    if tok.vocab_size == vocab:
        return tok
    from fmlm.data.tokenizers.pretrained import HFTokenizer, TiktokenTokenizer

    if vocab == tok.vocab_size + 1 and isinstance(tok, TiktokenTokenizer):
        # tiktoken's GPT-2 cannot carry an added token through save/load; the Hub's tokenizer.json can.
        from fmlm.data.tokenizers.build import _from_hub, _wrap_gpt2

        try:
            tok = _wrap_gpt2(_from_hub("gpt2"), "the hub's 'gpt2'")
        except Exception:
            raise DataError(
                f"the checkpoint has {vocab} ids (GPT-2 + [PAD]); give GPT-2's tokenizer files, "
                "--tokenizer gpt2:DIR (tokenizer.json, or encoder.json + vocab.bpe), or let the Hub be reached"
            ) from None
    if vocab == tok.vocab_size + 1 and isinstance(tok, HFTokenizer):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(tok.backend.to_str())
        backend.add_special_tokens([AddedToken("[PAD]", special=True)])
        fitted = HFTokenizer(
            backend,
            tok.spec,
            eos_id=tok.eos_id,
            pad_id=tok.vocab_size,
            eos_text=tok.eos_text,
            space_joined=tok._space_joined,
        )
        if fitted.vocab_size == vocab:
            return fitted
    raise DataError(f"the checkpoint's vocabulary has {vocab} ids, the tokenizer {tok.spec!r} {tok.vocab_size}")


def load_any_tokenizer(spec: str):
    """A saved fmlm tokenizer folder, a tokenizer.json, or a spec (gpt2, bert-base-uncased[:DIR])."""
    from fmlm.data import load_tokenizer
    from fmlm.data.tokenizers.build import build_tokenizer
    from fmlm.data.tokenizers.pretrained import HFTokenizer

    p = Path(spec)
    if p.is_dir() and (p / "meta.json").is_file():
        return load_tokenizer(p)
    if p.is_file() and p.suffix == ".json":
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(p))
        except Exception as e:
            raise DataError(f"cannot read the tokenizer {p}: {str(e).splitlines()[0]}") from None
        eos = next(
            (i for i in map(backend.token_to_id, ("<|endoftext|>", "[SEP]", "</s>", "<eos>")) if i is not None), None
        )
        if eos is None:
            raise DataError(f"the tokenizer {p} has no end-of-text token (<|endoftext|>, [SEP], </s>, <eos>)")
        return HFTokenizer(backend, str(p), eos_id=eos, pad_id=eos, eos_text=backend.id_to_token(eos))
    return build_tokenizer(spec)


def import_flm_official(
    ckpt: str | Path,
    out: str | Path,
    tokenizer: str,
    seq_len: int,
    n_heads: int | None = None,
    dataset: str = "openwebtext",
    weights: str = "ema",
    log=None,
) -> Path:
    """Convert their checkpoint ``ckpt`` into the fmlm model directory ``out`` (see the module doc)."""
    from fmlm.checkpoint import load_into
    from fmlm.config import RunConfig
    from fmlm.config.checks import validate
    from fmlm.hub.files import save_pretrained
    from fmlm.methods import build_method

    log = log or (lambda msg: None)
    if seq_len < 1:
        raise FmlmError(f"--seq-len must be >= 1, got {seq_len}")
    if weights not in ("ema", "raw"):
        raise FmlmError(f"weights must be ema or raw, got {weights!r}")
    state, shadow = read_checkpoint(ckpt)
    size = dims(state, n_heads)
    chosen = select_weights(state, shadow, weights, size["n_blocks"])
    if any(k.startswith("learnable_loss_weighting.") for k in chosen):
        log("dropping learnable_loss_weighting (a training-only loss weight; the denoiser does not use it)")
    tok = fit_tokenizer(load_any_tokenizer(tokenizer), size["vocab"])
    hidden = chosen["blocks.0.mlp.0.weight"].shape[0]
    cfg = RunConfig()
    m = cfg.model
    m.size, m.n_layers, m.d_model, m.n_heads = "flm-official", size["n_blocks"], size["d_model"], size["n_heads"]
    m.cond_dim, m.mlp_ratio, m.dropout, m.logit_cap = size["cond_dim"], hidden / size["d_model"], 0.1, 0.0
    m.time_scale, m.zero_out, m.norm_affine, m.norm_eps, m.attn_softcap = 1.0, True, True, NORM_EPS, SOFTCAP
    m.vocab_size, m.max_seq_len = size["vocab"], seq_len
    cfg.data.dataset, cfg.data.tokenizer, cfg.data.seq_len, cfg.data.packing = dataset, tok.spec, seq_len, "wrap"
    cfg.train.method, cfg.train.time, cfg.sample.steps = "flm", "decoding_error", 1024
    cfg.preset = "flm-official"
    validate(cfg)
    if int(m.mlp_ratio * m.d_model) != hidden:
        raise CheckpointError(f"their MLP width {hidden} is not a multiple fmlm's DiT can build from {m.d_model}")
    method = build_method(cfg)
    load_into(method, convert(chosen, size["n_heads"]), f"{ckpt} (converted)")
    log(
        f"{size['n_blocks']} blocks, width {size['d_model']}, {size['n_heads']} heads, vocabulary {size['vocab']}, "
        f"{sum(p.numel() for p in method.parameters()) / 1e6:.1f}M parameters, {weights} weights"
    )
    source = {"checkpoint": Path(ckpt).name, "converted from": "david3684/flm (fmlm import flm-official)"}
    return save_pretrained(out, cfg.to_dict(), method.state_dict(), tok, weights=weights, source=source)


__all__ = ["convert", "dims", "import_flm_official", "read_checkpoint"]
