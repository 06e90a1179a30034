"""Autoregressive (AR) baseline: a causal transformer trained by next-token prediction.

Maths. A sequence x = (x_1, …, x_L) has likelihood p_θ(x) = Π_l p_θ(x_l | x_<l),
each factor a softmax over V of the causal transformer's output at position l,
whose input is (BOS, x_1, …, x_{l−1}). Training minimises the per-token negative
log-likelihood −(1/L)·Σ_l log p_θ(x_l | x_<l) (teacher forcing: one parallel
pass). Validation reports this NLL and the perplexity exp(NLL), an exact
likelihood, unlike the diffusion baselines' bounds.

Sampling is ancestral, one token per network pass, so it always takes L
sequential passes whatever ``steps`` says; with the KV cache each pass costs one
position. Options (constructor defaults, overridable per call): temperature T
(logits / T; T = 0 is greedy argmax), top-k (keep the k most likely tokens) and
top-p (nucleus: the smallest set of most likely tokens of total mass ≥ p). The
defaults, T = 1, no top-k, p = 1, are plain ancestral sampling from the model.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fmlm.guidance import known_tensors
from fmlm.methods.flm import Strata
from fmlm.methods.sampling import gumbel_argmax
from fmlm.nn.causal import CausalTransformer


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits outside the top-k and outside the top-p nucleus to −inf.

    Args:
        logits: (..., V) unnormalised log-probabilities (already divided by the temperature).
        top_k: keep the k largest logits (0 keeps all).
        top_p: keep the smallest prefix of the descending-probability order whose mass
            reaches p (1 keeps all). The most likely token is always kept.

    Returns:
        The filtered logits, same shape.
    """
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Mass strictly before each token: a token is kept while that mass is < p, so the
        # first token is always kept and the kept set is the smallest one reaching p.
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


class AR(nn.Module):
    """Wraps a :class:`CausalTransformer` as an autoregressive language model.

    Args:
        net: causal transformer over ids in [0, V] (V = BOS) with V output logits.
        temperature: default sampling temperature (0 = greedy).
        top_k: default top-k filter (0 = off).
        top_p: default nucleus mass (1 = off).
    """

    def __init__(self, net: CausalTransformer, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        super().__init__()
        _check_sampling(temperature, top_k, top_p)
        self.net = net
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p

    @property
    def vocab_size(self) -> int:
        return self.net.vocab_size

    def _inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """(BOS, x_1, …, x_{L−1}): the teacher-forcing input for targets ids (B, L)."""
        bos = torch.full_like(ids[:, :1], self.net.bos_id)
        return torch.cat([bos, ids[:, :-1]], dim=1)  # (B, L)

    def nll(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood −(1/L)·Σ_l log p(x_l | x_<l), averaged over the batch."""
        logits = self.net(self._inputs(ids)).float()  # (B, L, V)
        return F.cross_entropy(logits.flatten(0, 1), ids.flatten())

    def loss(
        self, ids: torch.Tensor, generator: torch.Generator | None = None, strata: Strata | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Next-token cross-entropy on ids (B, L); ``generator`` and ``strata`` are unused (a deterministic loss)."""
        loss = self.nll(ids)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def eval_loss(self, ids: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """Validation NLL per token and perplexity exp(NLL)."""
        nll = self.nll(ids).item()
        return {"nll": nll, "ppl": math.exp(min(nll, 700.0))}

    def _draw(
        self, logits: torch.Tensor, generator, float64: bool, temperature: float, top_k: int, top_p: float
    ) -> torch.Tensor:
        """One token per row from logits (B, V) -> ids (B,)."""
        logits = logits.double() if float64 else logits.float()
        if temperature == 0:
            return logits.argmax(-1)
        logits = filter_logits(logits / temperature, top_k, top_p)
        return gumbel_argmax(logits, generator, float64)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        seq_len: int,
        steps: int = 1,
        generator: torch.Generator | None = None,
        float64: bool = False,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        known=None,
        mask=None,
    ) -> torch.Tensor:
        """Draw token ids (num_samples, seq_len), one position per network pass.

        Args:
            num_samples: B.
            seq_len: L (at most the model's maximum).
            steps: validated (≥ 1) for interface compatibility, otherwise ignored: AR
                always takes L passes.
            generator: source of randomness; the same seed gives the same ids, with
                or without the cache.
            float64: draw the Gumbel-max categorical samples in float64.
            callback: called as ``callback(l, ids_so_far (B, l + 1), logits (B, V))``
                after position l is drawn.
            temperature, top_k, top_p: override the constructor's defaults.
            use_cache: decode with the KV cache (one position per pass) instead of
                re-running the whole prefix each pass (the reference for tests).
            known, mask: a prefix to continue (known ids, with ``mask`` None or marking a
                leading block of positions, the same for every row): those positions are
                forced instead of drawn. An AR model cannot fill in a gap, so any other mask
                is an error.
        """
        if steps < 1:
            raise ValueError("steps must be >= 1")
        T = self.temperature if temperature is None else temperature
        k = self.top_k if top_k is None else top_k
        p = self.top_p if top_p is None else top_p
        _check_sampling(T, k, p)
        device = next(self.parameters()).device
        B = num_samples
        known, kmask = known_tensors(known, mask, B, seq_len, self.vocab_size, device)
        n_prefix = 0
        if known is not None:
            n_prefix = int(kmask[0].sum())
            if not bool(kmask[:, :n_prefix].all()) or bool(kmask[:, n_prefix:].any()):
                raise ValueError(
                    "an autoregressive model can only be conditioned on a prefix "
                    "(the same leading positions in every row)"
                )
        # Preallocated: BOS then the L drawn tokens; the cache holds every position's keys/values.
        tokens = torch.full((B, 1 + seq_len), self.net.bos_id, dtype=torch.long, device=device)
        cache = self.net.new_cache(B, device) if use_cache else None
        for l in range(seq_len):
            if cache is not None:
                logits = self.net(tokens[:, l : l + 1], cache)[:, -1]  # (B, V): only the newest position
            else:
                logits = self.net(tokens[:, : l + 1])[:, -1]  # (B, V): the whole prefix again
            nxt = self._draw(logits, generator, float64, T, k, p)  # (B,)
            tokens[:, l + 1] = known[:, l] if l < n_prefix else nxt
            if callback is not None:
                callback(l, tokens[:, 1 : l + 2], logits)
        return tokens[:, 1:]


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
