"""The embedded-noise path agrees with the V-space reference in distribution, loss and gradient."""

import math

import pytest
import torch

from fmlm.methods.embedded import EmbeddedState, embedded_noise
from fmlm.methods.flm import FLM
from fmlm.methods.fmlm import FMLM
from fmlm.nn.dit import DiT
from fmlm.schedule import make_schedule

V, D, L = 40, 6, 4


def _embeds(*dims, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(V, d, generator=g) for d in dims]


def test_joint_moments_match_the_stacked_covariance():
    E1, E2 = _embeds(D, 5)
    N = 40_000
    y1, y2 = embedded_noise([E1, E2], (N,), torch.Generator().manual_seed(1))
    Y = torch.cat([y1, y2], dim=1).double()
    W = torch.cat([E1, E2], dim=1).double()
    C = W.t() @ W  # covariance of x0 @ W, x0 ~ N(0, I_V)
    d = torch.diagonal(C)
    se_mean = (d / N).sqrt()
    assert (Y.mean(0).abs() < 5 * se_mean).all()
    emp = Y.t() @ Y / N
    se_cov = ((d[:, None] * d[None, :] + C**2) / N).sqrt()
    assert ((emp - C).abs() < 5 * se_cov).all()


def test_equal_embeddings_get_equal_noise_and_small_vocabularies_draw_x0():
    (E,) = _embeds(D)
    a, b = embedded_noise([E, E.clone()], (3, L), torch.Generator().manual_seed(0))
    assert torch.equal(a, b)  # a student that is still an exact copy of its teacher
    big = torch.randn(V, 2 * V)  # d > V: drawing x0 itself is exact and cheaper
    (y,) = embedded_noise([big], (3, L), torch.Generator().manual_seed(0))
    x0 = torch.randn(3, L, V, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(y, x0 @ big, atol=1e-5)


def test_embedded_path_never_draws_vocab_sized_noise(randn_shapes):
    flm = _flm()
    shapes = randn_shapes
    flm.noise = "embedded"
    flm.loss(torch.randint(V, (2, L)), torch.Generator().manual_seed(0))
    assert shapes and all(s[-1] != V for s in shapes), shapes
    shapes.clear()
    flm.noise = "vocab"
    flm.loss(torch.randint(V, (2, L)), torch.Generator().manual_seed(0))
    assert any(s[-1] == V for s in shapes)


def _flm(seed=0):
    torch.manual_seed(seed)
    net = DiT(V, L, n_layers=1, d_model=D, n_heads=1, cond_dim=8)
    with torch.no_grad():
        net.embed.normal_(0, 0.5)  # large enough for the noise to matter
        for b in net.blocks:  # leave adaLN-zero: a non-trivial block
            b.ada.weight.normal_(0, 0.3)
        net.ada_out.weight.normal_(0, 0.3)
    return FLM(net, make_schedule("decoding_error", V))


def _estimates(method, params, noise, ids, reps):
    """Per-draw losses (reps,) and flattened gradients (reps, P) with fresh noise each time."""
    method.noise = noise
    losses, grads = [], []
    for r in range(reps):
        loss, _ = method.loss(ids, torch.Generator().manual_seed(10_000 + r))
        g = torch.autograd.grad(loss, params, allow_unused=True)
        losses.append(loss.detach())
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)]))
    return torch.stack(losses).double(), torch.stack(grads).double()


def _assert_same_expectation(method, params, ids, reps, emb_rows=None):
    lv, gv = _estimates(method, params, "vocab", ids, reps)
    le, ge = _estimates(method, params, "embedded", ids, reps)
    z_loss = (le.mean() - lv.mean()) / ((le.var() + lv.var()) / reps).sqrt()
    assert abs(z_loss) < 4.5, float(z_loss)
    se = ((ge.var(0) + gv.var(0)) / reps).sqrt()
    keep = se > 1e-9
    z = (ge.mean(0) - gv.mean(0))[keep] / se[keep]
    # Each z is ~N(0, 1) if the expectations agree: their mean square is ~1 whatever their correlation.
    assert 0.5 < z.pow(2).mean() < 1.7, float(z.pow(2).mean())
    if emb_rows is not None:  # the input embedding, whose gradient the trick changes most
        ze = ((ge.mean(0) - gv.mean(0)) / se.clamp_min(1e-12))[emb_rows]
        assert ze.pow(2).mean() < 1.9, float(ze.pow(2).mean())
    # The conditional-expectation gradient has no more variance than the reference (up to MC error).
    assert ge.var(0).sum() <= 1.15 * gv.var(0).sum()


@pytest.mark.slow
def test_flm_loss_and_gradient_agree_in_expectation():
    flm = _flm()
    params = [p for p in flm.parameters() if p.requires_grad]
    ids = torch.randint(V, (8, L), generator=torch.Generator().manual_seed(3))
    _assert_same_expectation(flm, params, ids, reps=400, emb_rows=slice(0, V * D))


@pytest.mark.slow
@pytest.mark.parametrize("objective,teacher", [("semigroup", False), ("semigroup", True), ("eulerian", True)])
def test_distillation_loss_and_gradient_agree_in_expectation(objective, teacher):
    """Self-distillation: the stop-gradient target is the student itself on the same noise (the case where
    back-propagating through the Cholesky factor would be biased); with a teacher, two embeddings are drawn
    jointly from the stacked covariance."""
    flm = _flm(seed=1)
    torch.manual_seed(2)
    net = DiT(V, L, n_layers=1, d_model=D, n_heads=1, cond_dim=8, two_time=True)
    if teacher:
        fm = FMLM.from_teacher(flm, net, objective=objective, diag_fraction=0.25)
    else:
        fm = FMLM(net, flm.schedule, objective=objective, diag_fraction=0.25)
    with torch.no_grad():  # a student that has moved away from its teacher
        net.embed.copy_(flm.net.embed + 0.3 * torch.randn_like(net.embed))
        net.time2.mlp[-1].weight.normal_(0, 0.3)
        net.ada_out.weight.normal_(0, 0.3)
    params = [p for p in fm.parameters() if p.requires_grad]
    ids = torch.randint(V, (8, L), generator=torch.Generator().manual_seed(4))
    _assert_same_expectation(fm, params, ids, reps=100 if objective == "eulerian" else 200, emb_rows=slice(0, V * D))


def test_embedded_state_is_affine():
    E1, E2 = _embeds(D, 3)
    x = torch.randn(2, L, V)
    p = torch.rand(2, L, V).softmax(-1)
    state = EmbeddedState(lambda E: x @ E)
    a, b = torch.tensor([0.3, 0.7])[:, None, None], torch.tensor([0.5, 0.2])[:, None, None]
    moved = state.affine(a, b, p)
    for E in (E1, E2):
        assert torch.allclose(moved.embed(E), (a * x + b * p) @ E, atol=1e-5)
    assert math.isclose(float(moved.embed(E1).sum()), float(((a * x + b * p) @ E1).sum()), rel_tol=1e-4)
