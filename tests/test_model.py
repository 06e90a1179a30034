"""Backbone (DiT) and FLM method: shapes, invariants, loss, sampler."""

import math

import pytest
import torch
import torch.nn.functional as F

from fmlm.errors import FmlmError
from fmlm.methods.flm import FLM, euler_sample, stratified_uniform
from fmlm.nn.dit import DiT
from fmlm.schedule import make_schedule

V, L = 11, 6


def tiny(two_time=False, **kw):
    torch.manual_seed(0)
    return DiT(V, L, n_layers=2, d_model=32, n_heads=4, cond_dim=16, two_time=two_time, **kw)


def perturb(net):
    """Give every zero-initialised layer random weights so tests exercise the full network."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_shapes_ids_and_vectors_agree_on_one_hot():
    net = tiny()
    perturb(net)
    ids = torch.randint(0, V, (3, L))
    tau = torch.rand(3)
    a = net(ids, tau)
    b = net(F.one_hot(ids, V).float(), tau)
    assert a.shape == (3, L, V)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Arbitrary points of R^V are accepted (noisy one-hot), and embedded inputs too.
    x = torch.randn(3, L, V)
    torch.testing.assert_close(net(x, tau), net(None, tau, embedded=x @ net.embed), atol=1e-5, rtol=1e-5)


def test_input_layer_is_linear_and_bias_free():
    net = tiny()
    perturb(net)
    x, y = torch.randn(2, L, V), torch.randn(2, L, V)
    torch.testing.assert_close(
        net.embed_input(2 * x + 3 * y), 2 * net.embed_input(x) + 3 * net.embed_input(y), atol=1e-5, rtol=1e-5
    )
    assert net.embed_input(torch.zeros(1, L, V)).abs().max() == 0


def test_logit_soft_cap():
    net = tiny(logit_cap=0.5)
    perturb(net)
    out = net(torch.randn(2, L, V) * 100, torch.rand(2))
    assert out.abs().max() <= 0.5 + 1e-6


def test_time_conditioning_matters_and_bidirectional():
    net = tiny()
    perturb(net)
    x = torch.randn(1, L, V)
    assert not torch.allclose(net(x, torch.tensor([0.1])), net(x, torch.tensor([0.9])))
    # Changing the last position changes the output at the first one: attention is bidirectional.
    x2 = x.clone()
    x2[0, -1] += 1.0
    assert not torch.allclose(net(x, torch.tensor([0.5]))[0, 0], net(x2, torch.tensor([0.5]))[0, 0])


def test_two_time_student_starts_equal_to_teacher():
    teacher = tiny()
    perturb(teacher)
    student = tiny(two_time=True)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("time2.") for k in missing)
    student.zero_second_time()
    x, s, t = torch.randn(4, L, V), torch.rand(4), torch.rand(4)
    torch.testing.assert_close(student(x, s, t), teacher(x, s))
    with pytest.raises(ValueError):
        student(x, s)
    with pytest.raises(ValueError):
        teacher(x, s, t)


def test_sequence_longer_than_maximum_is_a_clear_error():
    net = tiny()
    with pytest.raises(FmlmError, match="exceeds the model's maximum"):
        net(torch.zeros(1, L + 1, dtype=torch.long), torch.zeros(1))


def test_stratified_uniform_covers_unit_interval():
    g = torch.Generator().manual_seed(0)
    tau = stratified_uniform(8, g)
    assert tau.min() >= 0 and tau.max() < 1
    # exactly one sample per stratum [i/8, (i+1)/8)
    assert sorted((tau * 8).floor().long().tolist()) == list(range(8))


@pytest.mark.parametrize("loss", ["ce", "mse_denoiser", "mse_velocity"])
def test_losses_finite_and_differentiable(loss):
    m = FLM(tiny(), make_schedule("decoding_error", V), loss)
    ids = torch.randint(0, V, (4, L))
    value, metrics = m.loss(ids, torch.Generator().manual_seed(0))
    assert torch.isfinite(value)
    value.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.net.embed.grad is not None and m.net.embed.grad.abs().sum() > 0


def test_ce_at_init_is_log_vocab():
    # The output layer is small at init, so D is close to uniform and CE ~ log V.
    m = FLM(tiny(), make_schedule("decoding_error", V))
    value, _ = m.loss(torch.randint(0, V, (16, L)), torch.Generator().manual_seed(0))
    assert abs(value.item() - math.log(V)) < 0.1


def _oracle(phrases: torch.Tensor, schedule):
    """Exact denoiser for data uniform over a few whole sequences ``phrases`` (n, L).

    p(j | I_t = x) ∝ exp(−‖x − t·onehot(phrase_j)‖² / (2(1 − t)²)); D is the
    per-position marginal of that posterior.
    """
    onehots = F.one_hot(phrases, V).double()  # (n, L, V)

    def denoiser(z, tau):
        t = schedule.t(tau.double())[:, None, None, None]  # (B,1,1,1)
        diff = z.double()[:, None] - t * onehots[None]  # (B, n, L, V)
        logp = -(diff**2).sum((-1, -2)) / (2 * (1 - t[:, :, 0, 0]).clamp_min(1e-6) ** 2)  # (B, n)
        w = logp.softmax(-1)
        return torch.einsum("bn,nlv->blv", w, onehots).to(z.dtype)

    return denoiser


def test_euler_with_exact_denoiser_many_steps_valid_one_step_factorises():
    """With the exact denoiser the flow produces only data sequences; one step samples the
    independent per-position marginals, so it mixes phrases ("New Diego")."""
    schedule = make_schedule("decoding_error", V)
    phrases = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 0]])
    den = _oracle(phrases, schedule)
    noise = torch.randn(400, L, V, generator=torch.Generator().manual_seed(0))
    many = euler_sample(den, noise, schedule, steps=64).argmax(-1)
    match = (many[:, None] == phrases[None]).all(-1).any(-1)
    assert match.float().mean() > 0.97
    share = (many[:, None] == phrases[None]).all(-1).float().mean(0)
    assert share.min() > 0.35  # both phrases, roughly evenly
    one = euler_sample(den, noise, schedule, steps=1)
    torch.testing.assert_close(
        one[0],
        torch.full((L, V), 0.0)
        .index_put_((torch.arange(L), phrases[0]), torch.tensor(0.5))
        .index_put_((torch.arange(L), phrases[1]), torch.tensor(0.5), accumulate=True),
        atol=1e-3,
        rtol=0,
    )


def test_sampler_is_seeded_and_float64_option():
    m = FLM(tiny(), make_schedule("decoding_error", V)).eval()
    perturb(m.net)
    a = m.sample(5, L, 4, torch.Generator().manual_seed(3))
    b = m.sample(5, L, 4, torch.Generator().manual_seed(3))
    c = m.sample(5, L, 4, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = m.sample(5, L, 4, torch.Generator().manual_seed(3), float64=True)
    assert d.shape == (5, L)
    with pytest.raises(ValueError):
        m.sample(1, L, 0)


def test_ce_falls_on_phrases():
    from fmlm.data import PhrasesTask

    task = PhrasesTask(n=4, k=2, phrases_per_seq=1, seed=0)
    torch.manual_seed(0)
    net = DiT(task.tokenizer.vocab_size, task.seq_len, n_layers=2, d_model=32, n_heads=4, cond_dim=16)
    m = FLM(net, make_schedule("decoding_error", task.tokenizer.vocab_size))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss, _ = m.loss(task.sample(64, g), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
