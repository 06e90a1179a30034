"""``simplex3``: a synthetic task with V = 3 tokens and one position, for pictures on the 2-simplex.

Each sequence is a single token drawn from ``probs`` (default 0.6, 0.3, 0.1). With one position
and three tokens the whole state of a flow-based LM is a point of R^3, and its denoiser has a
closed form: for ``I_t = (1 − t)·x0 + t·e_k`` with ``x0 ~ N(0, I)``,

    D_t(x)_k = softmax_k( log p_k + t·x_k / (1 − t)^2 ),

so a trained model can be checked against the exact answer. The task has no tokenizer of its own
(every fmlm tokenizer adds ``<eos>``/``<pad>``, which would make V = 5): it is used directly by
:mod:`fmlm.plot`, which trains a tiny FLM and a flow map on it in seconds.

Projection used for the pictures: the orthogonal projection onto the plane x1 + x2 + x3 = 1 that
holds the simplex, in the orthonormal coordinates ``u = (x2 − x1)/√2``, ``v = (2·x3 − x1 − x2)/√6``.
The exact denoiser depends on x only through (u, v) (adding c·(1, 1, 1) shifts every logit by the
same amount), so nothing is lost for it; the learned network is evaluated on the plane itself.
"""

from __future__ import annotations

import math

import torch

from fmlm.errors import DataError

__all__ = ["Simplex3", "to_plane", "from_plane"]

_A = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(2.0)
_B = torch.tensor([-1.0, -1.0, 2.0], dtype=torch.float64) / math.sqrt(6.0)


def to_plane(x: torch.Tensor) -> torch.Tensor:
    """(…, 3) states -> (…, 2) coordinates (u, v) of their projection onto the simplex's plane."""
    x = x.double()
    return torch.stack([x @ _A, x @ _B], -1)


def from_plane(uv: torch.Tensor) -> torch.Tensor:
    """(…, 2) plane coordinates -> (…, 3) points with x1 + x2 + x3 = 1."""
    uv = uv.double()
    return 1.0 / 3.0 + uv[..., :1] * _A + uv[..., 1:] * _B


class Simplex3:
    """One token out of three, with probabilities ``probs``."""

    vocab_size = 3
    seq_len = 1
    names = ("a", "b", "c")

    def __init__(self, probs=(0.6, 0.3, 0.1)):
        p = torch.as_tensor(probs, dtype=torch.float64)
        if p.shape != (3,) or bool((p <= 0).any()) or abs(float(p.sum()) - 1.0) > 1e-9:
            raise DataError(f"simplex3 needs three positive probabilities summing to 1, got {probs}")
        self.probs = p

    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids (num, 1)."""
        return torch.multinomial(self.probs.float(), num, replacement=True, generator=generator)[:, None]

    def exact_denoiser(self, x: torch.Tensor, t) -> torch.Tensor:
        """E[x1 | I_t = x] for states x (…, 3) at interpolant time t < 1 (a float, or a tensor of x's shape
        without its last dimension)."""
        x = x.double()
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.dim():
            t = t[..., None]
        return (self.probs.log() + t * x / (1.0 - t) ** 2).softmax(-1)
