"""The flow map's samplers: N steps on a uniform τ grid, X_{s,t} from each state to the next.

:func:`guided_sample` works in R^{L×V} and takes known tokens, autoguidance and reward guidance;
:func:`lean_sample` keeps every state as its embedding x @ E (no (B, L, V) state at all). Both
take the stochastic variant's γ (:func:`jump`). ``fm`` is the :class:`~fmlm.methods.flow_map.model.FMLM`.
"""

from __future__ import annotations

import torch

from fmlm.guidance import Steering, clamp_known, invert_known, replace_known
from fmlm.paths import draw_embedded, flow_map


def jump(schedule, t: torch.Tensor, gamma: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(t̃, τ(t̃)): with γ > 0 a step to t jumps further, to 1 − t̃ = (1 − t)·sqrt(1 − γ²) (float64)."""
    t_jump = 1 - (1 - t) * (1 - gamma**2) ** 0.5 if gamma > 0 else t
    t_jump = torch.as_tensor(t_jump, dtype=torch.float64, device=device)
    return t_jump, schedule.tau(t_jump)


@torch.no_grad()
def guided_sample(
    fm,
    z: torch.Tensor,
    steps: int,
    generator,
    gamma: float,
    callback,
    known,
    mask,
    invert_iters: int,
    invert_scale: float,
    guide_weak,
    guide_weight: float,
    reward,
    reward_scale: float,
    reward_iters: int,
    reward_temperature: float,
    learned: bool = False,
    cfg_weight: float | None = None,
) -> torch.Tensor:
    """Token ids (B, L) from the initial state z (B, L, V); the arguments are those of ``FMLM.sample``
    (``learned``: its ``cond_mode="learned"``: known positions clean and flagged, no inversion)."""
    device, dtype = z.device, z.dtype
    taus = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=device)
    ts = fm.schedule.t(taus)
    B = z.shape[0]
    one = torch.ones(B, device=device)

    def delta(x, tau_s, tau_t, temperature=1.0):
        if not learned:
            return fm.guided_delta(x, tau_s, tau_t, guide_weak, guide_weight, temperature)
        x_u = None
        if cfg_weight is not None:  # the unconditional view: known positions on their interpolant, not flagged
            x_u = replace_known(x, known, mask, noise.to(x.dtype), fm.schedule.t(tau_s[:1].double()))
        return fm.guided_delta(x, tau_s, tau_t, guide_weak, guide_weight, temperature, mask, cfg_weight, x_u)

    steer = (
        None if reward is None else Steering(reward, reward_scale, reward_iters, update=None if mask is None else ~mask)
    )
    if reward_temperature <= 0:
        raise ValueError(f"reward_temperature must be > 0, got {reward_temperature}")
    noise = z
    if known is not None and invert_iters > 0 and not learned:
        # Invert the known positions' noise through the one-step look-ahead (t = 0).
        tau0 = taus[0].float().expand(B)
        noise = z = invert_known(z, lambda x: delta(x, tau0, one), known, mask, invert_scale, invert_iters)
    for i in range(steps):
        s, t = ts[i], ts[i + 1]
        tau_s = taus[i].float().expand(B)
        s_known = 1.0 if learned else s  # learned conditioning: the known positions stay clean
        z = replace_known(z, known, mask, noise, s_known)
        if steer is not None:
            z = replace_known(
                steer(z, lambda x: delta(x, tau_s, one, reward_temperature), float(s)), known, mask, noise, s_known
            )
        if i == steps - 1:
            d = clamp_known(delta(z.float(), tau_s, taus[i + 1].float().expand(B)), known, mask)
            if callback is not None:
                callback(i, z, d)
            return d.argmax(-1)
        t_jump, tau_jump = jump(fm.schedule, t, gamma, device)
        d = delta(z.float(), tau_s, tau_jump.float().expand(B)).to(dtype)
        if callback is not None:
            callback(i, z, d)
        z = flow_map(z, d, s.expand(B), t_jump.expand(B))
        if gamma > 0:
            eps = torch.randn(z.shape, generator=generator, device=device).to(dtype)
            z = z + gamma * (1 - t) * eps
    raise AssertionError("unreachable")  # pragma: no cover


@torch.no_grad()
def lean_sample(fm, h: torch.Tensor, steps: int, generator=None, gamma: float = 0.0) -> torch.Tensor:
    """Token ids (B, L) from an embedded initial state h = x0 @ E (B, L, d) (``FMLM.sample_embedded``)."""
    B, device, dtype = h.shape[0], h.device, h.dtype
    E = fm.net.embed
    taus = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=device)
    ts = fm.schedule.t(taus)
    for i in range(steps):
        tau_s = taus[i].float().expand(B)
        if i == steps - 1:
            return fm.net(None, tau_s, taus[i + 1].float().expand(B), embedded=h.to(E.dtype)).argmax(-1)
        s, t = ts[i], ts[i + 1]
        t_jump, tau_jump = jump(fm.schedule, t, gamma, device)
        logits = fm.net(None, tau_s, tau_jump.float().expand(B), embedded=h.to(E.dtype))
        d = logits.float().softmax(-1).to(dtype)
        a, b = ((1 - t_jump) / (1 - s)).to(dtype), ((t_jump - s) / (1 - s)).to(dtype)
        h = a * h + b * (d @ E.to(dtype))
        if gamma > 0:
            eps = draw_embedded(E, h.shape[:2], generator, fm._noise_factor()).to(dtype)
            h = h + gamma * (1 - t).to(dtype) * eps
    raise AssertionError("unreachable")  # pragma: no cover
