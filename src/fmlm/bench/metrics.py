"""Sample-quality metrics: unigram entropy, generative perplexity and bits per byte, validation likelihood."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import torch

from fmlm.errors import FmlmError
from fmlm.length import split_at_eos


def unigram_entropy(ids: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-sample unigram entropy in nats of token ids (N, L): −Σ_v p_v log p_v, p the id frequencies."""
    x = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if x.ndim == 1:
        x = x[None]
    out = np.empty(len(x))
    for i, row in enumerate(x):
        _, counts = np.unique(row, return_counts=True)
        p = counts / counts.sum()
        out[i] = float(-(p * np.log(p)).sum()) if len(row) else 0.0
    return out


def mean_entropy(ids) -> float:
    """Mean per-sample unigram entropy (nats), the papers' diversity measure."""
    return float(unigram_entropy(ids).mean())


def reference_entropy(blocks, limit: int = 4096) -> float:
    """Mean per-sample unigram entropy of (up to ``limit``) validation blocks."""
    n = min(len(blocks), limit)
    if n == 0:
        return float("nan")
    return mean_entropy(blocks.batch(list(range(n))))


def decode_samples(ids: torch.Tensor, tokenizer) -> tuple[list[str], list[bool]]:
    """Each sample (N, L) decoded up to its first EOS, and whether it had one."""
    rows, ended = split_at_eos(ids, tokenizer.eos_id)
    return [tokenizer.decode(r) for r in rows], ended


def utf8_bytes(texts) -> int:
    """The number of UTF-8 bytes of ``texts`` together."""
    return sum(len(t.encode("utf-8")) for t in texts)


def bits_per_byte(nll_nats: float, n_bytes: int) -> float | None:
    """A total NLL in nats as bits per UTF-8 byte (``None`` when there are no bytes)."""
    return nll_nats / math.log(2) / n_bytes if n_bytes > 0 else None


def score_texts(texts, ended, scorer) -> dict:
    """Gen-PPL and per-byte score of decoded texts under ``scorer`` (METHOD.md §5).

    ``gen_ppl`` is exp of the token-weighted mean NLL over the scorer's tokens, counted up
    to and including the first EOS (the scorer's EOS is appended to a text that ended with
    one). It depends on how the scorer splits the text: character soup splits into many
    cheap tokens and can beat word-shaped text. ``gen_bpb`` divides the same total NLL, in
    bits, by the number of UTF-8 bytes of exactly the decoded text, which does not depend on
    the scorer's tokenisation (lower is better for both).
    """
    res = scorer.score(texts, ended)
    n_bytes = utf8_bytes(texts)
    return {
        "gen_ppl": res.ppl,
        "gen_nll": res.mean_nll,
        "scored_tokens": res.tokens,
        "gen_bpb": bits_per_byte(res.nll, n_bytes),
        "bytes": n_bytes,
        "ended_with_eos": float(np.mean(ended)) if len(ended) else 0.0,
    }


def generative_perplexity(ids: torch.Tensor, tokenizer, scorer) -> dict:
    """Gen-PPL and ``gen_bpb`` of samples (N, L) under ``scorer`` (see :func:`score_texts`).

    Decode each sample up to its first EOS, re-tokenise with the scorer's tokenizer,
    score with the scorer's EOS appended when the sample had one.
    """
    texts, ended = decode_samples(ids, tokenizer)
    return score_texts(texts, ended, scorer)


def shuffle_characters(text: str, seed: int) -> str:
    """The characters of ``text`` in a random order (a fixed permutation per seed)."""
    chars = list(text)
    np.random.default_rng(seed).shuffle(chars)
    return "".join(chars)


def reference_texts(blocks, tokenizer, num: int, seed: int = 0) -> dict[str, tuple[list[str], list[bool]]]:
    """Held-out text of the samples' length and the same text with its characters shuffled.

    The first ``num`` validation blocks (each of the model's length L), decoded up to their
    first EOS like the samples; ``shuffled`` permutes the characters inside each text (the
    same unigram statistics, no words). Returns ``{"data": (texts, ended), "shuffled": ...}``.
    """
    n = min(len(blocks), num)
    if n == 0:
        return {}
    texts, ended = decode_samples(blocks.batch(list(range(n))), tokenizer)
    shuffled = [shuffle_characters(t, seed + i) for i, t in enumerate(texts)]
    return {"data": (texts, ended), "shuffled": (shuffled, list(ended))}


def score_references(refs: dict, scorer) -> dict:
    """``{"data": {...}, "shuffled": {...}}``: :func:`score_texts` of each reference set.

    A set the scorer cannot encode (shuffled characters make words that a closed
    word-level vocabulary lacks) is recorded as ``{"skipped": reason}``.
    """
    out = {}
    for name, (texts, ended) in refs.items():
        try:
            out[name] = {**score_texts(texts, ended, scorer), "num_samples": len(texts)}
        except (FmlmError, KeyError, ValueError) as e:
            out[name] = {"skipped": f"the scorer cannot encode it ({str(e).splitlines()[0] if str(e) else e!r})"}
    return out


@torch.no_grad()
def validation_metrics(
    method: torch.nn.Module, blocks, batch_size: int = 64, batches: int = 8, seed: int = 12345
) -> dict:
    """The method's own validation metrics (FLM/FMLM denoising CE, AR NLL, MDLM/Duo NELBO).

    Averaged over ``batches`` fixed batches with a fixed noise generator, as in training.
    """
    device = next(method.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    n = len(blocks)
    if n == 0:
        return {}
    was_training = method.training
    method.eval()
    sums: dict[str, float] = {}
    for b in range(batches):
        idx = [(b * batch_size + i) % n for i in range(min(batch_size, n))]
        for k, v in method.eval_loss(blocks.batch(idx).to(device), gen).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    method.train(was_training)
    out = {f"val_{k}": v / batches for k, v in sums.items()}
    for k in ("val_nll", "val_nelbo"):
        if k in out:
            out["val_ppl"] = math.exp(min(out[k], 700.0))
    return out


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the source checkout (with ``-dirty`` when it has changes), or None."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
