"""The flow map's divergences: KL with the logit cap fused in (by chunks of rows), sparsemax, an in-place softmax."""

from __future__ import annotations

import torch


def sparsemax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean projection of ``z`` onto the probability simplex along ``dim`` (Martins & Astudillo 2016).

    sparsemax(z) = argmin_{p ∈ Δ} ‖p − z‖², i.e. max(z − θ, 0) with θ chosen so the result sums to 1.
    For a point already on the simplex it is the identity.
    """
    z = z.transpose(dim, -1)
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cssv = zs.cumsum(-1) - 1.0
    support = (zs - cssv / k) > 0  # (…, V): true for the first k(z) entries
    k_z = support.sum(-1, keepdim=True).clamp_min(1)
    theta = cssv.gather(-1, k_z - 1) / k_z.to(z.dtype)
    return (z - theta).clamp_min(0).transpose(dim, -1)


def kl_rows(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dim, with 0·log 0 = 0. p: probs, log_q: log-probs. -> (…)."""
    return (torch.xlogy(p, p) - p * log_q).sum(-1)


def softmax_(z: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim, in place (no (…, V) temporaries): for targets computed without a graph."""
    z.sub_(z.amax(-1, keepdim=True)).exp_()
    return z.div_(z.sum(-1, keepdim=True))


def _row_chunks(n: int, v: int):
    rows = max(1, (1 << 21) // max(v, 1))  # about 8 MB of float32 per temporary
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


class _CappedKL(torch.autograd.Function):
    """Rows of KL(p ‖ softmax(cap·tanh(z / cap))) and their gradient in z, by chunks of rows.

    Equal to ``kl_rows(p, (cap·tanh(z/cap)).log_softmax(-1))`` (cap 0: no cap), but without a
    (N, V) temporary besides the gradient itself: KL = Σ p log p − Σ p·y + (Σ p)·logsumexp(y),
    ∂KL/∂y = (Σ p)·softmax(y) − p, ∂y/∂z = 1 − tanh²(z / cap).
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor, z: torch.Tensor, cap: float) -> torch.Tensor:
        N, V = z.shape
        out = torch.empty(N, device=z.device, dtype=torch.float32)
        lse, psum = torch.empty_like(out), torch.empty_like(out)
        for c in _row_chunks(N, V):
            y = z[c].float()
            if cap > 0:
                y = (y / cap).tanh_().mul_(cap)
            pc = p[c].float()
            lse[c] = torch.logsumexp(y, -1)
            psum[c] = pc.sum(-1)
            out[c] = torch.xlogy(pc, pc).sum(-1) - (pc * y).sum(-1) + psum[c] * lse[c]
        ctx.save_for_backward(p, z, lse, psum)
        ctx.cap = cap
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p, z, lse, psum = ctx.saved_tensors
        cap = ctx.cap
        N, V = z.shape
        grad = torch.empty(z.shape, device=z.device, dtype=z.dtype)
        g = g.float()
        for c in _row_chunks(N, V):
            y = z[c].float()
            th = None
            if cap > 0:
                th = (y / cap).tanh_()
                y = th * cap
            d = y.sub_(lse[c, None]).exp_().mul_((psum[c] * g[c])[:, None]).addcmul_(p[c].float(), g[c, None], value=-1)
            if th is not None:
                d.mul_(th.square_().neg_().add_(1))
            grad[c] = d
        return None, grad, None


def kl_capped(p: torch.Tensor, z: torch.Tensor, cap: float) -> torch.Tensor:
    """KL(p ‖ softmax(cap·tanh(z / cap))) over the last dim for raw logits z (…, V); cap 0: no cap."""
    shape = z.shape[:-1]
    return _CappedKL.apply(p.reshape(-1, p.shape[-1]), z.reshape(-1, z.shape[-1]), float(cap)).view(shape)
