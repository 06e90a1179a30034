"""Distilled discrete baselines: Duo + DCD and MDLM + SDTT (rounds, targets, losses, CLI, resume)."""

import copy
import json
import shutil

import pytest
import torch

from fmlm.cli import main
from fmlm.data import PhrasesTask
from fmlm.methods.dcd import DCD, coupled_latents
from fmlm.methods.duo import Duo
from fmlm.methods.mdlm import MDLM
from fmlm.methods.rounds import divergence
from fmlm.methods.sdtt import SDTT, ancestral_step
from fmlm.nn.dit import DiT

V, L = 7, 5


def _net(vocab: int, seq_len: int, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    net = DiT(vocab, seq_len, n_layers=2, d_model=32, n_heads=4, cond_dim=16)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random weights everywhere, zero-initialised layers included
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


def make(kind: str, vocab: int = V, seq_len: int = L, **kw):
    if kind == "dcd":
        return DCD(_net(vocab, seq_len), **kw)
    return SDTT(_net(vocab + 1, seq_len), **kw)


# ----------------------------------------------------------------------------- the duality
def test_coupled_latents_have_the_uniform_state_marginals_and_lie_on_one_trajectory():
    m = make("dcd")
    g = torch.Generator().manual_seed(0)
    n = 200_000
    ids = torch.randint(V, (n, 1), generator=g)
    for t, s in ((0.3, 0.1), (0.9, 0.5), (1.0, 0.0)):
        tt, ss = torch.full((n,), t, dtype=torch.float64), torch.full((n,), s, dtype=torch.float64)
        z_t, z_s = coupled_latents(ids, m.snr_ratio(tt), m.snr_ratio(ss), V, g)
        # Marginal law q_t(z = x) = α_t + (1 − α_t)/V with α = 1 − t (and uniform over the others).
        for z, time in ((z_t, t), (z_s, s)):
            assert (z == ids).double().mean().item() == pytest.approx(1 - time + time / V, abs=4e-3)
        others = torch.bincount(((z_t - ids) % V)[z_t != ids], minlength=V)[1:].double()
        assert (others / others.sum() - 1 / (V - 1)).abs().max() < 0.01
        # One Gaussian trajectory: less noise never loses the clean token, and a wrong token at s
        # is the same wrong token as at t.
        assert bool((z_s[z_t == ids] == ids[z_t == ids]).all())
        assert bool(((z_s == ids) | (z_s == z_t)).all())
    # At s = 0 (α = 1) the latent is the data; at t = 1 it does not depend on the data.
    zero = torch.zeros(n, dtype=torch.float64)
    assert bool((coupled_latents(ids, m.snr_ratio(zero), m.snr_ratio(zero), V, g)[0] == ids).all())


# ----------------------------------------------------------------------------- rounds
@pytest.mark.parametrize("kind", ["dcd", "sdtt"])
def test_rounds_double_the_step_and_refresh_the_teacher(kind):
    m = make(kind, rounds=3, base_steps=8, round_steps=2)
    assert [m.step_size(r) for r in range(3)] == [1 / 8, 2 / 8, 4 / 8]
    assert [m.student_steps(r) for r in range(3)] == [4, 2, 1]
    start = copy.deepcopy(m.student_state())

    def teacher_equals(state):
        return all(torch.equal(v, state[k]) for k, v in m.teacher.state_dict().items())

    assert teacher_equals(start) and not any(p is q for p in m.parameters() for q in m.teacher.parameters())
    assert not any(k.startswith("teacher.") for k, _ in m.named_parameters())  # the optimiser never sees it
    with torch.no_grad():
        next(m.net.parameters()).add_(1.0)  # "an optimiser step"
    m.on_step_end()
    assert m.round == 0 and teacher_equals(start)
    m.on_step_end()  # step 2: round 1 starts with the student as teacher
    assert m.round == 1 and teacher_equals(m.student_state()) and not teacher_equals(start)
    for _ in range(10):
        m.on_step_end()
    assert m.round == 2 and m.step_size() == 0.5  # the last round goes on past the budget


def test_rounds_must_end_at_one_step_or_more():
    with pytest.raises(ValueError, match="below one step"):
        make("dcd", rounds=4, base_steps=8)


def test_divergences():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, V, generator=g).log_softmax(-1), torch.randn(6, V, generator=g).log_softmax(-1)
    for kind in ("kl_bwd", "kl_fwd", "mse"):
        assert torch.allclose(divergence(a, a, kind), torch.zeros(6), atol=1e-6)
        assert bool((divergence(a, b, kind) > 0).all())
    assert torch.allclose(divergence(a, b, "kl_bwd"), divergence(b, a, "kl_fwd"))


# ----------------------------------------------------------------------------- SDTT's target
def test_sdtt_target_is_the_teachers_prediction_where_it_decodes():
    m = make("sdtt", time_conditioning=True, rounds=2, base_steps=4, round_steps=100)  # dt = 1/4, m = 2
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(V, (64, L), generator=g)
    t = torch.full((64,), 0.2, dtype=torch.float64)  # t ≤ dt: one teacher step reaches 0
    z = m.corrupt(ids, t.float(), g)
    target = m.teacher_target(z, t, torch.Generator().manual_seed(0))
    ref = m.teacher.log_probs(z, t.float())
    masked = z == m.mask_id
    assert masked.any()
    torch.testing.assert_close(target[masked], ref[masked])
    # Two steps from t = 0.9 (to 0.65, then to 0.4): every masked position takes the prediction of the
    # step that decoded it, and one still masked takes the second step's.
    t = torch.full((64,), 0.9, dtype=torch.float64)
    z = m.corrupt(ids, t.float(), g)
    target = m.teacher_target(z, t, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    lp1, z1 = ancestral_step(m.teacher, z, t, t - 0.25, gen)
    lp2, z2 = ancestral_step(m.teacher, z1, t - 0.25, t - 0.5, gen)
    first = (z == m.mask_id) & (z1 != m.mask_id)
    later = z1 == m.mask_id
    assert first.any() and later.any()
    torch.testing.assert_close(target[first], lp1[first])
    torch.testing.assert_close(target[later], lp2[later])


# ----------------------------------------------------------------------------- learning
@pytest.mark.parametrize("kind", ["dcd", "sdtt"])
def test_loss_falls_and_is_finite(kind):
    task = PhrasesTask(n=4, k=2, phrases_per_seq=2)
    vocab = task.tokenizer.vocab_size
    m = make(kind, vocab=vocab, seq_len=task.seq_len, rounds=2, base_steps=4, round_steps=10_000)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    data_gen, noise_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    val = task.sample(256, torch.Generator().manual_seed(99))

    def val_loss():
        with torch.no_grad():
            return m.loss(val, torch.Generator().manual_seed(5))[0].item()

    # A student away from its (random) teacher learns to match it.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    before = val_loss()
    for _ in range(60):
        loss, metrics = m.loss(task.sample(64, data_gen), noise_gen)
        assert torch.isfinite(loss) and metrics["dt"] == 0.25 and metrics["round"] == 0
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
        opt.step()
    after = val_loss()
    assert after < 0.7 * before, (before, after)
    assert all(p.grad is None for p in m.teacher.parameters())


@pytest.mark.parametrize("kind", ["dcd", "sdtt"])
def test_samplers_are_seeded_and_the_student_is_its_methods_model(kind):
    m = make(kind).eval()
    assert isinstance(m, Duo if kind == "dcd" else MDLM)
    a = m.sample(8, L, 2, generator=torch.Generator().manual_seed(0))
    b = m.sample(8, L, 2, generator=torch.Generator().manual_seed(0))
    c = m.sample(8, L, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (8, L) and int(a.max()) < V


# ----------------------------------------------------------------------------- CLI, checkpoints, resume
@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    for method in ("duo", "mdlm", "flm"):
        assert (
            main(
                [
                    "train",
                    "tiny",
                    "threads=1",
                    f"method={method}",
                    "max_steps=8",
                    "eval_every=100",
                    f"data.cache_dir={root / 'data'}",
                    "--run-dir",
                    str(root / method),
                    "--quiet",
                    "--no-samples",
                ]
            )
            == 0
        )
    return root


def _distill(teachers, teacher, run, *extra):
    return main(
        [
            "distill",
            "--teacher",
            str(teachers / teacher),
            "threads=1",
            "log_every=1",
            "eval_every=100",
            "distill.rounds=3",
            "distill.base_steps=8",
            *extra,
            "--run-dir",
            str(run),
            "--quiet",
            "--no-samples",
        ]
    )


@pytest.mark.parametrize("kind, teacher", [("dcd", "duo"), ("sdtt", "mdlm")])
def test_distill_cli_sample_and_resume(teachers, tmp_path, capsys, kind, teacher):
    from fmlm import checkpoint as ckpt
    from fmlm.api import load

    a, b = tmp_path / "a", tmp_path / "b"
    # The teacher's method picks the distillation (method= is implied); 6 steps = 3 rounds of 2.
    assert _distill(teachers, teacher, a, "max_steps=6", "save_every=3", "eval_every=6") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 6 and "val_nelbo" in summary
    model = load(a)
    assert model.config.train.method == kind and isinstance(model.method, DCD if kind == "dcd" else SDTT)
    raw = load(a, ema=False).method  # (the EMA file's copy of the step counter lags one step)
    assert raw.round == 2 and int(raw.distill_step) == 6 and int(raw.round_steps) == 2
    teacher_params = sum(p.numel() for p in load(teachers / teacher).method.parameters())
    assert sum(p.numel() for p in model.method.parameters()) == teacher_params  # the teacher copy is not counted
    recs = [json.loads(line) for line in (a / "log.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs if "round" in r] == [0, 0, 1, 1, 2, 2]
    # Samples: seeded, through the ordinary sampling API and CLI.
    assert torch.equal(model.sample_ids(8, 2, seed=3), model.sample_ids(8, 2, seed=3))
    assert main(["sample", "--ckpt", str(a), "--steps", "1,2", "-n", "8", "--check", "--json"]) == 0
    assert [r["steps"] for r in json.loads(capsys.readouterr().out)["results"]] == [1, 2]
    # A killed run resumes exactly: drop the last checkpoint and rerun the same command.
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_00000006")
    assert _distill(teachers, teacher, b, "max_steps=6", "save_every=3", "eval_every=6") == 0
    capsys.readouterr()
    losses = [
        [r["loss"] for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "loss" in r] for d in (a, b)
    ]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    wa = ckpt.load_state(ckpt.resolve(a), "model.safetensors")
    wb = ckpt.load_state(ckpt.resolve(b), "model.safetensors")
    assert any(k.startswith("teacher.") for k in wa) and set(wa) == set(wb)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "extra, teacher, match",
    [
        (["method=dcd"], "mdlm", "method dcd distils a duo run"),
        (["method=sdtt"], "duo", "method sdtt distils a mdlm run"),
        (["method=sdtt"], "flm", "method sdtt distils a mdlm run"),
        (["method=semigroup"], "duo", "a duo teacher distils with method=dcd"),
        (["distill.divergence=l1"], "duo", "distill.divergence"),
        (["distill.rounds=4"], "mdlm", "below one step"),
        (["phrases_n=5"], "duo", "vocabulary"),
    ],
)
def test_distill_bad_input_is_one_line(teachers, tmp_path, capsys, extra, teacher, match):
    code = _distill(teachers, teacher, tmp_path / "bad", "max_steps=1", *extra)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err and "Traceback" not in err, err


def test_distill_self_with_a_discrete_baseline_is_an_error(capsys):
    assert main(["distill", "--self", "tiny", "method=dcd", "max_steps=1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--teacher" in err


def test_bench_variant_configs_share_the_flow_maps_budget():
    from fmlm.bench.presets import MAIN, get_preset
    from fmlm.bench.runs import variant_config
    from fmlm.bench.suite import variant_steps

    preset = get_preset("phrases")
    by = {v.label: v for v in MAIN}
    cfgs = {
        label: variant_config(preset, by[label], [], "teacher", distill_overrides=["max_steps=77"])
        for label in ("FMLM", "Duo+DCD", "MDLM+SDTT")
    }
    assert {c.train.max_steps for c in cfgs.values()} == {77}
    assert {c.train.batch_size for c in cfgs.values()} == {128}
    assert cfgs["FMLM"].model.two_time and not cfgs["Duo+DCD"].model.two_time
    assert cfgs["Duo+DCD"].train.method == "dcd" and cfgs["MDLM+SDTT"].train.method == "sdtt"
    assert by["Duo+DCD"].teacher == "Duo" and by["MDLM+SDTT"].teacher == "MDLM"
    assert variant_steps(by["Duo+DCD"], [1, 2, 4, 8, 1024]) == [1, 2, 4, 8]
    assert variant_steps(by["Duo+DCD"], [1024]) == list(by["Duo+DCD"].steps)
    assert variant_steps(by["Duo"], [1, 1024]) == [1, 1024]
