"""The one-hot Gaussian path of FLM and FMLM: I_t = (1 − t)·x0 + t·onehot(x1), x0 ~ N(0, I).

:func:`interpolant` forms it in R^{L×V}; :func:`flow_map` is the flow map's affine step
X_{s,t}(x) = ((1−t)/(1−s))·x + ((t−s)/(1−s))·δ. The rest of this module is the embedded-noise
trick, which draws the Gaussian part of I_t in the d-dimensional embedding space:

The DiT reads a V-dimensional state x only through its linear, bias-free input layer
h = x @ E (E: V x d). For the interpolant I_t = (1 − t)·x0 + t·onehot(x1),

    I_t @ E = (1 − t)·(x0 @ E) + t·E[x1],   x0 @ E ~ N(0, EᵀE) independently per position,

so x0 @ E can be drawn directly as z @ Lᵀ with L = chol(EᵀE) and z ~ N(0, I_d): the
(B, L, V) noise, its one-hot companion and the (B, L, V) x (V, d) product are never formed.
When several networks read the same x (teacher and student in distillation, or a target
copy), their embeddings are drawn jointly from the stacked covariance WᵀW, W = [E_1 … E_k],
so that each sees x0 @ E_i for one common x0.

Gradients. In the V-space path the gradient reaching E_i through the noise term is
x0ᵀ·∂ℓ/∂h_i. Here x0 is never drawn; it is replaced by its conditional mean given every
embedded draw Y = x0 @ W, namely x̂0 = Y (WᵀW)⁻¹ Wᵀ (so the gradient is x̂0ᵀ·∂ℓ/∂h_i, computed
as a d x d product without forming x̂0). Every other factor of the gradient depends on x0
only through Y, so the embedded gradient is E[V-space gradient | Y]: the same expectation,
with less variance. (Back-propagating through the Cholesky factor instead would be biased
whenever a stop-gradient network sees the same noise, e.g. a target computed by the student
itself.)

States that stay linear in x (flow-map steps X = a·x + b·δ with δ a network output on the
simplex) are kept as :class:`EmbeddedState`, which returns x @ E for any embedding E on
demand: (a·x + b·δ) @ E = a·(x @ E) + b·(δ @ E).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def interpolant(ids: torch.Tensor, t: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """I_t = (1 − t)·noise + t·onehot(ids) in the dtype of ``noise``.

    Args:
        ids: token ids x1 (B, L).
        t: interpolant time, (B,) (one per row) or a scalar.
        noise: x0 (B, L, V).
    """
    x1 = F.one_hot(ids, noise.shape[-1]).to(noise.dtype)
    tt = torch.as_tensor(t, dtype=noise.dtype, device=noise.device)
    if tt.dim() == 1:
        tt = tt[:, None, None]
    return (1 - tt) * noise + tt * x1


def _unique(embeds: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Distinct embeddings (by identity, then by value) and, for each input, its index among them.

    Equal matrices must be merged: their stacked covariance would be singular (a student is
    an exact copy of its teacher when distillation starts).
    """
    uniq: list[torch.Tensor] = []
    where: list[int] = []
    for e in embeds:
        for j, u in enumerate(uniq):
            if e is u or (e.shape == u.shape and torch.equal(e.detach(), u.detach())):
                # Keep the one that needs a gradient, if either does.
                if e.requires_grad and not u.requires_grad:
                    uniq[j] = e
                where.append(j)
                break
        else:
            where.append(len(uniq))
            uniq.append(e)
    return uniq, where


def cholesky_psd(cov: torch.Tensor, max_tries: int = 6) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric PSD matrix, adding diagonal jitter only if needed."""
    L, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return L
    scale = cov.diagonal().mean().clamp_min(torch.finfo(cov.dtype).tiny)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    for i in range(max_tries):
        L, info = torch.linalg.cholesky_ex(cov + (10.0 ** (i - 10)) * scale * eye)
        if int(info) == 0:
            return L
    raise RuntimeError("covariance of the embedded noise is not positive semi-definite")


def embedded_noise(
    embeds: Sequence[torch.Tensor], shape: Sequence[int], generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """x0 @ E_i for every E_i in ``embeds`` (V x d_i), one common x0 ~ N(0, I_V) per position.

    Returns float32 tensors of shape (*shape, d_i). Drawn in the (Σ d_i)-dimensional joint
    embedding space when that is smaller than V; otherwise (tiny vocabularies) x0 itself is
    drawn, which is then the cheaper and exact way.
    """
    uniq, where = _unique(embeds)
    V = uniq[0].shape[0]
    dims = [u.shape[1] for u in uniq]
    n = sum(dims)
    device = uniq[0].device
    with torch.autocast(device.type, enabled=False):
        if n >= V:
            x0 = torch.randn(*shape, V, generator=generator, device=device)
            ys = [x0 @ u.float() for u in uniq]
            return [ys[j] for j in where]
        W = torch.cat([u.detach().float() for u in uniq], dim=1)  # (V, n)
        # Wᵀ E_i with a gradient to E_i where needed (its value is the i-th block column of WᵀW).
        cols = [W.t() @ u.float() if u.requires_grad else None for u in uniq]
        cov = (
            W.t() @ W
            if all(c is None for c in cols)
            else torch.cat(
                [(c if c is not None else W.t() @ u.detach().float()).detach() for c, u in zip(cols, uniq)], dim=1
            )
        )
        chol = cholesky_psd(cov.double())  # (n, n), lower
        z = torch.randn(*shape, n, generator=generator, device=device)
        Y = z @ chol.t().float()  # (*shape, n) ~ x0 @ W
        blocks = list(Y.split(dims, dim=-1))
        ys = []
        for b, c in zip(blocks, cols):
            if c is None:
                ys.append(b)
                continue
            # M = (WᵀW)⁻¹ Wᵀ E_i: Y @ M has the value of block i and the gradient x̂0 dE_i.
            M = torch.cholesky_solve(c.double(), chol).float()  # (n, d_i)
            g = Y.detach() @ M
            ys.append(b + (g - g.detach()))
    return [ys[j] for j in where]


def noise_factor(E: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor C of EᵀE (d x d, float32), so that z @ Cᵀ ~ x0 @ E for z ~ N(0, I_d).

    None when d ≥ V: x0 itself is then the cheaper and exact draw (as in :func:`embedded_noise`).
    The factor depends only on E; a sampler computes it once per set of weights.
    """
    V, d = E.shape
    if d >= V:
        return None
    with torch.no_grad(), torch.autocast(E.device.type, enabled=False):
        W = E.detach().float()
        return cholesky_psd((W.t() @ W).double()).float()


def draw_embedded(
    E: torch.Tensor, shape: Sequence[int], generator: torch.Generator | None, factor: torch.Tensor | None
) -> torch.Tensor:
    """x0 @ E for x0 ~ N(0, I_V) per position, float32 (*shape, d), drawn as :func:`embedded_noise`
    draws it for one network (the same random stream); ``factor`` from :func:`noise_factor`."""
    with torch.no_grad(), torch.autocast(E.device.type, enabled=False):
        if factor is None:
            x0 = torch.randn(*shape, E.shape[0], generator=generator, device=E.device)
            return x0 @ E.detach().float()
        z = torch.randn(*shape, E.shape[1], generator=generator, device=E.device)
        return z @ factor.t()


class EmbeddedState:
    """A state x in R^{L×V} known through x @ E for whichever input embedding E reads it."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self._fn = fn

    def embed(self, E: torch.Tensor) -> torch.Tensor:
        """x @ E, (B, L, d)."""
        return self._fn(E)

    @classmethod
    def interpolant(cls, noise: dict[int, torch.Tensor], ids: torch.Tensor, t: torch.Tensor) -> "EmbeddedState":
        """I_t = (1 − t)·x0 + t·onehot(ids); ``noise`` maps id(E) to x0 @ E, t is (B,)."""
        tt = t.float()[:, None, None]

        def fn(E):
            return (1 - tt) * noise[id(E)] + tt * F.embedding(ids, E).float()

        return cls(fn)

    def affine(self, a: torch.Tensor, b: torch.Tensor, p: torch.Tensor) -> "EmbeddedState":
        """a·x + b·p for p in R^{L×V} (a network output); a, b broadcast against (B, L, d)."""
        return EmbeddedState(lambda E: a * self.embed(E) + b * (p.to(E.dtype) @ E).float())


def run_net(net: torch.nn.Module, x: torch.Tensor | EmbeddedState, *times: torch.Tensor, **kw) -> torch.Tensor:
    """``net(x, *times, **kw)`` for a V-space tensor or an :class:`EmbeddedState`."""
    if isinstance(x, EmbeddedState):
        return net(None, *times, embedded=x.embed(net.embed), **kw)
    return net(x, *times, **kw)


def flow_map(
    x: torch.Tensor | EmbeddedState, delta: torch.Tensor, t_s: torch.Tensor, t_t: torch.Tensor
) -> torch.Tensor | EmbeddedState:
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
