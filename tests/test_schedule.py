"""Tests for fmlm.schedule (decoding-error time reparameterisation)."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.special import log_ndtr, ndtr, ndtri

from fmlm import schedule as sched_mod
from fmlm.errors import ConfigError
from fmlm.schedule import (
    DecodingErrorSchedule,
    Schedule,
    UniformSchedule,
    make_schedule,
    p_correct_exact,
)

KS = [2, 3, 27, 1000, 30522, 50257, 262144]
F64 = torch.float64

# 1 - tau below this is not resolvable well enough in float64 for the inverse
# to be well conditioned (tau saturates at exactly 1.0 soon after, e.g. at
# t ~ 0.92 for K = 2): there the round trip is checked in tau instead of t.
RESOLVABLE = 1e-12


@pytest.fixture(scope="module", params=KS, ids=lambda k: f"K{k}")
def sched(request):
    return DecodingErrorSchedule(request.param)


def _t_grid(n=20001):
    """t in [0, 1): uniform plus points crowding t -> 1."""
    g = np.concatenate([np.linspace(0.0, 1.0, n)[:-1], 1.0 - np.logspace(-1, -9, 400)])
    return torch.from_numpy(np.unique(g))


def _tau_exact(t: np.ndarray, K: int) -> np.ndarray:
    return K / (K - 1.0) * (p_correct_exact(t, K) - 1.0 / K)


def _quad_p_correct(t: float, K: int) -> float:
    """E_Z[Phi(Z + m)^(K-1)] by adaptive quadrature, integrand in log space."""
    m = t / (1.0 - t)

    def f(z):
        return math.exp(-0.5 * z * z - 0.5 * math.log(2 * math.pi) + (K - 1) * log_ndtr(z + m))

    z0 = float(ndtri(0.5 ** (1.0 / (K - 1)))) - m  # where Phi(z+m)^(K-1) = 1/2
    pts = [p for p in (z0 - 3, z0 - 1, z0, z0 + 1, z0 + 3, 0.0) if -38 < p < 38]
    val, _ = integrate.quad(f, -40.0, 40.0, points=sorted(set(pts)), limit=500, epsabs=1e-15, epsrel=1e-13)
    return val


# --------------------------------------------------------------------------- #
# Endpoints, monotonicity, inverse
# --------------------------------------------------------------------------- #


def test_endpoints(sched):
    zero = torch.zeros((), dtype=F64)
    one = torch.ones((), dtype=F64)
    assert sched.tau(zero).item() == 0.0
    assert sched.tau(one).item() == 1.0
    assert sched.t(zero).item() == 0.0
    assert sched.t(one).item() == 1.0
    for dt in (torch.float32, F64):
        x = torch.tensor([0.0, 1.0], dtype=dt)
        assert sched.tau(x).tolist() == [0.0, 1.0]
        assert sched.t(x).tolist() == [0.0, 1.0]


def test_tau_strictly_increasing(sched):
    t = _t_grid()
    tau = sched.tau(t)
    d = torch.diff(tau)
    assert (d >= 0).all()
    resolvable = tau[1:] < 1.0 - RESOLVABLE
    assert resolvable.sum() > 0.85 * len(d)
    assert (d[resolvable] > 0).all()
    assert (tau >= 0).all() and (tau <= 1).all()


def test_roundtrip_t(sched):
    K = sched.vocab_size
    t = _t_grid()
    tau = sched.tau(t)
    back = sched.t(tau)
    ok = tau < 1.0 - RESOLVABLE
    err = (back - t).abs()
    assert err[ok].max().item() < 1e-4
    # Where tau is (nearly) saturated, t is ill-conditioned; tau must still match.
    assert (sched.tau(back) - tau).abs().max().item() < 1e-13
    # Inverse applied to the exact (quadrature) tau also recovers t.
    tn = t.numpy()
    te = _tau_exact(tn, K)
    ok2 = te < 1.0 - 1e-9
    back2 = sched.t(torch.from_numpy(te)).numpy()
    assert np.abs(back2 - tn)[ok2].max() < 1e-4, K


def test_roundtrip_tau(sched):
    tau = torch.linspace(0.0, 1.0, 20001, dtype=F64)
    assert (sched.tau(sched.t(tau)) - tau).abs().max().item() < 1e-12


def test_roundtrip_float32(sched):
    t = _t_grid(4001).float()
    tau = sched.tau(t)
    assert tau.dtype == torch.float32
    back = sched.t(tau)
    ok = tau < 1.0 - 1e-4
    assert (back - t).abs()[ok].max().item() < 1e-4


def test_inverse_monotone(sched):
    for dt in (F64, torch.float32):
        tau = torch.linspace(0.0, 1.0, 200001, dtype=dt)
        t = sched.t(tau)
        assert (torch.diff(t) >= 0).all()
        assert t[0].item() == 0.0 and t[-1].item() == 1.0


# --------------------------------------------------------------------------- #
# Correctness of P_correct
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("K", [2, 27, 1000, 262144])
def test_against_adaptive_quad(K):
    s = DecodingErrorSchedule(K)
    ts = np.array([0.0, 0.05, 0.3, 0.6, 0.75, 0.82, 0.88, 0.93])
    ref = np.array([_quad_p_correct(t, K) for t in ts])
    assert abs(ref[0] - 1.0 / K) < 1e-13
    assert np.abs(p_correct_exact(ts, K) - ref).max() < 1e-12
    assert np.abs(s.p_correct(ts) - ref).max() < 1e-9
    assert np.abs(s.p_error(ts) - (1.0 - ref)).max() < 1e-9


@pytest.mark.parametrize(
    "K,ts,rows",
    [
        (2, [0.1, 0.4, 0.7], 200_000),
        (10, [0.2, 0.5, 0.75], 200_000),
        (1000, [0.5, 0.7, 0.8, 0.87], 10_000),
    ],
)
def test_monte_carlo(K, ts, rows):
    s = DecodingErrorSchedule(K)
    g = torch.Generator().manual_seed(1234 + K)
    for t in ts:
        x1 = torch.randint(0, K, (rows,), generator=g)
        x0 = torch.randn(rows, K, generator=g, dtype=F64)
        it = (1 - t) * x0
        it[torch.arange(rows), x1] += t
        p_hat = (it.argmax(dim=1) == x1).double().mean().item()
        p = float(s.p_correct(torch.tensor(t, dtype=F64)))
        se = math.sqrt(p * (1 - p) / rows)
        assert abs(p_hat - p) < 4 * se, (K, t, p_hat, p, se)


def test_k2_closed_form():
    """K = 2: P[t + (1-t) e1 > (1-t) e2] = P[e2 - e1 < m] = Phi(m / sqrt 2)."""
    s = DecodingErrorSchedule(2)
    t = np.linspace(0.0, 0.999, 5001)
    m = t / (1 - t)
    ref = ndtr(m / math.sqrt(2.0))
    assert np.abs(p_correct_exact(t, 2) - ref).max() < 1e-13
    assert np.abs(s.p_correct(t) - ref).max() < 1e-6
    pt = s.p_correct(torch.from_numpy(t))
    assert isinstance(pt, torch.Tensor)
    assert (pt - torch.from_numpy(ref)).abs().max().item() < 1e-6
    # p_error in the tail: relative accuracy while resolvable.
    sel = ref < 0.999999
    pe = s.p_error(t)
    assert np.abs(pe - ndtr(-m / math.sqrt(2.0)))[sel].max() < 1e-6
    # tau = 2 Phi(m/sqrt 2) - 1 = erf(m/2)
    assert abs(float(s.tau(torch.tensor(0.5, dtype=F64))) - math.erf(0.5)) < 1e-12


def test_p_correct_exact_limits():
    for K in (2, 50257):
        p = p_correct_exact(np.array([[0.0, 1.0], [-1.0, 2.0]]), K)
        assert p.shape == (2, 2)
        assert abs(p[0, 0] - 1.0 / K) < 1e-14 and p[0, 1] == 1.0
        assert abs(p[1, 0] - 1.0 / K) < 1e-14 and p[1, 1] == 1.0


# --------------------------------------------------------------------------- #
# Derivative
# --------------------------------------------------------------------------- #


def test_dtau_dt_finite_differences(sched):
    K = sched.vocab_size
    t = torch.linspace(1e-3, 0.999, 4001, dtype=F64)
    d = sched.dtau_dt(t)
    tau = sched.tau(t)
    assert (d >= 0).all()
    assert (d[tau < 1 - 1e-9] > 0).all()
    assert sched.dtau_dt(torch.tensor([1.0], dtype=F64)).item() == 0.0
    # Against central differences of the interpolant.
    h = 1e-6
    fd = (sched.tau(t + h) - sched.tau(t - h)) / (2 * h)
    assert ((d - fd).abs() <= 1e-5 * d.abs().max() + 1e-4 * d.abs()).all()
    # Against central differences of the exact quadrature (independent check).
    tn = np.linspace(0.01, 0.95, 300)
    h = 1e-5
    fde = (_tau_exact(tn + h, K) - _tau_exact(tn - h, K)) / (2 * h)
    de = sched.dtau_dt(torch.from_numpy(tn)).numpy()
    assert np.all(np.abs(de - fde) <= 1e-7 * np.abs(fde).max() + 1e-6 * np.abs(fde))


def test_autograd(sched):
    t = torch.linspace(0.02, 0.9, 50, dtype=F64, requires_grad=True)
    tau = sched.tau(t)
    (g,) = torch.autograd.grad(tau.sum(), t)
    d = sched.dtau_dt(t.detach())
    assert torch.allclose(g, d, rtol=1e-9, atol=0)
    # Gradient of the inverse is 1 / tau'(t(tau)).
    taus = torch.linspace(0.05, 0.95, 50, dtype=F64, requires_grad=True)
    tt = sched.t(taus)
    (gi,) = torch.autograd.grad(tt.sum(), taus)
    assert torch.allclose(gi, 1.0 / sched.dtau_dt(tt.detach()), rtol=1e-6)


# --------------------------------------------------------------------------- #
# Shapes, dtypes, clamping, misc
# --------------------------------------------------------------------------- #


def test_shape_dtype_clamp():
    s = DecodingErrorSchedule(1000)
    for dt in (torch.float32, F64):
        x = torch.rand(3, 4, 5, dtype=dt)
        for f in (s.tau, s.t, s.dtau_dt):
            y = f(x)
            assert y.shape == x.shape and y.dtype == dt and y.device == x.device
    x = torch.tensor([-0.5, 1.5], dtype=F64)
    assert s.tau(x).tolist() == [0.0, 1.0]
    assert s.t(x).tolist() == [0.0, 1.0]
    assert s.t(torch.tensor([], dtype=F64)).shape == (0,)
    assert isinstance(s.p_correct(np.array([0.3, 0.5])), np.ndarray)
    assert s.name == "decoding_error" and isinstance(s, Schedule)


def test_large_k_transition_location():
    """Larger K moves the transition towards t = 1."""
    mids = [DecodingErrorSchedule(K).t(torch.tensor(0.5, dtype=F64)).item() for K in KS]
    assert all(a < b for a, b in zip(mids, mids[1:]))


def test_table_is_cached():
    """Built once per (K, n), then the same object (its speed is a benchmark's business, not a test's:
    a timed assertion fails on a loaded machine)."""
    K, n = 262144, 10_000
    sched_mod._decoding_error_table.cache_clear()
    sched_mod._max_nodes.cache_clear()
    a = sched_mod._decoding_error_table(K, n)
    assert sched_mod._decoding_error_table.cache_info().misses == 1
    assert sched_mod._decoding_error_table(K, n) is a
    t, tau, d = a
    assert np.all(np.diff(t) > 0) and np.all(np.diff(tau) > 0)
    assert t[0] == 0.0 and tau[0] == 0.0 and t[-1] == 1.0 and tau[-1] == 1.0


def test_uniform_and_factory():
    u = UniformSchedule()
    x = torch.tensor([-0.2, 0.0, 0.3, 1.0, 1.2], dtype=torch.float32)
    c = x.clamp(0, 1)
    assert torch.equal(u.tau(x), c) and torch.equal(u.t(x), c)
    assert torch.equal(u.dtau_dt(x), torch.ones_like(x))
    assert u.name == "uniform"
    assert isinstance(make_schedule("uniform", 100), UniformSchedule)
    d = make_schedule("decoding_error", 100)
    assert isinstance(d, DecodingErrorSchedule) and d.vocab_size == 100
    with pytest.raises(ConfigError):
        make_schedule("cosine", 100)
    with pytest.raises(ConfigError):
        DecodingErrorSchedule(1)
