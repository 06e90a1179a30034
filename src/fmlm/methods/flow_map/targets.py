"""The three flow-map distillation targets δ̄ (see :mod:`fmlm.methods.flow_map`), computed without gradient.

Each takes the :class:`~fmlm.methods.flow_map.model.FMLM` ``fm`` whose networks give δ̂ (its EMA
target network when it has one) and the denoiser D (its teacher, or its own diagonal). ``known``
is None or ``(ids, given)`` of a conditioned batch (:mod:`fmlm.conditioning`): the networks see
the given flag, and the intermediate states keep the given positions clean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fmlm.conditioning import clamp_onehot, clean_state, net_kw
from fmlm.methods.flow_map.losses import softmax_, sparsemax
from fmlm.paths import EmbeddedState, flow_map


def _given(known):
    return None if known is None else known[1]


@torch.no_grad()
def semigroup_target(fm, x: torch.Tensor, tau_s, tau_u, tau_t, known=None) -> torch.Tensor:
    """δ̄ = λ·δ̂_{s,u}(x) + (1 − λ)·δ̂_{u,t}(X_{s,u}(x)), on the simplex."""
    net, g = fm._target, _given(known)
    ts, tu, tt = fm._t(tau_s), fm._t(tau_u), fm._t(tau_t)
    # In place throughout: no graph is kept, and each (B, L, V) temporary costs a full pass.
    soft = softmax_ if fm.fused else (lambda z: z.softmax(-1))
    d_su = soft(fm.logits(x, tau_s, tau_u, net, given=g))
    if known is None:
        x_u = flow_map(x, d_su, ts, tu)
    else:
        d_su = clamp_onehot(d_su, *known)
        x_u = clean_state(flow_map(x, d_su, ts, tu), *known)
    d_ut = soft(fm.logits(x_u, tau_u, tau_t, net, given=g))
    gap = (tt - ts).clamp_min(1e-12)
    lam = (1 - tt) * (tu - ts) / ((1 - tu).clamp_min(1e-12) * gap)
    # s = t (gap 0) makes λ 0/0; the target is then δ_{s,s} either way.
    lam = torch.where(tt - ts > 1e-12, lam, torch.zeros_like(lam)).clamp(0, 1)[:, None, None]
    if not fm.fused:
        return lam * d_su + (1 - lam) * d_ut
    return d_ut.lerp_(d_su, lam.to(d_ut.dtype))  # λ·δ_su + (1 − λ)·δ_ut


def _jvp(fn: Callable, primals: tuple, tangents: tuple):
    # Fused SDPA kernels (flash, memory-efficient) have no forward-mode derivative;
    # the math kernel is composite, so forward AD goes through it.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(fn, primals, tangents)


def lagrangian_target(fm, x: torch.Tensor, tau_s, tau_t, known=None) -> torch.Tensor:
    """δ̄ = D_t(X_{s,t}(x)) − ((1−t)(t−s)/(1−s))·∂_t δ̂_{s,t}(x), projected onto the simplex."""
    net, g = (fm.net if fm._target is None else fm._target), _given(known)
    ts, tt = fm._t(tau_s), fm._t(tau_t)

    def f(tau_t_):
        return fm.logits(x, tau_s, tau_t_, net, given=g).softmax(-1)

    delta, d_dtau = _jvp(f, (tau_t,), (torch.ones_like(tau_t),))
    with torch.no_grad():
        dt = d_dtau * fm.schedule.dtau_dt(tt.double()).float()[:, None, None]  # ∂_t δ̂
        if known is None:
            x_t = flow_map(x, delta, ts, tt)
        else:
            x_t = clean_state(flow_map(x, clamp_onehot(delta, *known), ts, tt), *known)
        coef = ((1 - tt) * (tt - ts) / (1 - ts))[:, None, None]
        target = fm._denoiser(x_t, tau_t, given=g) - coef * dt
        return sparsemax(target) if fm.projection == "sparsemax" else target


def eulerian_target(fm, x: torch.Tensor, tau_s, tau_t, form: str | None = None, known=None) -> torch.Tensor:
    """Eulerian target from one JVP J = ∂_s δ̂ + ((D_s − x)/(1−s))·∇_x δ̂ (see the module docstring).

    The Eulerian equation says δ = D_s + c·J with c = (1−s)(t−s)/(1−t). ``direct`` uses that
    as the target; c diverges as t → 1, so the pair (0, 1) gets an unbounded target (here
    1 − t is capped at 1e-3). ``relaxed`` (the default) takes one damped fixed-point step
    towards it from the current δ̂, with step 1/(1 + c):

        δ̄ = δ̂ + (D_s + c·J − δ̂)/(1 + c) = ((1−t)·D_s + (1−s)(t−s)·(δ̂ + J)) / ((1−t) + (1−s)(t−s)),

    which has the same fixed point (δ̄ = δ̂ exactly when the equation holds), stays bounded
    and sums to one, and at t = 1 is δ̂ + J: it trains δ_{s,1} to be constant along the
    flow, which is what the equation says there.
    """
    form = fm.eulerian_form if form is None else form
    net, g = (fm.net if fm._target is None else fm._target), _given(known)
    ts, tt = fm._t(tau_s), fm._t(tau_t)
    with torch.no_grad():
        D_s = fm._denoiser(x, tau_s, given=g)
        if known is not None:  # clean given positions do not move along the flow: zero tangent there
            D_s = clamp_onehot(D_s, *known)
    tangent_tau = fm.schedule.dtau_dt(ts.double()).float()  # d τ_s / d s
    net_ = fm.net if net is None else net
    if isinstance(x, EmbeddedState):
        # The input layer is linear: the x-tangent (D_s − x)/(1 − s) enters as (D_s @ E − x @ E)/(1 − s).
        with torch.no_grad():
            h = x.embed(net_.embed)
            tangent_x = (D_s @ net_.embed.float() - h) / (1 - ts)[:, None, None]

        def f(h_, tau_s_):
            return net_(None, tau_s_, tau_t, embedded=h_, **net_kw(g)).float().softmax(-1)

        delta, jv = _jvp(f, (h, tau_s), (tangent_x, tangent_tau))
    else:
        tangent_x = (D_s - x) / (1 - ts)[:, None, None]

        def f(x_, tau_s_):
            return fm.logits(x_, tau_s_, tau_t, net, given=g).softmax(-1)

        delta, jv = _jvp(f, (x, tau_s), (tangent_x, tangent_tau))  # δ̂ and J
    with torch.no_grad():
        if form == "relaxed":
            a = (1 - tt)[:, None, None]
            b = ((1 - ts) * (tt - ts))[:, None, None]
            target = (a * D_s + b * (delta + jv)) / (a + b).clamp_min(1e-12)
        else:
            coef = ((1 - ts) * (tt - ts) / (1 - tt).clamp_min(1e-3))[:, None, None]
            target = D_s + coef * jv
        if fm.projection == "sparsemax" and fm.eulerian_loss == "ce":
            target = sparsemax(target)
        return target
