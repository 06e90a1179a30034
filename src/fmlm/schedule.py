"""Time reparameterisations: interpolant time ``t`` <-> network time ``tau``.

The interpolant is ``I_t = (1 - t) x0 + t x1`` with ``x0 ~ N(0, I_K)`` and ``x1``
a one-hot vector over a vocabulary of size ``K``.  The *decoding-error* schedule
measures time by how decodable the true token is from ``I_t`` by argmax::

    P_correct(t) = P[argmax_k I_t^k = true token] = E_Z[Phi(Z + m)^(K-1)],
    m = t / (1 - t),  Z ~ N(0, 1)

    tau(t) = K/(K-1) * (P_correct(t) - 1/K) = 1 - K/(K-1) * P_error(t)

so ``tau(0) = 0``, ``tau(1) = 1`` and ``tau`` is strictly increasing.  The
network is conditioned on ``tau``; samplers step uniformly in ``tau`` and need
``t(tau)``; distillation objectives need ``dtau/dt``.

How it is computed
------------------
Integrating by parts, ``P_correct(m) = E_M[Phi(m - M)]`` and
``P_error(m) = E_M[Phi(M - m)]`` where ``M`` is the maximum of ``K - 1``
independent standard normals, with density ``g(x) = (K-1) phi(x) Phi(x)^(K-2)``
(for ``K = 2``, ``M`` is a standard normal).  ``g`` does not depend on ``t``, so
it is evaluated once (in log space) on a composite Gauss-Legendre rule that
covers the range where ``g`` is not negligible; every table point is then a
matrix-vector product.  This resolves the sharp peak of ``g`` for large ``K``
(where 100-node Gauss-Hermite on ``E_Z[...]`` is not accurate), gives
``P_error`` with full relative precision near ``t = 1`` and the exact
derivative ``dP/dm = E_M[phi(m - M)]`` for free.

The table (float64, cached per ``(K, grid_size)``) holds ``tau`` and
``dtau/dt`` on the union of a grid uniform in ``t`` and a grid uniform in ``m``
(denser near ``t = 1``), up to the ``m`` beyond which ``1 - tau < 1e-18``, plus
the end point ``(t, tau) = (1, 1)``.  Points whose ``tau`` does not strictly
increase in float64 (only where ``tau`` has saturated at ``1 - O(eps)``) are
dropped.  ``tau(t)`` is the monotone cubic Hermite interpolant of the table
(exact node derivatives, Fritsch-Carlson limited where necessary),
``dtau_dt`` its derivative, and ``t(tau)`` its exact inverse (safeguarded
Newton inside the bracketing cell), all evaluated with torch ops on the input's
device.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Tuple

import numpy as np
import torch
from scipy.special import erfc, log_ndtr, ndtri

from fmlm.errors import ConfigError

__all__ = [
    "Schedule",
    "UniformSchedule",
    "DecodingErrorSchedule",
    "p_correct_exact",
    "make_schedule",
    "SCHEDULES",
]

SCHEDULES = ("decoding_error", "uniform")

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
# Composite Gauss-Legendre rule for E_M[.]: panels x nodes per panel.
_GL_PANELS = 20
_GL_NODES = 16
# The table stops where 1 - tau <= K * Phi(-m / sqrt 2) <= _TAIL (union bound).
_TAIL = 1e-18
# Newton iterations for the inverse (converges in ~3 from the linear guess).
_NEWTON_ITERS = 8


# --------------------------------------------------------------------------- #
# Quadrature (numpy, float64)
# --------------------------------------------------------------------------- #


def _check_vocab(K: int) -> int:
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)):
        raise ConfigError(f"vocab_size must be an integer >= 2, got {K!r}")
    K = int(K)
    if K < 2:
        raise ConfigError(f"vocab_size must be >= 2, got {K}")
    return K


def _log_max_density(x: np.ndarray, K: int) -> np.ndarray:
    """log of the density of the max of K-1 iid standard normals."""
    out = math.log(K - 1) - 0.5 * x * x - _LOG_SQRT_2PI
    if K > 2:
        out = out + (K - 2) * log_ndtr(x)
    return out


@functools.lru_cache(maxsize=64)
def _max_nodes(K: int) -> Tuple[np.ndarray, np.ndarray]:
    """Nodes x and weights w*g(x) so that E_M[f(M)] ~= sum(wg * f(x))."""
    xs = np.linspace(-40.0, 40.0, 16001)
    lg = _log_max_density(xs, K)
    keep = np.nonzero(lg > lg.max() - 80.0)[0]  # g > 1e-35 * max g
    lo, hi = xs[keep[0]] - 0.05, xs[keep[-1]] + 0.05
    gx, gw = np.polynomial.legendre.leggauss(_GL_NODES)
    edges = np.linspace(lo, hi, _GL_PANELS + 1)
    half = 0.5 * np.diff(edges)
    mid = 0.5 * (edges[1:] + edges[:-1])
    x = (mid[:, None] + half[:, None] * gx[None, :]).ravel()
    w = (half[:, None] * gw[None, :]).ravel() * np.exp(_log_max_density(x, K))
    w /= w.sum()  # exact normalisation: P_correct + P_error == 1
    x.setflags(write=False)
    w.setflags(write=False)
    return x, w


def _moments(m: np.ndarray, K: int, chunk: int = 2048):
    """P_correct, P_error and dP_correct/dm at finite m >= 0 (1-D float64)."""
    x, w = _max_nodes(K)
    n = m.shape[0]
    pc = np.empty(n)
    pe = np.empty(n)
    dens = np.empty(n)
    for i in range(0, n, chunk):
        d = m[i : i + chunk, None] - x[None, :]
        small = 0.5 * erfc(np.abs(d) * _INV_SQRT2)  # the accurate (small) one of Phi(d), Phi(-d)
        pos = d >= 0
        pc[i : i + chunk] = np.where(pos, 1.0 - small, small) @ w
        pe[i : i + chunk] = np.where(pos, small, 1.0 - small) @ w
        dens[i : i + chunk] = np.exp(-0.5 * d * d - _LOG_SQRT_2PI) @ w
    return pc, pe, dens


def p_correct_exact(t: np.ndarray, K: int) -> np.ndarray:
    """P[argmax_k I_t^k = true token] by quadrature (numpy float64, any shape).

    ``t`` is clipped to [0, 1]; ``p_correct_exact(0) = 1/K``, ``(1) = 1``.
    """
    return _moment_exact(t, _check_vocab(K), which=0, at_one=1.0)


def _p_error_exact(t: np.ndarray, K: int) -> np.ndarray:
    """1 - P_correct with full relative precision near t = 1."""
    return _moment_exact(t, K, which=1, at_one=0.0)


def _moment_exact(t: np.ndarray, K: int, which: int, at_one: float) -> np.ndarray:
    """Element ``which`` of :func:`_moments` at m = t/(1 − t), with ``at_one`` at t = 1."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
    flat = t.ravel()
    out = np.full_like(flat, at_one)
    inner = flat < 1.0
    if inner.any():
        ti = flat[inner]
        out[inner] = _moments(ti / (1.0 - ti), K)[which]
    return out.reshape(t.shape)


def _m_max(K: int) -> float:
    return float(-math.sqrt(2.0) * ndtri(_TAIL / K))


@functools.lru_cache(maxsize=32)
def _decoding_error_table(K: int, grid_size: int):
    """Strictly increasing table (t, tau, dtau/dt), float64, ends at (1, 1, 0)."""
    m_max = _m_max(K)
    t_max = m_max / (1.0 + m_max)
    n_t = grid_size // 2
    n_m = grid_size - n_t
    t_a = np.linspace(0.0, t_max, n_t)
    m_b = np.linspace(0.0, m_max, n_m)
    t_b = m_b / (1.0 + m_b)
    t = np.unique(np.concatenate([t_a, t_b]))  # sorted
    m = t / (1.0 - t)
    pc, pe, dens = _moments(m, K)
    c = K / (K - 1.0)
    # Each form where it is accurate: P_correct - 1/K near tau=0, P_error near 1.
    tau = np.where(pc < 0.5, c * (pc - 1.0 / K), 1.0 - c * pe)
    tau[0] = 0.0
    dtau = c * dens * (1.0 + m) ** 2
    # Strictly increasing, strictly below 1 (then the end point (1, 1)).
    prev_max = np.maximum.accumulate(np.concatenate([[-np.inf], tau[:-1]]))
    keep = (tau > prev_max) & (tau < 1.0)
    t, tau, dtau = t[keep], tau[keep], dtau[keep]
    t = np.append(t, 1.0)
    tau = np.append(tau, 1.0)
    dtau = np.append(dtau, 0.0)
    for a in (t, tau, dtau):
        a.setflags(write=False)
    return t, tau, dtau


def _hermite_cells(x: np.ndarray, y: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Per-cell cubic coefficients (a, b, c, e) in s = (x - x_i)/h, monotone.

    y(s) = a + b s + c s^2 + e s^3 on each cell; node slopes are limited per
    cell (Fritsch-Carlson: alpha^2 + beta^2 <= 9) so every cubic is monotone.
    """
    h = np.diff(x)
    dy = np.diff(y)
    sec = dy / h
    d0 = np.maximum(d[:-1], 0.0)
    d1 = np.maximum(d[1:], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = d0 / sec
        beta = d1 / sec
        r2 = alpha * alpha + beta * beta
        scale = np.where(r2 > 9.0, 3.0 / np.sqrt(r2), 1.0)
    d0 = d0 * scale
    d1 = d1 * scale
    a = y[:-1]
    b = h * d0
    c = 3.0 * dy - 2.0 * h * d0 - h * d1
    e = -2.0 * dy + h * d0 + h * d1
    return np.stack([a, b, c, e, h], axis=0)


# --------------------------------------------------------------------------- #
# Schedules (torch)
# --------------------------------------------------------------------------- #


def _as_float_tensor(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        return torch.as_tensor(x, dtype=torch.float64)
    if not torch.is_floating_point(x):
        return x.to(torch.get_default_dtype())
    return x


def _work_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


class Schedule:
    """Maps interpolant time ``t`` to network time ``tau``; both in [0, 1].

    All methods are elementwise, accept any shape, clamp inputs to [0, 1] and
    return a tensor of the input's dtype on the input's device.
    """

    name: str = "schedule"

    def tau(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t(self, tau: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dtau_dt(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class UniformSchedule(Schedule):
    """``tau = t`` (the ablation ``time=uniform``)."""

    name = "uniform"

    def tau(self, t: torch.Tensor) -> torch.Tensor:
        return _as_float_tensor(t).clamp(0.0, 1.0)

    def t(self, tau: torch.Tensor) -> torch.Tensor:
        return _as_float_tensor(tau).clamp(0.0, 1.0)

    def dtau_dt(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(_as_float_tensor(t))


class DecodingErrorSchedule(Schedule):
    """``tau(t) = K/(K-1) (P_correct(t) - 1/K)`` for vocabulary size ``K``."""

    name = "decoding_error"

    def __init__(self, vocab_size: int, grid_size: int = 10_000):
        self.vocab_size = _check_vocab(vocab_size)
        if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or grid_size < 16:
            raise ConfigError(f"grid_size must be an integer >= 16, got {grid_size!r}")
        self.grid_size = int(grid_size)
        t, tau, dtau = _decoding_error_table(self.vocab_size, self.grid_size)
        self._np_t = t
        self._np_tau = tau
        self._np_cells = _hermite_cells(t, tau, dtau)
        self._tables: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, ...]] = {}

    def __repr__(self) -> str:
        return f"DecodingErrorSchedule(vocab_size={self.vocab_size}, grid_size={self.grid_size})"

    # -- tables on device ---------------------------------------------------- #
    def _table(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        tab = self._tables.get(key)
        if tab is None:
            conv = lambda a: torch.tensor(np.array(a), dtype=dtype, device=device)  # noqa: E731
            cells = conv(self._np_cells)
            tab = (conv(self._np_t), conv(self._np_tau), cells[0], cells[1], cells[2], cells[3], cells[4])
            self._tables[key] = tab
        return tab

    def _prep(self, x):
        x = _as_float_tensor(x)
        wd = _work_dtype(x.device)
        return x, x.to(wd).clamp(0.0, 1.0), self._table(x.device, wd)

    @staticmethod
    def _cell(nodes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        idx = torch.searchsorted(nodes, x.contiguous(), right=True) - 1
        return idx.clamp_(0, nodes.shape[0] - 2)

    # -- public API ------------------------------------------------------------ #
    def tau(self, t: torch.Tensor) -> torch.Tensor:
        t_in, x, (tn, yn, a, b, c, e, h) = self._prep(t)
        i = self._cell(tn, x.detach())
        s = (x - tn[i]) / h[i]
        y = a[i] + s * (b[i] + s * (c[i] + s * e[i]))
        y = y.clamp(0.0, 1.0)
        y = torch.where(x >= 1.0, torch.ones_like(y), y)
        return y.to(t_in.dtype)

    def dtau_dt(self, t: torch.Tensor) -> torch.Tensor:
        t_in, x, (tn, yn, a, b, c, e, h) = self._prep(t)
        with torch.no_grad():
            i = self._cell(tn, x)
            s = (x - tn[i]) / h[i]
            d = (b[i] + s * (2.0 * c[i] + 3.0 * e[i] * s)) / h[i]
            d = d.clamp_min(0.0)
        return d.to(t_in.dtype)

    def t(self, tau: torch.Tensor) -> torch.Tensor:
        tau_in, y, (tn, yn, a, b, c, e, h) = self._prep(tau)
        with torch.no_grad():
            yd = y.detach()
            i = self._cell(yn, yd)
            ai, bi, ci, ei = a[i], b[i], c[i], e[i]
            y0, y1 = yn[i], yn[i + 1]
            s = ((yd - y0) / (y1 - y0)).clamp(0.0, 1.0)
            lo = torch.zeros_like(s)
            hi = torch.ones_like(s)
            for _ in range(_NEWTON_ITERS):
                f = ai + s * (bi + s * (ci + s * ei)) - yd
                fp = bi + s * (2.0 * ci + 3.0 * ei * s)
                lo = torch.where(f < 0, s, lo)
                hi = torch.where(f > 0, s, hi)
                s_new = s - f / fp
                ok = (s_new > lo) & (s_new < hi)  # False for nan / inf
                s = torch.where(f == 0, s, torch.where(ok, s_new, 0.5 * (lo + hi)))
        if y.requires_grad and torch.is_grad_enabled():
            # One Newton step with the graph attached gives d s / d tau = 1 / y'(s).
            fp = bi + s * (2.0 * ci + 3.0 * ei * s)
            f = ai + s * (bi + s * (ci + s * ei)) - y
            step = torch.where(fp > 0, f / torch.where(fp > 0, fp, torch.ones_like(fp)), f * 0.0)
            s = s - step
        out = tn[i] + s * h[i]
        out = out.clamp(0.0, 1.0)
        out = torch.where(y >= 1.0, torch.ones_like(out), out)
        out = torch.where(y <= 0.0, torch.zeros_like(out), out)
        return out.to(tau_in.dtype)

    # -- probabilities (tests / plots) --------------------------------------- #
    def p_correct(self, t):
        """Interpolated P_correct(t); numpy in -> numpy out, torch in -> torch out."""
        K = self.vocab_size
        if isinstance(t, torch.Tensor):
            return 1.0 / K + (K - 1.0) / K * self.tau(t)
        tau = self.tau(torch.as_tensor(np.asarray(t, dtype=np.float64))).numpy()
        return 1.0 / K + (K - 1.0) / K * tau

    def p_error(self, t):
        """Interpolated P_error(t) = 1 - P_correct(t); numpy or torch like ``t``."""
        K = self.vocab_size
        if isinstance(t, torch.Tensor):
            return (K - 1.0) / K * (1.0 - self.tau(t))
        tau = self.tau(torch.as_tensor(np.asarray(t, dtype=np.float64))).numpy()
        return (K - 1.0) / K * (1.0 - tau)


def make_schedule(name: str, vocab_size: int) -> Schedule:
    """``"decoding_error"`` or ``"uniform"``; anything else raises ConfigError."""
    if name == "decoding_error":
        return DecodingErrorSchedule(vocab_size)
    if name == "uniform":
        return UniformSchedule()
    raise ConfigError(f"unknown time schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
