"""Baselines: autoregressive (AR), masked diffusion (MDLM) and uniform-state diffusion (Duo)."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fmlm.cli import main
from fmlm.config import build_config
from fmlm.data import PhrasesTask
from fmlm.methods import build_method
from fmlm.methods.ar import AR, filter_logits
from fmlm.methods.duo import Duo, uniform_nelbo_terms
from fmlm.methods.mdlm import MDLM
from fmlm.methods.sampling import gumbel_argmax
from fmlm.nn.causal import CausalTransformer
from fmlm.nn.dit import DiT

V, L = 7, 5


def perturb(net: nn.Module, scale: float = 0.1) -> nn.Module:
    """Random weights everywhere (zero-initialised layers included) so tests exercise the whole network."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def make(kind: str, vocab: int = V, seq_len: int = L, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "ar":
        return AR(CausalTransformer(vocab, seq_len, n_layers=2, d_model=32, n_heads=4), **kw)
    if kind == "mdlm":
        return MDLM(DiT(vocab + 1, seq_len, n_layers=2, d_model=32, n_heads=4, cond_dim=16), **kw)
    return Duo(DiT(vocab, seq_len, n_layers=2, d_model=32, n_heads=4, cond_dim=16), **kw)


KINDS = ["ar", "mdlm", "duo"]


# ----------------------------------------------------------------------------- interface
@pytest.mark.parametrize("kind", KINDS)
def test_loss_finite_backward_and_eval(kind):
    m = perturb(make(kind))
    ids = torch.randint(V, (6, L), generator=torch.Generator().manual_seed(0))
    loss, metrics = m.loss(ids, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    assert metrics["loss"].requires_grad is False
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    ev = m.eval_loss(ids, torch.Generator().manual_seed(0))
    key = "nll" if kind == "ar" else "nelbo"
    assert set(ev) == {key, "ppl"} and all(isinstance(v, float) for v in ev.values())
    assert ev["ppl"] == pytest.approx(math.exp(ev[key]))
    assert m.vocab_size == V


@pytest.mark.parametrize("kind", KINDS)
def test_sample_shapes_determinism_and_steps_validation(kind):
    m = perturb(make(kind)).eval()
    for steps in (1, 3):
        a = m.sample(5, L, steps, generator=torch.Generator().manual_seed(7))
        b = m.sample(5, L, steps, generator=torch.Generator().manual_seed(7))
        c = m.sample(5, L, steps, generator=torch.Generator().manual_seed(8))
        assert a.shape == (5, L) and a.dtype == torch.int64
        assert ((a >= 0) & (a < V)).all()
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    assert m.sample(3, L - 2, 2, generator=torch.Generator().manual_seed(0)).shape == (3, L - 2)
    assert m.sample(2, L, 2, generator=torch.Generator().manual_seed(0), float64=True).shape == (2, L)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            m.sample(2, L, bad)


def test_gumbel_argmax_is_categorical():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0]))
    for float64 in (False, True):
        draws = gumbel_argmax(logits.expand(40_000, 4), torch.Generator().manual_seed(0), float64)
        freq = torch.bincount(draws, minlength=4).double() / draws.numel()
        torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64), atol=0.01, rtol=0)


# ----------------------------------------------------------------------------- AR
def test_causal_transformer_is_causal_and_cache_matches():
    net = perturb(CausalTransformer(V, L, n_layers=2, d_model=32, n_heads=4)).eval()
    x = torch.randint(V + 1, (3, L), generator=torch.Generator().manual_seed(0))
    full = net(x)  # (B, L, V)
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % V
    torch.testing.assert_close(net(x2)[:, :-1], full[:, :-1])  # the future does not leak
    cache = net.new_cache(3)
    inc = torch.cat([net(x[:, :2], cache), net(x[:, 2:3], cache), net(x[:, 3:], cache)], dim=1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


def test_ar_likelihood_is_normalised():
    m = perturb(make("ar", vocab=3, seq_len=3), 0.3)
    seqs = torch.tensor(list(itertools.product(range(3), repeat=3)))
    logp = m.net(m._inputs(seqs)).log_softmax(-1).gather(-1, seqs[..., None]).squeeze(-1).sum(-1)  # log p(x)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    # eval_loss's NLL is the per-token mean of the same log-likelihood.
    assert m.eval_loss(seqs)["nll"] == pytest.approx(-logp.mean().item() / 3, rel=1e-5)


@pytest.mark.parametrize("opts", [{}, {"temperature": 0.7, "top_k": 3}, {"top_p": 0.8}, {"temperature": 0.0}])
def test_ar_kv_cache_sampler_equals_uncached(opts):
    m = perturb(make("ar"), 0.3).eval()
    a = m.sample(32, L, 1, generator=torch.Generator().manual_seed(3), **opts)
    b = m.sample(32, L, 1, generator=torch.Generator().manual_seed(3), use_cache=False, **opts)
    assert torch.equal(a, b)
    # steps is ignored: AR always decodes L positions one by one.
    c = m.sample(32, L, 99, generator=torch.Generator().manual_seed(3), **opts)
    assert torch.equal(a, c)


def test_ar_greedy_and_filters():
    m = perturb(make("ar"), 0.3).eval()
    g = m.sample(4, L, 1, temperature=0.0)
    logits = m.net(m._inputs(g))  # teacher-forced logits of the greedy sequence
    assert torch.equal(g, logits.argmax(-1))
    lg = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(lg, top_k=2)).tolist() == [[False, True, False, True]]
    # probabilities ~ [0.64, 0.09, 0.24, 0.03]: p = 0.7 keeps the two most likely tokens.
    assert torch.isinf(filter_logits(lg, top_p=0.7)).tolist() == [[False, True, False, True]]
    assert torch.isinf(filter_logits(lg, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert torch.equal(filter_logits(lg), lg)
    with pytest.raises(ValueError):
        m.sample(2, L, 1, top_p=0.0)


# ----------------------------------------------------------------------------- MDLM
def test_mdlm_one_step_unmasks_every_position():
    m = perturb(make("mdlm")).eval()
    out = m.sample(64, L, 1, generator=torch.Generator().manual_seed(0))
    assert (out != m.mask_id).all() and (out < V).all()


def test_mdlm_sampler_caches_unchanged_states():
    m = perturb(make("mdlm")).eval()
    calls = []
    forward = m.net.forward
    m.net.forward = lambda x, t, *a, **k: (calls.append(t.shape[0]), forward(x, t, *a, **k))[1]
    out = m.sample(1, 2, 100, generator=torch.Generator().manual_seed(0))
    # One row with two positions changes state at most twice: at most three network calls.
    assert len(calls) <= 3 and (out != m.mask_id).all()


def test_mdlm_position_embedding_breaks_the_all_mask_symmetry():
    z = torch.full((1, L), V)  # all mask
    bare = perturb(make("mdlm", position_embedding=False))
    out = bare.log_probs(z, torch.zeros(1))[0]  # (L, V + 1)
    # RoPE alone: identical inputs give identical outputs at every position.
    torch.testing.assert_close(out, out[:1].expand_as(out), atol=1e-5, rtol=1e-5)
    m = perturb(make("mdlm"))
    out = m.log_probs(z, torch.zeros(1))[0]
    assert (out[1:, :V] - out[:1, :V]).abs().amax() > 1e-3


def test_mdlm_corruption_and_subs():
    m = perturb(make("mdlm"))
    ids = torch.randint(V, (2000, L), generator=torch.Generator().manual_seed(0))
    t = torch.full((2000,), 0.3)
    z = m.corrupt(ids, t, torch.Generator().manual_seed(1))
    masked = z == m.mask_id
    assert masked.float().mean().item() == pytest.approx((1 - m.eps) * 0.3, abs=0.01)
    assert torch.equal(z[~masked], ids[~masked])
    logp = m.log_probs(z[:8], t[:8])
    assert torch.isinf(logp[..., m.mask_id]).all()  # never predicts the mask
    keep = ~masked[:8]
    assert torch.equal(logp.argmax(-1)[keep], z[:8][keep]) and (logp.exp().amax(-1)[keep] == 1).all()


# ----------------------------------------------------------------------------- NELBO bounds (exact)
# A two-sequence "phrases" distribution over V = 3, L = 2: the oracle knows it exactly.
DATA = torch.tensor([[0, 1], [2, 0]])
PROBS = torch.tensor([0.7, 0.3], dtype=torch.float64)
ENTROPY = float(-(PROBS * PROBS.log()).sum())
V3 = 3


class MaskOracle(nn.Module):
    """Exact p(x_l | unmasked part of z) of DATA, as logits over V3 + 1 (mask column unused)."""

    vocab_size = V3 + 1

    def forward(self, z, t):
        consistent = ((z[:, None, :] == DATA[None]) | (z[:, None, :] == V3)).all(-1)  # (B, K)
        w = PROBS[None] * consistent  # (B, K)
        post = torch.einsum("bk,klv->blv", w, nn.functional.one_hot(DATA, V3 + 1).double())
        return (post / w.sum(-1)[:, None, None]).log()


class UniformOracle(nn.Module):
    """Exact p(x_l | z_{-l}) of DATA under the uniform-state process: the optimum of the Duo NELBO.

    Not the posterior mean E[x_l | z]: the reverse rate needs p_t(z with z_l := y)/p_t(z), and
    p_t(z_l = y | z_{-l}) = q_t(y | p(x_l | z_{-l})), so x̂ must exclude z_l's own evidence.
    """

    vocab_size = V3

    def forward(self, z, t):
        a = (1.0 - t.double())[:, None, None]  # (B, 1, 1)
        q = a * (z[:, None, :] == DATA[None]) + (1 - a) / V3  # (B, K, L): q_t(z_l | x_l)
        out = []
        for l in range(DATA.shape[1]):
            w = PROBS[None] * q[..., [m for m in range(DATA.shape[1]) if m != l]].prod(-1)  # (B, K)
            out.append(w @ nn.functional.one_hot(DATA[:, l], V3).double() / w.sum(-1, keepdim=True))
        return torch.stack(out, 1).log()  # (B, L, V3)


class Uniform(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab_size = vocab

    def forward(self, z, t):
        return torch.zeros(*z.shape, self.vocab_size)


def exact_nelbo(method, states: int, q_fn, nodes: int = 96) -> float:
    """E_{x ~ DATA}[NELBO(x)] per sequence: Gauss-Legendre in t, exact sum over every z_t."""
    u, w = np.polynomial.legendre.leggauss(nodes)
    # t = s², concentrating nodes near t = 0 where the uniform-state integrand has log terms.
    s, ws = (u + 1) / 2, w / 2
    t, wt = torch.tensor(s**2), torch.tensor(ws * 2 * s)
    zs = torch.tensor(list(itertools.product(range(states), repeat=DATA.shape[1])))  # (Z, L)
    total = 0.0
    for x, p in zip(DATA, PROBS):
        tt = t.repeat_interleave(len(zs))  # (N·Z,)
        zz = zs.repeat(len(t), 1)
        ids = x.expand_as(zz)
        weight = q_fn(ids, zz, tt) * wt.repeat_interleave(len(zs))
        keep = weight > 0  # states x cannot reach have no posterior under the oracle
        tt, zz, ids, weight = tt[keep], zz[keep], ids[keep], weight[keep]
        vals = method.nelbo_given(ids, zz, tt.float()).detach().double()
        total += p.item() * float((weight * vals).sum())
    return total


def mask_q(ids, z, t):
    """q_t(z | x) of MDLM with eps = 0: mask with probability t, independently."""
    t = t[:, None]
    return torch.where(z == V3, t, (1 - t) * (z == ids)).prod(-1)


def uniform_q(ids, z, t):
    a = (1 - t)[:, None]
    return (a * (z == ids) + (1 - a) / V3).prod(-1)


def test_mdlm_nelbo_is_a_bound_and_tight_for_the_oracle():
    oracle = exact_nelbo(MDLM(MaskOracle(), eps=0.0, position_embedding=False), V3 + 1, mask_q)
    uniform = exact_nelbo(MDLM(Uniform(V3 + 1), eps=0.0, position_embedding=False), V3 + 1, mask_q)
    net = perturb(DiT(V3 + 1, 2, n_layers=2, d_model=32, n_heads=4, cond_dim=16), 0.3)
    random = exact_nelbo(MDLM(net, eps=0.0), V3 + 1, mask_q)
    # With exact conditionals every unmasking order is the chain rule: NELBO(x) = -log p(x).
    assert oracle == pytest.approx(ENTROPY, abs=1e-4)
    assert uniform == pytest.approx(2 * math.log(V3), abs=1e-4)
    assert random > ENTROPY + 0.05 and uniform > ENTROPY + 0.05


def test_duo_nelbo_is_a_bound_and_tight_for_the_oracle():
    oracle = exact_nelbo(Duo(UniformOracle()), V3, uniform_q)
    uniform = exact_nelbo(Duo(Uniform(V3)), V3, uniform_q)
    net = perturb(DiT(V3, 2, n_layers=2, d_model=32, n_heads=4, cond_dim=16), 0.3)
    random = exact_nelbo(Duo(net), V3, uniform_q)
    # The exact reverse rates make the path KL equal to -log p(x); a stationary (uniform)
    # model gives exactly L·log V; anything else is a strict bound.
    assert oracle == pytest.approx(ENTROPY, abs=1e-4)
    assert uniform == pytest.approx(2 * math.log(V3), abs=1e-4)
    assert random > ENTROPY + 0.05 and uniform > ENTROPY + 0.05


def test_uniform_nelbo_terms_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(V, (4, L), generator=g)
    z = torch.randint(V, (4, L), generator=g)
    a = torch.rand(4, generator=g, dtype=torch.float64) * 0.9 + 0.05
    da = -torch.ones(4, dtype=torch.float64)
    log_x = torch.randn(4, L, V, generator=g, dtype=torch.float64).log_softmax(-1)
    terms = uniform_nelbo_terms(log_x, x, z, a, da)
    assert (terms >= 0).all()
    # The UDLM closed form: c·[V/x̄θ_z − V/x̄_z + Σ_y (x̄_y/x̄_z)·log(x̄_y·x̄θ_z/(x̄_z·x̄θ_y))].
    A = a[:, None, None]
    bar = V * A * nn.functional.one_hot(x, V) + (1 - A)
    bar_t = V * A * log_x.exp() + (1 - A)
    bz, btz = bar.gather(-1, z[..., None]), bar_t.gather(-1, z[..., None])
    ref = V / btz[..., 0] - V / bz[..., 0] + (bar / bz * (bar * btz / (bz * bar_t)).log()).sum(-1)
    torch.testing.assert_close(terms, ref / (V * a[:, None]))
    # Zero iff the model predicts the clean token with certainty.
    sure = nn.functional.one_hot(x, V).double().clamp_min(1e-300).log()
    assert uniform_nelbo_terms(sure, x, z, a, da).abs().max() < 1e-10


# ----------------------------------------------------------------------------- Duo
def test_duo_corruption_and_greedy_tail():
    m = perturb(make("duo")).eval()
    ids = torch.randint(V, (4000, L), generator=torch.Generator().manual_seed(0))
    z = m.corrupt(ids, torch.full((4000,), 0.4), torch.Generator().manual_seed(1))
    # P(z = x) = α + (1 − α)/V with α = 0.6.
    assert (z == ids).double().mean().item() == pytest.approx(0.6 + 0.4 / V, abs=0.01)
    greedy = m.sample(8, L, 1, generator=torch.Generator().manual_seed(0))
    # At one step the greedy tail is argmax x̂(z_1) for the same uniform z_1.
    z1 = torch.randint(V, (8, L), generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, m.log_xhat(z1, torch.ones(8)).argmax(-1))
    ancestral = m.sample(8, L, 1, generator=torch.Generator().manual_seed(0), greedy_tail=False)
    assert ancestral.shape == (8, L)


def test_duo_greedy_tail_modes():
    # An uninformative model (x̂ uniform): the last step's posterior mode keeps the current
    # token (its own evidence), argmax x̂ returns the first id everywhere.
    net = Uniform(V)
    net.dummy = nn.Parameter(torch.zeros(()))  # gives the sampler a device
    states = []
    post = Duo(net).sample(
        6, L, 2, generator=torch.Generator().manual_seed(0), callback=lambda i, z, x: states.append(z.clone())
    )
    assert torch.equal(post, states[-1])
    xhat = Duo(net, greedy_of="xhat").sample(6, L, 2, generator=torch.Generator().manual_seed(0))
    assert (xhat == 0).all()
    with pytest.raises(ValueError):
        Duo(net, greedy_of="mode")


def test_duo_curriculum_relaxation_matches_the_uniform_marginal():
    m = make("duo", curriculum_steps=3)
    ids = torch.zeros(20_000, 1, dtype=torch.long)
    t = torch.full((20_000,), 0.5)
    x_in, z = m.relaxed(ids, t, 0.1, torch.Generator().manual_seed(0))
    assert x_in.shape == (20_000, 1, V)
    torch.testing.assert_close(x_in.sum(-1), torch.ones(20_000, 1))
    # argmax of the Gaussian latent has the uniform-state law with α_t = 0.5.
    assert (z == 0).double().mean().item() == pytest.approx(0.5 + 0.5 / V, abs=0.01)
    m.train()
    batch = torch.randint(V, (8, L), generator=torch.Generator().manual_seed(0))
    temps = []
    for i in range(4):
        temps.append(m.loss(batch, torch.Generator().manual_seed(i))[1]["curriculum_temperature"])
        m.on_step_end()
    assert temps[0] == pytest.approx(0.1) and temps[1] < temps[0] and temps[3] == 0.0
    assert int(m.curriculum_step) == 4 and "curriculum_step" in m.state_dict()


# ----------------------------------------------------------------------------- learning
@pytest.mark.parametrize("kind", KINDS)
def test_loss_falls_on_phrases(kind):
    task = PhrasesTask(n=4, k=2, phrases_per_seq=2)
    vocab = task.tokenizer.vocab_size
    m = make(kind, vocab=vocab, seq_len=task.seq_len)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    data_gen, noise_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    val = task.sample(512, torch.Generator().manual_seed(99))
    key = "nll" if kind == "ar" else "nelbo"
    before = m.eval_loss(val, torch.Generator().manual_seed(5))[key]
    for _ in range(60):
        loss, _ = m.loss(task.sample(64, data_gen), noise_gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = m.eval_loss(val, torch.Generator().manual_seed(5))[key]
    assert math.isfinite(after) and after < before - 0.3, (before, after)
    # The data's entropy per token is log(4)/2 = 0.69 nats; a bound cannot go below it by much.
    assert after > 0.5 * math.log(4) / 2


# ----------------------------------------------------------------------------- registry and CLI
@pytest.mark.parametrize("kind", KINDS)
def test_registry_builds_each_method(kind):
    cfg = build_config("tiny", [f"train.method={kind}"])
    cfg.model.vocab_size, cfg.model.max_seq_len = 9, 4
    m = build_method(cfg)
    assert m.vocab_size == 9
    assert isinstance(m, {"ar": AR, "mdlm": MDLM, "duo": Duo}[kind])
    ids = torch.randint(9, (3, 4))
    assert torch.isfinite(m.loss(ids, torch.Generator().manual_seed(0))[0])


@pytest.mark.parametrize("kind", KINDS)
def test_cli_train_and_sample(kind, tmp_path, capsys):
    run = tmp_path / kind
    # eval_every > max_steps: one (final) evaluation, which must report the method's metrics.
    code = main(
        [
            "train",
            "tiny",
            "threads=1",
            f"train.method={kind}",
            "max_steps=6",
            "eval_every=100",
            "eval_batches=1",
            f"data.cache_dir={tmp_path}",
            "--run-dir",
            str(run),
            "--quiet",
            "--no-samples",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert ("val_nll" if kind == "ar" else "val_nelbo") in summary and "val_ppl" in summary
    code = main(["sample", "--ckpt", str(run), "--steps", "1,4", "-n", "8", "--check", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)["results"]
    assert [r["steps"] for r in res] == [1, 4] and all(0 <= r["valid_rate"] <= 1 for r in res)
