"""Flow map LM: two-time denoiser identities, targets, JVPs, losses, sampler, distill CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fmlm.methods.flow_map.targets as targets
from fmlm.errors import FmlmError
from fmlm.methods.flm import FLM
from fmlm.methods.fmlm import FMLM, sparsemax
from fmlm.nn.dit import DiT
from fmlm.schedule import make_schedule

V, L = 11, 6


def perturbed(net):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def teacher_and_student(objective="semigroup", **kw):
    torch.manual_seed(0)
    sched = make_schedule("decoding_error", V)
    teacher = FLM(perturbed(DiT(V, L, 2, 32, 4, 16)), sched)
    student = FMLM.from_teacher(teacher, DiT(V, L, 2, 32, 4, 16, two_time=True), objective=objective, **kw)
    return teacher, student


def test_student_starts_equal_to_teacher():
    teacher, student = teacher_and_student()
    x, s, t = torch.randn(4, L, V), torch.rand(4) * 0.5, 0.5 + torch.rand(4) * 0.5
    torch.testing.assert_close(student.delta(x, t, t), teacher.denoise(x, t))  # δ_{t,t} = D_t
    torch.testing.assert_close(student.delta(x, s, t), teacher.denoise(x, s))  # δ_{s,t} = D_s
    assert not any(n.startswith("teacher") for n in student.state_dict())  # checkpoint: student only


def test_ema_target_is_saved_and_restored_but_not_trained():
    _, student = teacher_and_student(target_ema=0.5)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    loss, _ = student.loss(torch.randint(V, (4, L)), torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    student.on_step_end()
    n_net = sum(p.numel() for p in student.net.parameters())
    assert sum(p.numel() for p in student.parameters()) == n_net  # the target is not optimised
    state = student.state_dict()
    tkeys = [k for k in state if k.startswith("target.")]
    assert len(tkeys) == len(student._target.state_dict())
    w = "blocks.0.attn_qkv.weight" if "target.blocks.0.attn_qkv.weight" in state else tkeys[0][len("target.") :]
    # after one update the target sits strictly between its start and the student
    assert not torch.equal(state["target." + w], state["net." + w])
    _, fresh = teacher_and_student(target_ema=0.5)
    fresh.load_state_dict(state)
    for k, v in student._target.state_dict().items():
        torch.testing.assert_close(fresh._target.state_dict()[k], v)
    # a checkpoint without target keys (e.g. written by an older version) starts the target at the student
    _, fresh2 = teacher_and_student(target_ema=0.5)
    fresh2.load_state_dict({k: v for k, v in state.items() if not k.startswith("target.")})
    torch.testing.assert_close(fresh2._target.state_dict()[w], student.net.state_dict()[w])


def test_flow_map_identities_and_simplex():
    _, m = teacher_and_student()
    perturbed(m.net)
    x, tau = torch.randn(3, L, V), torch.rand(3)
    torch.testing.assert_close(m.flow_map(x, tau, tau), x)  # X_{s,s} = id
    one = torch.ones(3)
    torch.testing.assert_close(m.flow_map(x, tau, one), m.delta(x, tau, one))  # X_{s,1} = δ_{s,1}
    d = m.delta(x, tau, one)
    assert (d >= 0).all() and torch.allclose(d.sum(-1), torch.ones(3, L))
    s, u, t = m.sample_times(64, torch.Generator().manual_seed(0))
    assert (s <= u).all() and (u <= t).all() and (t <= 1).all() and (s >= 0).all()
    target = m.semigroup_target(torch.randn(64, L, V), s, u, t)
    assert (target >= -1e-7).all() and torch.allclose(target.sum(-1), torch.ones(64, L), atol=1e-5)


def test_s_greater_than_t_is_an_error():
    _, m = teacher_and_student()
    with pytest.raises(FmlmError, match="s <= t"):
        m.delta(torch.randn(2, L, V), torch.tensor([0.8, 0.1]), torch.tensor([0.5, 0.2]))


class OneHotNet(nn.Module):
    """The exact two-time denoiser of a single data point: δ_{s,t}(x) = onehot(x1) for all x, s, t."""

    two_time = True

    def __init__(self, seq):
        super().__init__()
        self.vocab_size = V
        self.register_buffer("logits", 60.0 * F.one_hot(seq, V).float() - 30.0)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, tau_s, tau_t=None):
        # Depend (trivially) on every input so JVPs flow through.
        return (
            self.logits.expand(x.shape[0], -1, -1)
            + 0 * x
            + 0 * tau_s[:, None, None]
            + (0 * tau_t[:, None, None] if tau_t is not None else 0)
            + self.dummy
        )


@pytest.mark.parametrize("objective", ["semigroup", "lagrangian", "eulerian"])
def test_target_equals_exact_flow_map_for_a_single_data_point(objective):
    seq = torch.randint(0, V, (L,), generator=torch.Generator().manual_seed(0))
    sched = make_schedule("decoding_error", V)
    teacher = FLM(OneHotNet(seq), sched)
    teacher.net.two_time = False
    m = FMLM(OneHotNet(seq), sched, objective=objective, teacher=teacher, projection="sparsemax")
    s, u, t = m.sample_times(16, torch.Generator().manual_seed(1))
    t = t.clamp_max(0.999)
    x = torch.randn(16, L, V)
    if objective == "semigroup":
        target = m.semigroup_target(x, s, u, t)
    elif objective == "lagrangian":
        target = m.lagrangian_target(x, s, t)
    else:
        target = m.eulerian_target(x, s, t)
    exact = F.one_hot(seq, V).float().expand(16, -1, -1)
    torch.testing.assert_close(target, exact, atol=1e-5, rtol=0)


def test_relaxed_eulerian_target_is_a_damped_step_towards_the_direct_one():
    """δ̄_relaxed − δ̂ = (δ̄_direct − δ̂)/(1 + c): same fixed point, bounded as t → 1."""
    _, m = teacher_and_student("eulerian", projection="none", eulerian_loss="mse")
    perturbed(m.net)
    m.double()
    x = torch.randn(3, L, V, dtype=torch.float64)
    tau_s = torch.tensor([0.1, 0.3, 0.0], dtype=torch.float64)
    tau_t = torch.tensor([0.5, 0.8, 0.9], dtype=torch.float64)
    ts, tt = m.schedule.t(tau_s), m.schedule.t(tau_t)
    c = ((1 - ts) * (tt - ts) / (1 - tt))[:, None, None]
    delta = m.delta(x, tau_s, tau_t)
    direct = m.eulerian_target(x, tau_s, tau_t, form="direct")
    relaxed = m.eulerian_target(x, tau_s, tau_t, form="relaxed")
    torch.testing.assert_close(relaxed - delta, (direct - delta) / (1 + c))
    torch.testing.assert_close(relaxed.sum(-1), torch.ones(3, L, dtype=torch.float64))
    # at t = 1 the relaxed target is finite; the direct one needs its 1e-3 cap
    one = torch.ones(3, dtype=torch.float64)
    assert torch.isfinite(m.eulerian_target(x, tau_s, one, form="relaxed")).all()


def test_jvps_match_finite_differences():
    # float64 so that central differences are accurate (the time embedding has frequencies up to 1000).
    _, m = teacher_and_student("lagrangian")
    perturbed(m.net)
    m.double()
    x = torch.randn(2, L, V, dtype=torch.float64)
    tau_s, tau_t = torch.tensor([0.2, 0.4], dtype=torch.float64), torch.tensor([0.6, 0.7], dtype=torch.float64)

    def f_t(tt):
        return m.logits(x, tau_s, tt).softmax(-1)

    out, jv = targets._jvp(f_t, (tau_t,), (torch.ones(2, dtype=torch.float64),))
    h = 1e-6
    fd = (f_t(tau_t + h) - f_t(tau_t - h)) / (2 * h)
    assert out.shape == jv.shape == (2, L, V)
    torch.testing.assert_close(jv, fd, atol=1e-6, rtol=1e-4)
    assert jv.abs().max() > 1e-3  # the derivative is not trivially zero

    tx, ts = torch.randn(2, L, V, dtype=torch.float64), torch.tensor([0.5, -0.3], dtype=torch.float64)

    def f_sx(xx, ss):
        return m.logits(xx, ss, tau_t).softmax(-1)

    _, jv2 = targets._jvp(f_sx, (x, tau_s), (tx, ts))
    fd2 = (f_sx(x + h * tx, tau_s + h * ts) - f_sx(x - h * tx, tau_s - h * ts)) / (2 * h)
    torch.testing.assert_close(jv2, fd2, atol=1e-6, rtol=1e-4)


def test_sparsemax_projects_onto_simplex():
    z = torch.randn(50, 7) * 3
    p = sparsemax(z)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(50))
    q = torch.rand(50, 7)
    q = q / q.sum(-1, keepdim=True)
    torch.testing.assert_close(sparsemax(q), q)  # identity on the simplex
    # It is the Euclidean projection: no random simplex point is closer.
    r = torch.rand(50, 200, 7)
    r = r / r.sum(-1, keepdim=True)
    assert ((p - z).pow(2).sum(-1)[:, None] <= (r - z[:, None]).pow(2).sum(-1) + 1e-5).all()


def test_flow_map_sampler_seeded_and_any_steps():
    _, m = teacher_and_student()
    perturbed(m.net)
    m.eval()
    for steps in (1, 2, 3, 8):
        a = m.sample(4, L, steps, torch.Generator().manual_seed(0))
        b = m.sample(4, L, steps, torch.Generator().manual_seed(0))
        assert a.shape == (4, L) and torch.equal(a, b)
    g = m.sample(4, L, 4, torch.Generator().manual_seed(0), gamma=0.5)
    assert g.shape == (4, L)
    with pytest.raises(ValueError):
        m.sample(1, L, 0)


def _phrases_setup():
    from fmlm.data import PhrasesTask

    task = PhrasesTask(n=4, k=2, phrases_per_seq=1, seed=0)
    Vp = task.tokenizer.vocab_size
    sched = make_schedule("decoding_error", Vp)
    torch.manual_seed(0)
    teacher = FLM(DiT(Vp, task.seq_len, 2, 32, 4, 16), sched)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss, _ = teacher.loss(task.sample(64, g), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return task, teacher, Vp


@pytest.mark.parametrize(
    "objective, self_distill", [("semigroup", False), ("lagrangian", False), ("eulerian", False), ("semigroup", True)]
)
def test_each_objective_finite_and_falls_on_phrases(objective, self_distill):
    """From a fresh student, each loss falls on a fixed evaluation batch.

    (From a teacher-initialised student the Lagrangian/Eulerian losses first rise, because
    their targets move as ∂δ̂ grows; that is expected and not tested here.)
    """
    task, teacher, Vp = _phrases_setup()
    torch.manual_seed(0)
    net = DiT(Vp, task.seq_len, 2, 32, 4, 16, two_time=True)
    m = FMLM(net, teacher.schedule, objective=objective, teacher=None if self_distill else teacher)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    batch = task.sample(256, torch.Generator().manual_seed(5))

    def fixed_loss():
        with torch.no_grad():
            return m.loss(batch, torch.Generator().manual_seed(7))[0].item()

    before = fixed_loss()
    for _ in range(40):
        loss, metrics = m.loss(task.sample(64, g), g)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.8 * before


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from fmlm.cli import main

    d = tmp_path_factory.mktemp("teacher")
    assert (
        main(
            [
                "train",
                "tiny",
                "threads=1",
                f"data.cache_dir={d / 'cache'}",
                "--run-dir",
                str(d / "flm"),
                "--quiet",
                "--no-samples",
            ]
        )
        == 0
    )
    return d


def test_distill_cli_and_sample(teacher_run, capsys):
    from fmlm.cli import main

    run = teacher_run / "fm"
    code = main(
        [
            "distill",
            "--teacher",
            str(teacher_run / "flm"),
            "max_steps=6",
            "save_every=3",
            "eval_every=3",
            "--run-dir",
            str(run),
            "--quiet",
            "--no-samples",
        ]
    )
    assert code == 0
    capsys.readouterr()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["method"] == "semigroup" and cfg["model"]["two_time"]
    # The teacher checkpoint is pinned in its run, so that continuing that run does not prune it.
    from fmlm import checkpoint as ckpt

    assert ckpt.pinned(teacher_run / "flm") == {ckpt.resolve(teacher_run / "flm").name}
    assert main(["sample", "--ckpt", str(run), "--steps", "1,2", "-n", "8", "--check", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert [r["steps"] for r in res] == [1, 2]

    import fmlm

    model = fmlm.load(run)
    assert model.sample(2, steps=1, seed=0) == model.sample(2, steps=1, seed=0)
    # Resume: same command, bigger budget.
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(teacher_run / "flm"),
                "max_steps=9",
                "save_every=3",
                "eval_every=3",
                "--run-dir",
                str(run),
                "--quiet",
                "--no-samples",
            ]
        )
        == 0
    )
    assert json.loads((run / "summary.json").read_text())["step"] == 9


@pytest.mark.parametrize("objective", ["lagrangian", "eulerian"])
def test_distill_cli_other_objectives(teacher_run, objective):
    from fmlm.cli import main

    assert (
        main(
            [
                "distill",
                "--teacher",
                str(teacher_run / "flm"),
                f"method={objective}",
                "max_steps=3",
                "--run-dir",
                str(teacher_run / objective),
                "--quiet",
                "--no-samples",
            ]
        )
        == 0
    )


def test_distill_self_cli(tmp_path):
    from fmlm.cli import main

    assert (
        main(
            [
                "distill",
                "--self",
                "tiny",
                "max_steps=3",
                f"data.cache_dir={tmp_path}",
                "--run-dir",
                str(tmp_path / "self"),
                "--quiet",
                "--no-samples",
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "extra, match",
    [
        (["phrases_per_seq=2", "seq_len=4"], "sequence length"),
        (["phrases_n=5"], "vocabulary"),
        (["method=flm"], "distillation method must be one of"),
    ],
)
def test_distill_bad_input_one_line(teacher_run, capsys, extra, match):
    from fmlm.cli import main

    code = main(
        [
            "distill",
            "--teacher",
            str(teacher_run / "flm"),
            *extra,
            "max_steps=1",
            "--run-dir",
            str(teacher_run / "bad"),
            "--quiet",
            "--no-samples",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err


def test_distill_from_non_flm_teacher_is_an_error(teacher_run, capsys):
    from fmlm.cli import main

    run = teacher_run / "fm2"
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(teacher_run / "flm"),
                "max_steps=1",
                "--run-dir",
                str(run),
                "--quiet",
                "--no-samples",
            ]
        )
        == 0
    )
    capsys.readouterr()
    code = main(
        [
            "distill",
            "--teacher",
            str(run),
            "max_steps=1",
            "--run-dir",
            str(teacher_run / "fm3"),
            "--quiet",
            "--no-samples",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "must be an FLM checkpoint" in err and len(err.strip().splitlines()) == 1
    code = main(["distill", "max_steps=1", "--quiet"])
    assert code == 2 and "--teacher" in capsys.readouterr().err
