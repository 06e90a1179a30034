"""Flow map language model (FMLM): stage 2, few-step and one-step generation.

Maths (METHOD.md §4). The flow map X_{s,t} transports the FLM's probability flow
from time s to time t. It is parameterised by the two-time denoiser

    δ_{s,t}(x) = softmax(net(x, τ_s, τ_t)),   always on the simplex,
    X_{s,t}(x) = ((1 − t)/(1 − s))·x + ((t − s)/(1 − s))·δ_{s,t}(x),

so δ_{t,t} = D_t (the FLM denoiser), X_{s,s} = id and X_{s,1} = δ_{s,1}. The
network is conditioned on the decoding-error times (τ_s, τ_t); all the flow-map
algebra below is in interpolant time t = t(τ).

Objectives (the teacher signal δ̄ is computed without gradient):

* ``semigroup`` (default): for s < u < t,
  δ̄ = λ·δ̂_{s,u}(I_s) + (1 − λ)·δ̂_{u,t}(X_{s,u}(I_s)), λ = (1−t)(u−s)/((1−u)(t−s)),
  a convex combination (on the simplex); loss KL(δ̄ ‖ δ̂_{s,t}(I_s)).
* ``lagrangian``: δ̄ = D_t(X_{s,t}(I_s)) − ((1−t)(t−s)/(1−s))·∂_t δ̂_{s,t}(I_s), one JVP in
  τ_t (times dτ/dt), projected back onto the simplex by sparsemax; loss KL.
* ``eulerian``: δ̄ = D_s(I_s) + ((t−s)/(1−t))·((1−s)·∂_s δ̂ + (D_s − I_s)·∇_x δ̂), one JVP in
  (τ_s, x) with tangent (dτ/dt at s, (D_s − I_s)/(1 − s)); loss MSE, or KL after projection.
  The coefficient c = (1−s)(t−s)/(1−t) diverges as t → 1, so by default (``eulerian_form=
  relaxed``, an fmlm choice) the target is one damped step of size 1/(1 + c) from δ̂ towards
  it, which is bounded and has the same fixed point; ``direct`` keeps the formula above
  (its MSE weights each pair by 1/(1 + c²)).

The diagonal term KL(D̂_t(I_t) ‖ δ̂_{t,t}(I_t)) ties δ_{t,t} to the frozen FLM teacher;
with self-distillation (no teacher) it becomes CE to the one-hot data, and the D's in
the Lagrangian/Eulerian targets come from the student's own diagonal δ_{t,t}.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fmlm.errors import FmlmError
from fmlm.guidance import Steering, check_weak, clamp_known, guided_logits, invert_known, known_tensors, replace_known
from fmlm.methods.embedded import EmbeddedState, draw_embedded, embedded_noise, noise_factor, run_net
from fmlm.methods.flm import FLM, Strata, denoising_metrics, stratified_uniform
from fmlm.schedule import Schedule

OBJECTIVES = ("semigroup", "lagrangian", "eulerian")


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


def flow_map(x, delta: torch.Tensor, t_s: torch.Tensor, t_t: torch.Tensor):
    """X_{s,t}(x) = ((1−t)/(1−s))·x + ((t−s)/(1−s))·δ_{s,t}(x); t_s, t_t: (B,) interpolant times.

    ``x`` may be an :class:`EmbeddedState`: the map is affine in x, so the result is one too.
    """
    if isinstance(x, EmbeddedState):
        a = ((1 - t_t) / (1 - t_s)).float()[:, None, None]
        b = ((t_t - t_s) / (1 - t_s)).float()[:, None, None]
        return x.affine(a, b, delta)
    a = ((1 - t_t) / (1 - t_s)).to(x.dtype)[:, None, None]
    b = ((t_t - t_s) / (1 - t_s)).to(x.dtype)[:, None, None]
    return a * x + b * delta.to(x.dtype)


def _save_target(module, state_dict, prefix, local_metadata):
    for k, v in module._target.state_dict().items():
        state_dict[f"{prefix}target.{k}"] = v.detach()


def _load_target(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    head = f"{prefix}target."
    own = {k[len(head):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(head)]}
    if not own:
        # Older checkpoints (or a student saved without a target): start the target from the student.
        own = {k[len(f"{prefix}net."):]: v for k, v in state_dict.items() if k.startswith(f"{prefix}net.")}
    missing, unexpected = module._target.load_state_dict(own, strict=False)
    missing_keys.extend(f"{head}{k}" for k in missing)
    unexpected_keys.extend(f"{head}{k}" for k in unexpected)


class FMLM(nn.Module):
    """Two-time denoiser δ_{s,t} on a two-time DiT, with its distillation losses and sampler.

    Args:
        net: two-time backbone ``net(x, τ_s, τ_t) -> logits`` (B, L, V).
        schedule: the teacher's time reparameterisation.
        objective: ``semigroup`` | ``lagrangian`` | ``eulerian``.
        teacher: frozen FLM (stage 1). ``None`` means self-distillation. It is kept out of
            this module's parameters and state dict: checkpoints hold the student only.
        diag_fraction: share of each batch spent on the diagonal term.
        boundary_fraction: share of the off-diagonal pairs set to (s, t) = (0, 1).
        mid: ``midpoint`` or ``uniform`` intermediate time u (semigroup).
        target_ema: if > 0, targets come from an EMA copy of the student with this decay
            (updated by :meth:`on_step_end`), otherwise from the student itself.
        projection: ``sparsemax`` or ``none`` for Lagrangian/Eulerian targets.
        eulerian_loss: ``mse`` or ``ce`` (KL to the projected target).
        max_gap: largest τ-gap of off-diagonal pairs.
        eulerian_form: ``relaxed`` (bounded damped target, default) or ``direct`` (METHOD.md's
            D_s + c·J); see :meth:`eulerian_target`.
        noise: ``embedded`` (the default, as ``train.noise``: draw the noise of I_s jointly in the
            embedding spaces of every network that reads it, see :mod:`fmlm.methods.embedded`) or
            ``vocab`` (V-space, the reference).
        fused: compute the KL losses with the logit cap fused in, by chunks of rows
            (:func:`kl_capped`), and the semigroup target in place; ``False`` is the reference
            (autograd through log_softmax, out-of-place target): the same values up to rounding.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        objective: str = "semigroup",
        teacher: FLM | None = None,
        diag_fraction: float = 0.5,
        boundary_fraction: float = 1 / 32,
        mid: str = "midpoint",
        target_ema: float = 0.0,
        projection: str = "sparsemax",
        eulerian_loss: str = "ce",
        max_gap: float = 1.0,
        eulerian_form: str = "relaxed",
        noise: str = "embedded",
        fused: bool = True,
    ):
        super().__init__()
        self.fused = fused
        if noise not in ("vocab", "embedded"):
            raise ValueError(f"unknown noise path {noise!r}")
        self.noise = noise
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}")
        if not getattr(net, "two_time", False):
            raise ValueError("FMLM needs a two-time backbone")
        self.net = net
        self.schedule = schedule
        self.objective = objective
        self.diag_fraction = diag_fraction
        self.boundary_fraction = boundary_fraction
        self.mid = mid
        self.projection = projection
        self.eulerian_loss = eulerian_loss
        self.max_gap = max_gap
        if eulerian_form not in ("relaxed", "direct"):
            raise ValueError(f"unknown eulerian_form {eulerian_form!r}")
        self.eulerian_form = eulerian_form
        self.target_ema = target_ema
        # Not registered: the teacher is frozen and not part of the student's checkpoint.
        object.__setattr__(self, "teacher", teacher)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        target = None
        if target_ema > 0:
            target = copy.deepcopy(net).requires_grad_(False)
        object.__setattr__(self, "_target", target)
        if target is not None:
            # The EMA target is state: save it with the student (keys ``target.*``) so that a
            # resumed run continues with the same targets, but keep it out of parameters().
            self.register_state_dict_post_hook(_save_target)
            self.register_load_state_dict_pre_hook(_load_target)

    def _apply(self, fn, recurse=True):  # keep the unregistered networks on the same device/dtype
        super()._apply(fn, recurse)
        for m in (self.teacher, self._target):
            if m is not None:
                m._apply(fn, recurse)
        return self

    @property
    def vocab_size(self) -> int:
        return self.net.vocab_size

    @classmethod
    def from_teacher(cls, teacher: FLM, net: nn.Module, **kw) -> "FMLM":
        """Initialise the student from the teacher: copy every weight, zero the second time
        embedding, so that δ_{s,t} = D_s at the start."""
        missing, unexpected = net.load_state_dict(teacher.net.state_dict(), strict=False)
        if unexpected or any(not k.startswith("time2.") for k in missing):
            raise FmlmError("teacher backbone does not match the student's shape")
        net.zero_second_time()
        return cls(net, teacher.schedule, teacher=teacher, **kw)

    # ------------------------------------------------------------------ the model
    def logits(self, x: torch.Tensor, tau_s: torch.Tensor, tau_t: torch.Tensor, net: nn.Module | None = None,
               cap: bool = True):
        out = run_net(self.net if net is None else net, x, tau_s, tau_t, **({} if cap else {"cap": False}))
        return out if out.dtype == torch.float64 else out.float()

    def _kl_to(self, p: torch.Tensor, x, tau_s: torch.Tensor, tau_t: torch.Tensor) -> torch.Tensor:
        """Σ KL(p ‖ δ̂_{s,t}(x)) over rows and positions, fused with the logit cap (:func:`kl_capped`)."""
        if not self.fused:
            return kl_rows(p, self.logits(x, tau_s, tau_t).log_softmax(-1)).sum()
        cap = getattr(self.net, "logit_cap", None)  # None: a backbone without the DiT's soft cap
        if cap is None:
            return kl_capped(p, self.logits(x, tau_s, tau_t), 0.0).sum()
        return kl_capped(p, self.logits(x, tau_s, tau_t, cap=False), cap).sum()

    def delta(self, x: torch.Tensor, tau_s: torch.Tensor, tau_t: torch.Tensor) -> torch.Tensor:
        """δ_{s,t}(x) on the simplex, (B, L, V) float32; τ_s ≤ τ_t required."""
        tau_s, tau_t = torch.as_tensor(tau_s), torch.as_tensor(tau_t)
        # One check (one device sync): 0 <= s <= t <= 1, and no NaN (every comparison with NaN fails).
        if not bool(((tau_s <= tau_t + 1e-7) & (tau_s >= 0) & (tau_t <= 1)).all()):
            if bool(((tau_s >= 0) & (tau_s <= 1) & (tau_t >= 0) & (tau_t <= 1)).all()):
                raise FmlmError("flow map needs s <= t")
            raise FmlmError("flow-map times must be in [0, 1] (and not NaN)")
        return self.logits(x, tau_s, tau_t).softmax(-1)

    def flow_map(self, x: torch.Tensor, tau_s: torch.Tensor, tau_t: torch.Tensor) -> torch.Tensor:
        """X_{s,t}(x) in R^{L×V}."""
        d = self.delta(x, tau_s, tau_t)
        return flow_map(x, d, self.schedule.t(tau_s.double()), self.schedule.t(tau_t.double()))

    def _t(self, tau: torch.Tensor) -> torch.Tensor:
        return self.schedule.t(tau.double()).float()

    def _denoiser(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """D_τ(x): the teacher's, or the student's own diagonal when self-distilling."""
        if self.teacher is not None:
            return self.teacher.denoise(x, tau)
        return self.logits(x, tau, tau, self._target).softmax(-1)

    # ------------------------------------------------------------------ times
    def sample_times(self, n: int, generator=None, device=None, strata: Strata | None = None):
        """Off-diagonal (τ_s, τ_u, τ_t): d ~ U[0, max_gap], s ~ U·(1 − d), t = s + d."""
        d = stratified_uniform(n, generator, device, strata) * self.max_gap
        s = torch.rand(n, generator=generator, device=device) * (1 - d)
        t = s + d
        boundary = torch.rand(n, generator=generator, device=device) < self.boundary_fraction
        s = torch.where(boundary, torch.zeros_like(s), s)
        t = torch.where(boundary, torch.ones_like(t), t)
        if self.mid == "midpoint":
            u = 0.5 * (s + t)
        else:
            u = s + torch.rand(n, generator=generator, device=device) * (t - s)
        return s, u, t

    # ------------------------------------------------------------------ targets
    @torch.no_grad()
    def semigroup_target(self, x: torch.Tensor, tau_s, tau_u, tau_t) -> torch.Tensor:
        """δ̄ = λ·δ̂_{s,u}(x) + (1 − λ)·δ̂_{u,t}(X_{s,u}(x)), on the simplex."""
        net = self._target
        ts, tu, tt = self._t(tau_s), self._t(tau_u), self._t(tau_t)
        # In place throughout: no graph is kept, and each (B, L, V) temporary costs a full pass.
        soft = softmax_ if self.fused else (lambda z: z.softmax(-1))
        d_su = soft(self.logits(x, tau_s, tau_u, net))
        x_u = flow_map(x, d_su, ts, tu)
        d_ut = soft(self.logits(x_u, tau_u, tau_t, net))
        gap = (tt - ts).clamp_min(1e-12)
        lam = ((1 - tt) * (tu - ts) / ((1 - tu).clamp_min(1e-12) * gap))
        # s = t (gap 0) makes λ 0/0; the target is then δ_{s,s} either way.
        lam = torch.where(tt - ts > 1e-12, lam, torch.zeros_like(lam)).clamp(0, 1)[:, None, None]
        if not self.fused:
            return lam * d_su + (1 - lam) * d_ut
        return d_ut.lerp_(d_su, lam.to(d_ut.dtype))  # λ·δ_su + (1 − λ)·δ_ut

    def _jvp(self, fn: Callable, primals: tuple, tangents: tuple):
        # Fused SDPA kernels (flash, memory-efficient) have no forward-mode derivative;
        # the math kernel is composite, so forward AD goes through it.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(fn, primals, tangents)

    def lagrangian_target(self, x: torch.Tensor, tau_s, tau_t) -> torch.Tensor:
        """δ̄ = D_t(X_{s,t}(x)) − ((1−t)(t−s)/(1−s))·∂_t δ̂_{s,t}(x), projected onto the simplex."""
        net = self.net if self._target is None else self._target
        ts, tt = self._t(tau_s), self._t(tau_t)

        def f(tau_t_):
            return self.logits(x, tau_s, tau_t_, net).softmax(-1)

        delta, d_dtau = self._jvp(f, (tau_t,), (torch.ones_like(tau_t),))
        with torch.no_grad():
            dt = d_dtau * self.schedule.dtau_dt(tt.double()).float()[:, None, None]  # ∂_t δ̂
            x_t = flow_map(x, delta, ts, tt)
            coef = ((1 - tt) * (tt - ts) / (1 - ts))[:, None, None]
            target = self._denoiser(x_t, tau_t) - coef * dt
            return sparsemax(target) if self.projection == "sparsemax" else target

    def eulerian_target(self, x: torch.Tensor, tau_s, tau_t, form: str | None = None) -> torch.Tensor:
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
        form = self.eulerian_form if form is None else form
        net = self.net if self._target is None else self._target
        ts, tt = self._t(tau_s), self._t(tau_t)
        with torch.no_grad():
            D_s = self._denoiser(x, tau_s)
        tangent_tau = self.schedule.dtau_dt(ts.double()).float()  # d τ_s / d s
        net_ = self.net if net is None else net
        if isinstance(x, EmbeddedState):
            # The input layer is linear: the x-tangent (D_s − x)/(1 − s) enters as (D_s @ E − x @ E)/(1 − s).
            with torch.no_grad():
                h = x.embed(net_.embed)
                tangent_x = (D_s @ net_.embed.float() - h) / (1 - ts)[:, None, None]

            def f(h_, tau_s_):
                return net_(None, tau_s_, tau_t, embedded=h_).float().softmax(-1)

            delta, jv = self._jvp(f, (h, tau_s), (tangent_x, tangent_tau))
        else:
            tangent_x = (D_s - x) / (1 - ts)[:, None, None]

            def f(x_, tau_s_):
                return self.logits(x_, tau_s_, tau_t, net).softmax(-1)

            delta, jv = self._jvp(f, (x, tau_s), (tangent_x, tangent_tau))  # δ̂ and J
        with torch.no_grad():
            if form == "relaxed":
                a = (1 - tt)[:, None, None]
                b = ((1 - ts) * (tt - ts))[:, None, None]
                target = (a * D_s + b * (delta + jv)) / (a + b).clamp_min(1e-12)
            else:
                coef = ((1 - ts) * (tt - ts) / (1 - tt).clamp_min(1e-3))[:, None, None]
                target = D_s + coef * jv
            if self.projection == "sparsemax" and self.eulerian_loss == "ce":
                target = sparsemax(target)
            return target

    # ------------------------------------------------------------------ losses
    def loss(self, ids: torch.Tensor, generator: torch.Generator | None = None,
             strata: Strata | None = None) -> tuple[torch.Tensor, dict]:
        """Diagonal + off-diagonal distillation loss on token ids (B, L); ``strata``: see :class:`Strata`."""
        B, L = ids.shape
        n_diag = min(B - 1, max(1, round(B * self.diag_fraction))) if self.diag_fraction > 0 else 0
        n_off = B - n_diag
        states = self._states(ids, generator)
        total = ids.new_zeros((), dtype=torch.float32)
        metrics: dict[str, torch.Tensor] = {}

        if n_diag:
            tau = stratified_uniform(n_diag, generator, ids.device, strata)
            x = states(slice(0, n_diag), self._t(tau))
            if self.teacher is None:
                log_q = self.logits(x, tau, tau).log_softmax(-1)
                diag = F.nll_loss(log_q.flatten(0, 1), ids[:n_diag].flatten(), reduction="sum")
            else:
                with torch.no_grad():
                    p = self.teacher.denoise(x, tau)
                diag = self._kl_to(p, x, tau, tau)
            total = total + diag
            metrics["loss_diag"] = diag.detach() / (n_diag * L)

        if n_off:
            tau_s, tau_u, tau_t = self.sample_times(n_off, generator, ids.device, strata)
            x = states(slice(n_diag, B), self._t(tau_s))  # I_s
            if self.objective == "semigroup":
                target = self.semigroup_target(x, tau_s, tau_u, tau_t)
            elif self.objective == "lagrangian":
                target = self.lagrangian_target(x, tau_s, tau_t)
            else:
                target = self.eulerian_target(x, tau_s, tau_t)
            mse = self.objective == "eulerian" and self.eulerian_loss == "mse"
            logits = self.logits(x, tau_s, tau_t) if mse else None
            if mse and self.eulerian_form == "relaxed":
                off = (logits.softmax(-1) - target).pow(2).sum()
            elif mse:
                # The target's JVP coefficient c = (1−s)(t−s)/(1−t) diverges as t → 1; weighting each
                # pair by 1/(1 + c²) keeps the regression bounded (weight 1 near the diagonal).
                ts_, tt_ = self._t(tau_s), self._t(tau_t)
                c = (1 - ts_) * (tt_ - ts_) / (1 - tt_).clamp_min(1e-3)
                w = (1.0 / (1.0 + c**2))[:, None, None]
                off = (w * (logits.softmax(-1) - target).pow(2)).sum()
            else:
                off = self._kl_to(target, x, tau_s, tau_t)
            total = total + off
            metrics["loss_off"] = off.detach() / (n_off * L)

        loss = total / (B * L)
        metrics["loss"] = loss.detach()
        return loss, metrics

    def _states(self, ids: torch.Tensor, generator):
        """Draw the noise of a batch; return ``states(rows, t)`` -> I_t of those rows (V-space or embedded)."""
        B, L = ids.shape
        V = self.vocab_size
        teacher_net = self.teacher.net if self.teacher is not None else None
        embedded = self.noise == "embedded" and (self.teacher is None or self.teacher.loss_type != "mse_velocity")
        if not embedded:
            noise = torch.randn(B, L, V, generator=generator, device=ids.device)
            x1 = F.one_hot(ids, V).float()

            def vocab_state(rows, t):
                tt = t[:, None, None]
                return (1 - tt) * noise[rows] + tt * x1[rows]

            return vocab_state
        # Every network that reads I_s sees the same x0: draw x0 @ E jointly for all of them
        # (stop-gradient networks first; the student's embedding carries the gradient).
        embeds = [n.embed for n in (teacher_net, self._target) if n is not None] + [self.net.embed]
        ys = embedded_noise(embeds, (B, L), generator)
        by_id = dict(zip(map(id, embeds), ys))

        def embedded_state(rows, t):
            return EmbeddedState.interpolant({k: v[rows] for k, v in by_id.items()}, ids[rows], t)

        return embedded_state

    def on_step_end(self) -> None:
        """Called by the trainer after each optimiser step: update the EMA target network."""
        if self._target is None:
            return
        with torch.no_grad():
            for p_t, p in zip(self._target.parameters(), self.net.parameters()):
                p = p.detach()
                if hasattr(p, "full_tensor"):  # FSDP2 shard (DTensor): the target copy is whole
                    p = p.full_tensor()
                p_t.lerp_(p, 1 - self.target_ema)

    @torch.no_grad()
    def eval_loss(self, ids: torch.Tensor, generator: torch.Generator) -> dict:
        """Validation: the denoising CE of the diagonal δ_{t,t} (comparable to FLM's CE), and the
        one-step distillation gap KL(teacher 2-step ‖ δ_{0,1}) is left to the benchmarks."""
        B = ids.shape[0]
        tau = stratified_uniform(B, generator, ids.device)
        t = self._t(tau)[:, None, None]
        noise = torch.randn(*ids.shape, self.vocab_size, generator=generator, device=ids.device)
        x = (1 - t) * noise + t * F.one_hot(ids, self.vocab_size).float()
        return denoising_metrics(self.logits(x, tau, tau).log_softmax(-1), ids)

    # ------------------------------------------------------------------ sampling
    def guided_delta(self, x: torch.Tensor, tau_s: torch.Tensor, tau_t: torch.Tensor,
                     weak: "FMLM | None" = None, weight: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
        """δ_{s,t}(x), or with a ``weak`` flow map softmax(log δ + w·(log δ − log δ_weak)) (w = 0: δ exactly).

        ``temperature`` T ≠ 1 softens it to softmax(logits / T) (the reward look-ahead).
        """
        logits = self.logits(x, tau_s, tau_t)
        weak_logits = None if weak is None else weak.logits(x, tau_s, tau_t)
        logits = guided_logits(logits, weak_logits, weight)
        return (logits if temperature == 1.0 else logits / temperature).softmax(-1)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        seq_len: int,
        steps: int,
        generator: torch.Generator | None = None,
        float64: bool = False,
        gamma: float = 0.0,
        callback=None,
        known=None,
        mask=None,
        invert_iters: int = 50,
        invert_scale: float = 0.1,
        guide_weak: "FMLM | None" = None,
        guide_weight: float = 0.0,
        reward=None,
        reward_scale: float = 0.1,
        reward_iters: int = 10,
        reward_temperature: float = 8.0,
        noise: str = "embedded",
    ) -> torch.Tensor:
        """N flow-map steps on a uniform τ grid; the last returns δ_{s,1}, decoded by argmax.

        ``noise="embedded"`` (the default) is the lean path, taken whenever no conditioning,
        guidance or callback is asked for: the initial state is drawn directly as x0 @ E in the
        d-dimensional embedding space (:func:`fmlm.methods.embedded.draw_embedded`, through a
        Cholesky factor of EᵀE cached per set of weights), the states X = a·x + b·δ stay in that
        form, and the last step takes the argmax of the logits (no softmax). Its tokens are those
        of the reference path for the same x0; when d < V the x0 is drawn differently, so the
        same seed gives other (equally distributed) samples. ``noise="vocab"`` is the reference:
        (B, L, V) Gaussian, V-space states, argmax of δ.

        With ``gamma`` > 0 each intermediate step jumps further, to t̃ with
        1 − t̃ = (1 − t)·sqrt(1 − γ²), and adds fresh noise of std γ(1 − t), so the state's
        noise level matches time t again (stochastic variant, METHOD.md §4).

        Conditioning and guidance (:mod:`fmlm.guidance`):
            known, mask: known token ids and their positions (a prefix when ``mask`` is None).
                Before every step the known positions are set to their interpolant with the
                initial noise; at the first step (t = 0, where that carries no information)
                their noise is first inverted by at most ``invert_iters`` gradient steps of size
                ``invert_scale`` on Σ_known log δ_{0,1}(z)[known], per sample until every known
                token has look-ahead probability ≥ 0.99 (:func:`fmlm.guidance.invert_known`).
                The output keeps them exactly.
            guide_weak, guide_weight: autoguidance of δ by a weaker flow map with weight w.
            reward, reward_scale, reward_iters, reward_temperature: reward guidance through the
                look-ahead δ_{s,1}(z_s), softened to softmax(logits / T): before every step z_s
                takes ``reward_iters`` normalised gradient steps of reward (B, L, V) -> (B,)
                (:class:`fmlm.guidance.Steering`).
        """
        if steps < 1:
            raise ValueError("steps must be >= 1")
        device = next(self.parameters()).device
        dtype = torch.float64 if float64 else torch.float32
        if noise not in ("embedded", "vocab"):
            raise ValueError(f"unknown noise path {noise!r} (embedded or vocab)")
        known, mask = known_tensors(known, mask, num_samples, seq_len, self.vocab_size, device)
        if noise == "embedded" and known is None and guide_weak is None and reward is None and callback is None:
            h = draw_embedded(self.net.embed, (num_samples, seq_len), generator, self._noise_factor())
            return self.sample_embedded(h.to(dtype), steps, generator, gamma)
        if guide_weak is not None:
            check_weak(self, guide_weak)
        z = torch.randn(num_samples, seq_len, self.vocab_size, generator=generator, device=device).to(dtype)
        taus = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=device)
        ts = self.schedule.t(taus)
        B = num_samples
        one = torch.ones(B, device=device)

        def delta(x, tau_s, tau_t):
            return self.guided_delta(x, tau_s, tau_t, guide_weak, guide_weight)

        steer = None if reward is None else Steering(reward, reward_scale, reward_iters,
                                                      update=None if mask is None else ~mask)
        if reward_temperature <= 0:
            raise ValueError(f"reward_temperature must be > 0, got {reward_temperature}")
        noise = z
        if known is not None and invert_iters > 0:
            # Invert the known positions' noise through the one-step look-ahead (t = 0).
            tau0 = taus[0].float().expand(B)
            noise = z = invert_known(z, lambda x: delta(x, tau0, one), known, mask, invert_scale, invert_iters)
        for i in range(steps):
            s, t = ts[i], ts[i + 1]
            tau_s = taus[i].float().expand(B)
            z = replace_known(z, known, mask, noise, s)
            if steer is not None:
                z = replace_known(steer(z, lambda x: self.guided_delta(x, tau_s, one, guide_weak, guide_weight,
                                                                       reward_temperature), float(s)),
                                  known, mask, noise, s)
            if i == steps - 1:
                d = clamp_known(delta(z.float(), tau_s, taus[i + 1].float().expand(B)), known, mask)
                if callback is not None:
                    callback(i, z, d)
                return d.argmax(-1)
            t_jump = 1 - (1 - t) * (1 - gamma**2) ** 0.5 if gamma > 0 else t
            tau_jump = self.schedule.tau(torch.as_tensor(t_jump, dtype=torch.float64, device=device))
            d = delta(z.float(), tau_s, tau_jump.float().expand(B)).to(dtype)
            if callback is not None:
                callback(i, z, d)
            z = flow_map(z, d, s.expand(B), torch.as_tensor(t_jump, device=device).expand(B))
            if gamma > 0:
                eps = torch.randn(z.shape, generator=generator, device=device).to(dtype)
                z = z + gamma * (1 - t) * eps
        raise AssertionError("unreachable")  # pragma: no cover

    def _noise_factor(self) -> torch.Tensor | None:
        """Cholesky factor of EᵀE for the lean sampler, recomputed only when the embedding changes."""
        E = self.net.embed
        key = (E.data_ptr(), E._version, E.dtype, E.device, tuple(E.shape))
        cached = getattr(self, "_factor_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, noise_factor(E))
            self._factor_cache = cached
        return cached[1]

    @torch.no_grad()
    def sample_embedded(self, h: torch.Tensor, steps: int, generator: torch.Generator | None = None,
                        gamma: float = 0.0) -> torch.Tensor:
        """The lean sampler from an embedded initial state h = x0 @ E (B, L, d): token ids (B, L).

        Each state is kept as its embedding h = x @ E (the flow map is affine in x:
        X @ E = a·(x @ E) + b·(δ @ E)); the last step returns argmax of the logits, which is
        argmax δ. Fresh noise of the stochastic variant (``gamma`` > 0) is drawn as ε @ E.
        Given h = x0 @ E this computes the reference path's tokens for that x0 (the same
        function, up to floating-point rounding of the states after the first step).
        """
        if steps < 1:
            raise ValueError("steps must be >= 1")
        B, device, dtype = h.shape[0], h.device, h.dtype
        E = self.net.embed
        taus = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=device)
        ts = self.schedule.t(taus)
        for i in range(steps):
            tau_s = taus[i].float().expand(B)
            if i == steps - 1:
                return self.net(None, tau_s, taus[i + 1].float().expand(B), embedded=h.to(E.dtype)).argmax(-1)
            s, t = ts[i], ts[i + 1]
            t_jump = 1 - (1 - t) * (1 - gamma**2) ** 0.5 if gamma > 0 else t
            tau_jump = self.schedule.tau(torch.as_tensor(t_jump, dtype=torch.float64, device=device))
            logits = self.net(None, tau_s, tau_jump.float().expand(B), embedded=h.to(E.dtype))
            d = logits.float().softmax(-1).to(dtype)
            t_jump = torch.as_tensor(t_jump, device=device)
            a, b = ((1 - t_jump) / (1 - s)).to(dtype), ((t_jump - s) / (1 - s)).to(dtype)
            h = a * h + b * (d @ E.to(dtype))
            if gamma > 0:
                eps = draw_embedded(E, h.shape[:2], generator, self._noise_factor()).to(dtype)
                h = h + gamma * (1 - t).to(dtype) * eps
        raise AssertionError("unreachable")  # pragma: no cover
