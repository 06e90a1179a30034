"""Sampling helpers shared by the discrete methods (AR, MDLM, Duo)."""

from __future__ import annotations

import torch
from torch import nn

from fmlm.guidance import known_tensors


def gumbel_argmax(
    logits: torch.Tensor, generator: torch.Generator | None = None, float64: bool = False
) -> torch.Tensor:
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


def sampler_setup(
    method: nn.Module, num_samples: int, seq_len: int, steps: int, float64: bool, known, mask, vocab_size: int
) -> tuple[torch.device, torch.dtype, torch.Tensor | None, torch.Tensor | None]:
    """What every discrete sampler starts with: ``steps`` checked (≥ 1), the method's device, the dtype
    of its draws (float64 or float32), and the known tokens as (B, L) ids and mask
    (:func:`fmlm.guidance.known_tensors`; ``None, None`` without them).

    Returns:
        (device, dtype, known, mask).
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    device = next(method.parameters()).device
    dtype = torch.float64 if float64 else torch.float32
    known, mask = known_tensors(known, mask, num_samples, seq_len, vocab_size, device)
    return device, dtype, known, mask
