"""Sampling helpers shared by the discrete methods (AR, MDLM, Duo)."""

from __future__ import annotations

import torch


def gumbel_argmax(logits: torch.Tensor, generator: torch.Generator | None = None,
                  float64: bool = False) -> torch.Tensor:
    """Categorical sample ``argmax(logits + G)``, G i.i.d. standard Gumbel, over the last dim.

    Args:
        logits: (..., K) unnormalised log-probabilities (−∞ allowed).
        generator: source of the uniforms U; G = −log(−log U).
        float64: draw U and add the noise in float64.

    Returns:
        Indices (...,) int64, distributed as softmax(logits).
    """
    dtype = torch.float64 if float64 else torch.float32
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=dtype)
    g = -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))
    return (logits.to(dtype) + g).argmax(-1)
