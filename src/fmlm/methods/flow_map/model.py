"""The :class:`FMLM` module: the two-time denoiser δ_{s,t}, its distillation loss, EMA target and samplers."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fmlm.methods.flow_map.losses as losses
import fmlm.methods.flow_map.sampling as sampling
import fmlm.methods.flow_map.targets as targets
from fmlm import conditioning as conditioning_
from fmlm.errors import FmlmError
from fmlm.guidance import check_weak, guided_logits, known_tensors
from fmlm.methods.flm import FLM, Strata, denoising_metrics, stratified_uniform
from fmlm.methods.flow_map.target_net import _load_target, _save_target, update_target
from fmlm.paths import draw_embedded, flow_map, interpolant, noise_factor, run_net
from fmlm.schedule import Schedule

OBJECTIVES = ("semigroup", "lagrangian", "eulerian")


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
            embedding spaces of every network that reads it, see :mod:`fmlm.paths`) or
            ``vocab`` (V-space, the reference).
        fused: compute the KL losses with the logit cap fused in, by chunks of rows
            (:func:`kl_capped`), and the semigroup target in place; ``False`` is the reference
            (autograd through log_softmax, out-of-place target): the same values up to rounding.
        cond: training-time conditioning (:class:`fmlm.conditioning.Conditioning`; None: none).
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
        cond: conditioning_.Conditioning | None = None,
    ):
        super().__init__()
        self.fused = fused
        self.cond = cond
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
    def logits(
        self,
        x: torch.Tensor,
        tau_s: torch.Tensor,
        tau_t: torch.Tensor,
        net: nn.Module | None = None,
        cap: bool = True,
        given: torch.Tensor | None = None,
    ):
        kw = {**({} if cap else {"cap": False}), **conditioning_.net_kw(given)}
        out = run_net(self.net if net is None else net, x, tau_s, tau_t, **kw)
        return out if out.dtype == torch.float64 else out.float()

    def delta(
        self, x: torch.Tensor, tau_s: torch.Tensor, tau_t: torch.Tensor, given: torch.Tensor | None = None
    ) -> torch.Tensor:
        """δ_{s,t}(x) on the simplex, (B, L, V) float32; τ_s ≤ τ_t required."""
        tau_s, tau_t = torch.as_tensor(tau_s), torch.as_tensor(tau_t)
        # One check (one device sync): 0 <= s <= t <= 1, and no NaN (every comparison with NaN fails).
        if not bool(((tau_s <= tau_t + 1e-7) & (tau_s >= 0) & (tau_t <= 1)).all()):
            if bool(((tau_s >= 0) & (tau_s <= 1) & (tau_t >= 0) & (tau_t <= 1)).all()):
                raise FmlmError("flow map needs s <= t")
            raise FmlmError("flow-map times must be in [0, 1] (and not NaN)")
        return self.logits(x, tau_s, tau_t, given=given).softmax(-1)

    def flow_map(self, x: torch.Tensor, tau_s: torch.Tensor, tau_t: torch.Tensor) -> torch.Tensor:
        """X_{s,t}(x) in R^{L×V}."""
        d = self.delta(x, tau_s, tau_t)
        return flow_map(x, d, self.schedule.t(tau_s.double()), self.schedule.t(tau_t.double()))

    def _t(self, tau: torch.Tensor) -> torch.Tensor:
        return self.schedule.t(tau.double()).float()

    def _denoiser(self, x: torch.Tensor, tau: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
        """D_τ(x): the teacher's, or the student's own diagonal when self-distilling."""
        if self.teacher is not None:
            return self.teacher.denoise(x, tau, given=given)
        return self.logits(x, tau, tau, self._target, given=given).softmax(-1)

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

    # ------------------------------------------------------------------ targets (flow_map.targets)
    def semigroup_target(self, x: torch.Tensor, tau_s, tau_u, tau_t, known=None) -> torch.Tensor:
        """δ̄ = λ·δ̂_{s,u}(x) + (1 − λ)·δ̂_{u,t}(X_{s,u}(x)) (:func:`~fmlm.methods.flow_map.targets.semigroup_target`)."""
        return targets.semigroup_target(self, x, tau_s, tau_u, tau_t, known)

    def lagrangian_target(self, x: torch.Tensor, tau_s, tau_t, known=None) -> torch.Tensor:
        """The Lagrangian target (:func:`~fmlm.methods.flow_map.targets.lagrangian_target`)."""
        return targets.lagrangian_target(self, x, tau_s, tau_t, known)

    def eulerian_target(self, x: torch.Tensor, tau_s, tau_t, form: str | None = None, known=None) -> torch.Tensor:
        """The Eulerian target (:func:`~fmlm.methods.flow_map.targets.eulerian_target`)."""
        return targets.eulerian_target(self, x, tau_s, tau_t, form, known)

    # ------------------------------------------------------------------ losses (flow_map.losses)
    def loss(
        self, ids: torch.Tensor, generator: torch.Generator | None = None, strata: Strata | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Diagonal + off-diagonal distillation loss on token ids (B, L); see
        :func:`fmlm.methods.flow_map.losses.distillation_loss`."""
        return losses.distillation_loss(self, ids, generator, strata)

    def on_step_end(self) -> None:
        """Called by the trainer after each optimiser step: update the EMA target network."""
        if self._target is not None:
            update_target(self._target, self.net, self.target_ema)

    @torch.no_grad()
    def eval_loss(self, ids: torch.Tensor, generator: torch.Generator) -> dict:
        """Validation: the denoising CE of the diagonal δ_{t,t} (comparable to FLM's CE), and the
        one-step distillation gap KL(teacher 2-step ‖ δ_{0,1}) is left to the benchmarks."""
        B = ids.shape[0]
        tau = stratified_uniform(B, generator, ids.device)
        noise = torch.randn(*ids.shape, self.vocab_size, generator=generator, device=ids.device)
        x = interpolant(ids, self._t(tau), noise)
        return denoising_metrics(self.logits(x, tau, tau).log_softmax(-1), ids)

    # ------------------------------------------------------------------ sampling
    def guided_delta(
        self,
        x: torch.Tensor,
        tau_s: torch.Tensor,
        tau_t: torch.Tensor,
        weak: "FMLM | None" = None,
        weight: float = 0.0,
        temperature: float = 1.0,
        given: torch.Tensor | None = None,
        cfg_weight: float = 0.0,
        x_uncond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """δ_{s,t}(x), or with a ``weak`` flow map softmax(log δ + w·(log δ − log δ_weak)) (w = 0: δ exactly).

        ``temperature`` T ≠ 1 softens it to softmax(logits / T) (the reward look-ahead). ``given``
        flags the known positions (learned conditioning); with ``x_uncond`` classifier-free
        guidance: softmax(log δ_cond + w·(log δ_cond − log δ_uncond)), w = ``cfg_weight``.
        """
        logits = self.logits(x, tau_s, tau_t, given=given)
        if x_uncond is not None:
            logits = guided_logits(logits, self.logits(x_uncond, tau_s, tau_t), cfg_weight)
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
        cond_mode: str | None = None,
        cfg_weight: float | None = None,
    ) -> torch.Tensor:
        """N flow-map steps on a uniform τ grid; the last returns δ_{s,1}, decoded by argmax.

        ``noise="embedded"`` (the default) is the lean path, taken whenever no conditioning,
        guidance or callback is asked for: the initial state is drawn directly as x0 @ E in the
        d-dimensional embedding space (:func:`fmlm.paths.draw_embedded`, through a
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
            cond_mode: ``learned`` (the default for a model trained with ``train.cond_prob`` > 0):
                the known positions are their clean one-hot at every step, flagged as given, and
                not inverted; ``steer``: the replacement and inversion above.
            cfg_weight: classifier-free guidance weight w (learned conditioning only; None: none, 0: the
                guided formula at w = 0, which is the conditional sampler bit for bit).
        """
        if steps < 1:
            raise ValueError("steps must be >= 1")
        device = next(self.parameters()).device
        dtype = torch.float64 if float64 else torch.float32
        if noise not in ("embedded", "vocab"):
            raise ValueError(f"unknown noise path {noise!r} (embedded or vocab)")
        known, mask = known_tensors(known, mask, num_samples, seq_len, self.vocab_size, device)
        mode = conditioning_.resolve_mode(self, cond_mode, known)
        conditioning_.check_cfg(cfg_weight, mode)
        if noise == "embedded" and known is None and guide_weak is None and reward is None and callback is None:
            h = draw_embedded(self.net.embed, (num_samples, seq_len), generator, self._noise_factor())
            return self.sample_embedded(h.to(dtype), steps, generator, gamma)
        if guide_weak is not None:
            check_weak(self, guide_weak)
        z = torch.randn(num_samples, seq_len, self.vocab_size, generator=generator, device=device).to(dtype)
        return sampling.guided_sample(
            self,
            z,
            steps,
            generator,
            gamma,
            callback,
            known,
            mask,
            invert_iters,
            invert_scale,
            guide_weak,
            guide_weight,
            reward,
            reward_scale,
            reward_iters,
            reward_temperature,
            learned=mode == "learned",
            cfg_weight=cfg_weight,
        )

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
    def sample_embedded(
        self, h: torch.Tensor, steps: int, generator: torch.Generator | None = None, gamma: float = 0.0
    ) -> torch.Tensor:
        """The lean sampler from an embedded initial state h = x0 @ E (B, L, d): token ids (B, L).

        Each state is kept as its embedding h = x @ E (the flow map is affine in x:
        X @ E = a·(x @ E) + b·(δ @ E)); the last step returns argmax of the logits, which is
        argmax δ. Fresh noise of the stochastic variant (``gamma`` > 0) is drawn as ε @ E.
        Given h = x0 @ E this computes the reference path's tokens for that x0 (the same
        function, up to floating-point rounding of the states after the first step).
        """
        if steps < 1:
            raise ValueError("steps must be >= 1")
        return sampling.lean_sample(self, h, steps, generator, gamma)
