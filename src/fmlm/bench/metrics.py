"""Sample-quality metrics: unigram entropy, generative perplexity, validation likelihood."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import torch


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


def split_at_eos(ids: torch.Tensor, eos_id: int) -> tuple[list[list[int]], list[bool]]:
    """Each row cut before its first EOS, and whether it had one (that EOS is then scored)."""
    rows, ended = [], []
    for row in ids.tolist():
        if eos_id in row:
            rows.append(row[:row.index(eos_id)])
            ended.append(True)
        else:
            rows.append(row)
            ended.append(False)
    return rows, ended


def generative_perplexity(ids: torch.Tensor, tokenizer, scorer) -> dict:
    """Gen-PPL of samples (N, L) under ``scorer`` (METHOD.md §5).

    Decode each sample up to its first EOS, re-tokenise with the scorer's tokenizer,
    score with the scorer's EOS appended when the sample had one, and take the
    token-weighted mean NLL over all samples.
    """
    rows, ended = split_at_eos(ids, tokenizer.eos_id)
    texts = [tokenizer.decode(r) for r in rows]
    res = scorer.score(texts, ended)
    return {"gen_ppl": res.ppl, "gen_nll": res.mean_nll, "scored_tokens": res.tokens,
            "ended_with_eos": float(np.mean(ended)) if ended else 0.0}


@torch.no_grad()
def validation_metrics(method: torch.nn.Module, blocks, batch_size: int = 64, batches: int = 8,
                       seed: int = 12345) -> dict:
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
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
