"""Conditioning (prefix, infill), autoguidance and reward guidance (fmlm.guidance)."""

import json

import pytest
import torch

from fmlm import guidance
from fmlm.cli import main
from fmlm.data import PhrasesTask
from fmlm.errors import FmlmError
from fmlm.methods.ar import AR
from fmlm.methods.classifier import Classifier, soft_inputs
from fmlm.methods.duo import Duo
from fmlm.methods.flm import FLM
from fmlm.methods.fmlm import FMLM
from fmlm.methods.mdlm import MDLM
from fmlm.nn.causal import CausalTransformer
from fmlm.nn.dit import DiT
from fmlm.schedule import make_schedule

V, L = 9, 6


def perturbed(net, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


def flm(seed=1):
    torch.manual_seed(0)
    return FLM(perturbed(DiT(V, L, 2, 32, 4, 16), seed), make_schedule("decoding_error", V)).eval()


def fmlm(seed=1):
    torch.manual_seed(0)
    return FMLM(perturbed(DiT(V, L, 2, 32, 4, 16, two_time=True), seed), make_schedule("decoding_error", V)).eval()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


KNOWN = torch.tensor([3, 0, 7, 0, 0, 2])
MASK = torch.tensor([True, False, True, False, False, True])


@pytest.mark.parametrize("make", [flm, fmlm], ids=["flm", "fmlm"])
@pytest.mark.parametrize("steps", [1, 3])
def test_flow_models_keep_known_tokens(make, steps):
    m = make()
    ids = m.sample(16, L, steps, generator=gen(), known=KNOWN, mask=MASK)
    assert (ids[:, MASK] == KNOWN[MASK]).all()
    prefix = m.sample(16, L, steps, generator=gen(), known=[4, 5])
    assert (prefix[:, :2] == torch.tensor([4, 5])).all()
    free = m.sample(16, L, steps, generator=gen())
    assert not (free[:, MASK] == KNOWN[MASK]).all()  # the test is not vacuous


def test_flow_known_positions_follow_their_interpolant():
    m = fmlm()
    seen = []
    m.sample(
        4,
        L,
        3,
        generator=gen(),
        known=KNOWN,
        mask=MASK,
        invert_iters=0,
        callback=lambda i, z, d: seen.append(z.clone()),
    )
    noise = torch.randn(4, L, V, generator=gen())
    ts = m.schedule.t(torch.linspace(0, 1, 4, dtype=torch.float64))
    x1 = torch.nn.functional.one_hot(KNOWN, V).float()
    for i, z in enumerate(seen):
        t = float(ts[i])
        torch.testing.assert_close(z[:, MASK], ((1 - t) * noise + t * x1)[:, MASK])


def test_fmlm_one_step_inversion_makes_the_lookahead_predict_known_tokens():
    m = fmlm()
    known, mask = guidance.known_tensors(KNOWN, MASK, 8, L, V, "cpu")
    z = torch.randn(8, L, V, generator=gen())
    one, zero = torch.ones(8), torch.zeros(8)
    z2 = guidance.invert_known(z, lambda x: m.delta(x, zero, one), known, mask, 0.2, 200)
    p = m.delta(z2, zero, one)
    assert (p.argmax(-1)[:, MASK] == KNOWN[MASK]).float().mean() > 0.9
    assert torch.equal(z2[:, ~MASK], z[:, ~MASK])  # only known positions move


@pytest.mark.parametrize("kind", ["mdlm", "duo"])
def test_discrete_baselines_clamp_known_tokens(kind):
    torch.manual_seed(0)
    if kind == "mdlm":
        m = MDLM(perturbed(DiT(V + 1, L, 2, 32, 4, 16))).eval()
    else:
        m = Duo(perturbed(DiT(V, L, 2, 32, 4, 16))).eval()
    for steps in (1, 4):
        ids = m.sample(16, L, steps, generator=gen(), known=KNOWN, mask=MASK)
        assert (ids[:, MASK] == KNOWN[MASK]).all()


def test_ar_prefix_only():
    torch.manual_seed(0)
    m = AR(perturbed(CausalTransformer(V, L, 2, 32, 4))).eval()
    ids = m.sample(8, L, generator=gen(), known=[1, 2, 3])
    assert (ids[:, :3] == torch.tensor([1, 2, 3])).all()
    with pytest.raises(ValueError, match="prefix"):
        m.sample(8, L, generator=gen(), known=KNOWN, mask=MASK)


def test_known_tensors_validation():
    with pytest.raises(ValueError, match="do not fit"):
        guidance.known_tensors(list(range(L + 1)), None, 2, L, V, "cpu")
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        guidance.known_tensors([V], None, 2, L, V, "cpu")
    with pytest.raises(ValueError, match="needs the known ids"):
        guidance.known_tensors(None, MASK, 2, L, V, "cpu")


@pytest.mark.parametrize("make", [flm, fmlm], ids=["flm", "fmlm"])
def test_guidance_weight_zero_is_bit_for_bit(make):
    m, weak = make(1), make(2)
    for steps in (1, 4):
        plain = m.sample(16, L, steps, generator=gen())
        outs = []
        m.sample(16, L, steps, generator=gen(), callback=lambda i, z, d: outs.append(d))
        guided = []
        ids = m.sample(
            16, L, steps, generator=gen(), guide_weak=weak, guide_weight=0.0, callback=lambda i, z, d: guided.append(d)
        )
        assert torch.equal(ids, plain)
        assert all(torch.equal(a, b) for a, b in zip(outs, guided))
        strong = m.sample(16, L, steps, generator=gen(), guide_weak=weak, guide_weight=3.0)
        assert not torch.equal(strong, plain)


def test_autoguidance_formula():
    main_logits, weak_logits = torch.randn(2, 3, V), torch.randn(2, 3, V)
    w = 0.7
    got = guidance.guided_logits(main_logits, weak_logits, w).log_softmax(-1)
    lm, lw = main_logits.log_softmax(-1), weak_logits.log_softmax(-1)
    torch.testing.assert_close(got, (lm + w * (lm - lw)).log_softmax(-1))


def test_weak_model_must_match():
    with pytest.raises(FmlmError, match="FMLM"):
        fmlm().sample(2, L, 1, guide_weak=flm(), guide_weight=1.0)
    other = FLM(DiT(V + 1, L, 2, 32, 4, 16), make_schedule("decoding_error", V + 1))
    with pytest.raises(FmlmError, match="vocabulary"):
        flm().sample(2, L, 1, guide_weak=other, guide_weight=1.0)


def toy_classifier():
    torch.manual_seed(0)
    return perturbed(Classifier(DiT(V, L, 1, 32, 4, 16), 3), scale=0.3)


@pytest.mark.parametrize("make", [flm, fmlm], ids=["flm", "fmlm"])
def test_reward_gradient_is_finite_nonzero_and_raises_the_reward(make):
    m, clf = make(), toy_classifier()
    reward = guidance.classifier_reward(clf, 1)
    z = 0.5 * torch.randn(32, L, V, generator=gen())
    tau = torch.full((32,), 0.3)
    if isinstance(m, FMLM):

        def lookahead(x):
            return m.delta(x, tau, torch.ones(32))
    else:

        def lookahead(x):
            return m.denoise(x, tau)

    g = guidance.reward_gradient(z, lookahead, reward)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    before = reward(lookahead(z))
    after = reward(lookahead(guidance.Steering(reward, scale=0.05)(z, lookahead, 0.3)))
    assert (after > before).float().mean() > 0.9 and after.mean() > before.mean()


def test_reward_guidance_shifts_samples_toward_the_target():
    m, clf = fmlm(), toy_classifier()
    reward = guidance.classifier_reward(clf, 2)
    plain = m.sample(64, L, 2, generator=gen())
    steered = m.sample(64, L, 2, generator=gen(), reward=reward, reward_scale=1.0, reward_iters=3)
    with torch.no_grad():
        r0 = reward(torch.nn.functional.one_hot(plain, V).float()).mean()
        r1 = reward(torch.nn.functional.one_hot(steered, V).float()).mean()
    assert r1 > r0


def test_classifier_accepts_soft_inputs_and_learns_phrase_labels():
    task = PhrasesTask(n=3, k=2, phrases_per_seq=2)
    clf = Classifier(DiT(task.vocab_size, task.seq_len, 1, 32, 4, 16), task.n)
    clf.labeller = task.labels
    ids = task.sample(64, gen())
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    for _ in range(60):
        loss, _ = clf.loss(ids, gen())
        opt.zero_grad()
        loss.backward()
        opt.step()
    metrics = clf.eval_loss(ids, gen(1))
    assert metrics["acc"] == 1.0
    soft = soft_inputs(ids, task.vocab_size, gen())
    assert torch.allclose(soft.sum(-1), torch.ones(64, task.seq_len))
    assert clf(soft).shape == (64, task.n)


def test_phrase_labels():
    task = PhrasesTask(n=4, k=2, phrases_per_seq=2)
    ids = torch.tensor(
        [
            list(task.phrases[2]) + list(task.phrases[0]),
            [task.phrases[1][0], task.phrases[2][1]] + list(task.phrases[3]),
        ]
    )
    assert task.labels(ids).tolist() == [2, -1]


def test_parse_infill_word_and_char():
    task = PhrasesTask(words=["new york", "san diego"])
    ids, mask = guidance.parse_infill("new [MASK]", task.tokenizer, 4)
    assert ids[0] == task.tokenizer.encode("new")[0] and mask == [True, False]
    ids, mask = guidance.parse_infill("[MASK:2] diego", task.tokenizer, 4)
    assert mask == [False, False, True]
    from fmlm.data import CharTokenizer

    tok = CharTokenizer(list("abc Y"))
    ids, mask = guidance.parse_infill("a [MASK:3] Y", tok, 10)
    assert mask == [True, True, False, False, False, True, True] and ids[-1] == tok.encode("Y")[0]
    for bad, msg in [
        ("a [MASK:x] b", "bad mask syntax"),
        ("a [MASK:0] b", "at least one"),
        ("no masks", "at least one"),
        ("a [MASK:20]", "sequence length"),
    ]:
        with pytest.raises(FmlmError, match=msg):
            guidance.parse_infill(bad, tok, 10)


# ------------------------------------------------------------------------------ end to end (CLI)
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny FLM, a tiny flow map and a phrase classifier on the tiny phrases task."""
    root = tmp_path_factory.mktemp("guide")
    common = ["--quiet", "--no-samples", "threads=1", f"cache_dir={root / 'cache'}"]
    assert main(["train", "tiny", "max_steps=30", "--run-dir", str(root / "flm"), *common]) == 0
    assert main(["train", "tiny", "max_steps=10", "seed=1", "--run-dir", str(root / "weak"), *common]) == 0
    assert (
        main(["distill", "--teacher", str(root / "flm"), "max_steps=10", "--run-dir", str(root / "fm"), *common]) == 0
    )
    assert main(["train", "tiny", "method=classifier", "max_steps=30", "--run-dir", str(root / "clf"), *common]) == 0
    return root


@pytest.mark.slow
def test_cli_prefix_infill_guidance_and_reward(runs, capsys):
    capsys.readouterr()
    flm_run, fm_run = str(runs / "flm"), str(runs / "fm")
    from fmlm.api import load

    task = load(flm_run).task
    first = task.tokenizer.decode([task.phrases[1][0]])
    assert main(["sample", "--ckpt", fm_run, "--steps", "1", "-n", "8", "--threads", "1", "--prefix", first]) == 0
    out = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(out) == 8 and all(line.split()[0] == first for line in out)
    assert (
        main(
            [
                "sample",
                "--ckpt",
                flm_run,
                "--steps",
                "2",
                "-n",
                "8",
                "--threads",
                "1",
                "--infill",
                f"[MASK] {task.tokenizer.decode([task.phrases[0][1]])}",
            ]
        )
        == 0
    )
    out = [line for line in capsys.readouterr().out.splitlines() if line]
    assert all(line.split()[1] == task.tokenizer.decode([task.phrases[0][1]]) for line in out)
    assert (
        main(
            [
                "sample",
                "--ckpt",
                flm_run,
                "--steps",
                "2",
                "-n",
                "8",
                "--threads",
                "1",
                "--json",
                "--guide-weak",
                str(runs / "weak"),
                "--guide-weight",
                "0.5",
            ]
        )
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["results"]) == 1
    assert (
        main(
            [
                "sample",
                "--ckpt",
                fm_run,
                "--steps",
                "1",
                "-n",
                "16",
                "--threads",
                "1",
                "--check",
                "--reward",
                str(runs / "clf"),
                "--reward-target",
                "2",
            ]
        )
        == 0
    )
    assert "target" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--infill", "[MASK:y]"], "bad mask syntax"),
        (["--prefix", "zz qq"], "cannot tokenise"),
        (["--prefix", "x", "--infill", "[MASK]"], "either --prefix/--suffix or --infill"),
        (["--guide-weight", "2"], "needs --guide-weak"),
        (["--reward-target", "1"], "need --reward"),
        (["--reward", "FLM", "--reward-target", "0"], "not a classifier"),
        (["--reward", "CLF", "--reward-target", "9"], "outside"),
        (["--reward", "CLF"], "needs a target"),
    ],
)
def test_cli_guidance_errors(runs, capsys, argv, msg):
    argv = [str(runs / "flm") if a == "FLM" else str(runs / "clf") if a == "CLF" else a for a in argv]
    assert main(["sample", "--ckpt", str(runs / "fm"), "--steps", "1", "-n", "2", "--threads", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_too_long_prefix_and_mismatched_weak_model(runs, capsys, tmp_path):
    from fmlm.api import load

    task = load(str(runs / "flm")).task
    long_prefix = " ".join([task.tokenizer.decode([task.phrases[0][0]])] * (task.seq_len + 1))
    assert main(["sample", "--ckpt", str(runs / "fm"), "-n", "2", "--prefix", long_prefix]) == 2
    assert "more than the sequence length" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(runs / "fm"), "-n", "2", "--guide-weak", str(runs / "flm")]) == 2
    assert "must be a FMLM" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "tiny",
                "phrases_n=5",
                "max_steps=5",
                "--quiet",
                "--no-samples",
                "threads=1",
                f"cache_dir={runs / 'cache'}",
                "--run-dir",
                str(tmp_path / "other"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(runs / "flm"), "-n", "2", "--guide-weak", str(tmp_path / "other")]) == 2
    assert "different vocabulary" in capsys.readouterr().err


@pytest.mark.slow
def test_api_per_row_known_tokens_across_batches(runs):
    from fmlm.api import load

    m = load(str(runs / "fm"))
    L_ = m.config.data.seq_len
    known = torch.randint(m.config.model.vocab_size, (6, L_), generator=gen())
    mask = torch.zeros(6, L_, dtype=torch.bool)
    mask[:, 0] = True
    ids = m.sample_ids(6, 1, seed=0, batch_size=4, known=known, mask=mask)
    assert torch.equal(ids[:, 0], known[:, 0])
    clf = load(str(runs / "clf"))
    assert len(clf.class_names()) == clf.method.num_classes
    with pytest.raises(FmlmError, match="does not generate"):
        clf.sample_ids(2, 1)
    with pytest.raises(FmlmError, match="only one of"):
        m.sample_ids(2, 1, prefix=[0], infill="[MASK]")


def test_ngram_scorer_is_normalised_and_entropy():
    import math

    from fmlm.bench.guidance import CharNgram, sample_entropy

    data = torch.randint(5, (400,), generator=gen()).numpy()
    lm = CharNgram(data, 5, order=3)
    prefix = [1, 2, 3, 4]
    total = sum(math.exp(-(lm.nll(prefix + [c]) * 5 - lm.nll(prefix) * 4)) for c in range(5))
    assert abs(total - 1) < 1e-9
    assert sample_entropy(torch.tensor([[1, 1, 1, 1], [1, 2, 3, 4]])) == pytest.approx(math.log(4) / 2)


@pytest.mark.slow
def test_guidance_bench_writes_json_markdown_and_plot(runs, tmp_path):
    from fmlm.guidance_bench import main as bench

    assert (
        bench(
            [
                "reward",
                "--models",
                str(runs / "fm"),
                "--classifier",
                str(runs / "clf"),
                "--steps",
                "1",
                "--scales",
                "0.1",
                "--iters",
                "2",
                "-n",
                "4",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "reward.json").read_text())
    assert [r["reward_scale"] for r in res["rows"]] == [0.0, 0.1]
    assert (tmp_path / "reward.md").is_file() and (tmp_path / "reward.png").is_file()
