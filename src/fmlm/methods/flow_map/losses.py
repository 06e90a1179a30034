"""The flow map's loss: the distillation loss of a batch (:func:`distillation_loss`), the noisy states it is
computed on, and its divergences (KL with the logit cap fused in, by chunks of rows; sparsemax; an in-place
softmax). ``fm`` is the :class:`~fmlm.methods.flow_map.model.FMLM`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmlm.conditioning import clean_state
from fmlm.methods.flm import Strata, stratified_uniform
from fmlm.paths import EmbeddedState, embedded_noise, interpolant


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


def kl_to(fm, p: torch.Tensor, x, tau_s: torch.Tensor, tau_t: torch.Tensor, given=None) -> torch.Tensor:
    """Σ KL(p ‖ δ̂_{s,t}(x)) over rows and positions, fused with the logit cap (:func:`kl_capped`).

    ``given`` (B, L): the network sees the flag, and the given positions are left out of the sum."""
    if not fm.fused:
        kl = kl_rows(p, fm.logits(x, tau_s, tau_t, given=given).log_softmax(-1))
    else:
        cap = getattr(fm.net, "logit_cap", None)  # None: a backbone without the DiT's soft cap
        if cap is None:
            kl = kl_capped(p, fm.logits(x, tau_s, tau_t, given=given), 0.0)
        else:
            kl = kl_capped(p, fm.logits(x, tau_s, tau_t, cap=False, given=given), cap)
    return kl.sum() if given is None else (kl * (~given)).sum()


def noisy_states(fm, ids: torch.Tensor, generator):
    """Draw the noise of a batch; return ``states(rows, t)`` -> I_t of those rows (V-space or embedded)."""
    B, L = ids.shape
    V = fm.vocab_size
    teacher_net = fm.teacher.net if fm.teacher is not None else None
    embedded = fm.noise == "embedded" and (fm.teacher is None or fm.teacher.loss_type != "mse_velocity")
    if not embedded:
        noise = torch.randn(B, L, V, generator=generator, device=ids.device)

        def vocab_state(rows, t):
            return interpolant(ids[rows], t, noise[rows])

        return vocab_state
    # Every network that reads I_s sees the same x0: draw x0 @ E jointly for all of them
    # (stop-gradient networks first; the student's embedding carries the gradient).
    embeds = [n.embed for n in (teacher_net, fm._target) if n is not None] + [fm.net.embed]
    ys = embedded_noise(embeds, (B, L), generator)
    by_id = dict(zip(map(id, embeds), ys))

    def embedded_state(rows, t):
        return EmbeddedState.interpolant({k: v[rows] for k, v in by_id.items()}, ids[rows], t)

    return embedded_state


def distillation_loss(
    fm, ids: torch.Tensor, generator: torch.Generator | None = None, strata: Strata | None = None
) -> tuple[torch.Tensor, dict]:
    """Diagonal + off-diagonal distillation loss on token ids (B, L); ``strata``: see :class:`Strata`.

    With training-time conditioning (``fm.cond``, :mod:`fmlm.conditioning`) each row's given
    positions are clean in every state, flagged to every network, and carry no loss; the loss is
    then the mean over the free positions."""
    B, L = ids.shape
    n_diag = min(B - 1, max(1, round(B * fm.diag_fraction))) if fm.diag_fraction > 0 else 0
    n_off = B - n_diag
    states = noisy_states(fm, ids, generator)
    given = None if fm.cond is None else fm.cond.draw(B, L, generator, ids.device)
    if given is not None:
        noisy = states

        def states(rows, t):
            return clean_state(noisy(rows, t), ids[rows], given[rows])

    def part(rows):  # (the given flags, the known (ids, given)) of some rows; None without conditioning
        return (None, None) if given is None else (given[rows], (ids[rows], given[rows]))

    def tokens(rows, n):  # the positions that carry loss
        return n * L if given is None else (~given[rows]).sum().clamp_min(1)

    total = ids.new_zeros((), dtype=torch.float32)
    metrics: dict[str, torch.Tensor] = {}

    if n_diag:
        tau = stratified_uniform(n_diag, generator, ids.device, strata)
        rows = slice(0, n_diag)
        x = states(rows, fm._t(tau))
        g, _ = part(rows)
        if fm.teacher is None:
            log_q = fm.logits(x, tau, tau, given=g).log_softmax(-1)
            target = ids[rows] if g is None else ids[rows].masked_fill(g, -100)  # -100: ignored by nll_loss
            diag = F.nll_loss(log_q.flatten(0, 1), target.flatten(), reduction="sum")
        else:
            with torch.no_grad():
                p = fm.teacher.denoise(x, tau, given=g)
            diag = kl_to(fm, p, x, tau, tau, given=g)
        total = total + diag
        metrics["loss_diag"] = diag.detach() / tokens(rows, n_diag)

    if n_off:
        tau_s, tau_u, tau_t = fm.sample_times(n_off, generator, ids.device, strata)
        rows = slice(n_diag, B)
        x = states(rows, fm._t(tau_s))  # I_s
        g, known = part(rows)
        if fm.objective == "semigroup":
            target = fm.semigroup_target(x, tau_s, tau_u, tau_t, known=known)
        elif fm.objective == "lagrangian":
            target = fm.lagrangian_target(x, tau_s, tau_t, known=known)
        else:
            target = fm.eulerian_target(x, tau_s, tau_t, known=known)
        mse = fm.objective == "eulerian" and fm.eulerian_loss == "mse"
        logits = fm.logits(x, tau_s, tau_t, given=g) if mse else None
        free = 1.0 if g is None else (~g)[..., None].float()  # MSE: only the free positions
        if mse and fm.eulerian_form == "relaxed":
            off = (free * (logits.softmax(-1) - target).pow(2)).sum()
        elif mse:
            # The target's JVP coefficient c = (1−s)(t−s)/(1−t) diverges as t → 1; weighting each
            # pair by 1/(1 + c²) keeps the regression bounded (weight 1 near the diagonal).
            ts_, tt_ = fm._t(tau_s), fm._t(tau_t)
            c = (1 - ts_) * (tt_ - ts_) / (1 - tt_).clamp_min(1e-3)
            w = (1.0 / (1.0 + c**2))[:, None, None]
            off = (free * w * (logits.softmax(-1) - target).pow(2)).sum()
        else:
            off = kl_to(fm, target, x, tau_s, tau_t, given=g)
        total = total + off
        metrics["loss_off"] = off.detach() / tokens(rows, n_off)

    loss = total / tokens(slice(0, B), B)
    metrics["loss"] = loss.detach()
    return loss, metrics
