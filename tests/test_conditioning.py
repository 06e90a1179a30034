"""Training-time conditioning (fmlm.conditioning): given positions, the conditional losses, the learned
conditional sampler and classifier-free guidance."""

import json

import pytest
import torch

from fmlm.cli import main
from fmlm.conditioning import Conditioning
from fmlm.config import build_config
from fmlm.methods.duo import Duo
from fmlm.methods.flm import FLM
from fmlm.methods.fmlm import FMLM
from fmlm.methods.mdlm import MDLM
from fmlm.methods.registry import build_method
from fmlm.nn.dit import DiT
from fmlm.schedule import make_schedule

V, L, B = 9, 6, 8
COND = Conditioning(1.0, infill_prob=0.5)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def perturbed(net, seed=1, scale=0.05):
    g = gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def dit(two_time=False, seed=0, vocab=V, given=True):
    torch.manual_seed(seed)
    return perturbed(DiT(vocab, L, 2, 32, 4, 16, two_time=two_time, given_embedding=given), seed + 1)


def flm(noise="vocab", loss="ce", cond=COND, given=True):
    return FLM(dit(given=given), make_schedule("decoding_error", V), loss, noise=noise, cond=cond)


def fmlm(objective="semigroup", teacher=True, noise="vocab", cond=COND, given=True, **kw):
    net = dit(two_time=True, seed=5, given=given)
    if teacher:
        return FMLM.from_teacher(
            flm(noise, cond=cond, given=given), net, objective=objective, noise=noise, cond=cond, **kw
        )
    return FMLM(net, make_schedule("decoding_error", V), objective=objective, noise=noise, cond=cond, **kw)


def ids_batch(seed=3):
    return torch.randint(V, (B, L), generator=gen(seed))


# ------------------------------------------------------------------------------------- the given positions
def test_draw_prefixes_spans_and_rates():
    g = Conditioning(1.0).draw(4000, L, gen(), "cpu")
    n = g.sum(1)
    assert (g == (torch.arange(L)[None] < n[:, None])).all()  # prefixes
    assert n.min() == 1 and n.max() == L - 1  # every length 1..L-1, a free position always left
    half = Conditioning(0.5).draw(4000, L, gen(), "cpu").any(1).float().mean()
    assert 0.45 < half < 0.55
    dropped = Conditioning(1.0, cfg_drop=0.25).draw(4000, L, gen(), "cpu").any(1).float().mean()
    assert 0.7 < dropped < 0.8
    spans = Conditioning(1.0, infill_prob=1.0).draw(4000, L, gen(), "cpu")
    assert not spans.all(1).any()  # a free position in every row
    not_prefix = (spans != (torch.arange(L)[None] < spans.sum(1, keepdim=True))).any(1)
    assert not_prefix.float().mean() > 0.5  # mostly genuine spans (gaps inside, given after free)
    assert (Conditioning(1.0).draw(5, 1, gen(), "cpu") == 0).all()  # nothing to condition a length-1 row on


def test_given_embedding_only_with_conditioning():
    for method in ("flm", "mdlm", "duo", "semigroup"):
        cfg = build_config("tiny", [f"method={method}"] + (["self_distill=true"] if method == "semigroup" else []))
        cfg.model.vocab_size, cfg.model.max_seq_len = V, L
        plain = build_method(cfg)
        assert plain.net.given_embed is None and not any("given" in k for k in plain.state_dict())
        assert getattr(plain, "cond", None) is None
        cfg.train.cond_prob = 0.5
        cond = build_method(cfg)
        assert cond.net.given_embed is not None and "net.given_embed" in cond.state_dict()
        assert cond.cond == Conditioning(0.5)


def test_backbone_without_given_embedding_rejects_the_flag():
    net = dit(given=False)
    with pytest.raises(Exception, match="no given embedding"):
        net(torch.zeros(1, L, dtype=torch.long), torch.zeros(1), given=torch.ones(1, L, dtype=torch.bool))


# ------------------------------------------------------------------------------------- the conditional losses
class Perturb:
    """Hooks on backbones: record each forward's ``given`` flag and (optionally) move the outputs at
    the given positions; collect the gradient that reaches the outputs."""

    def __init__(self, nets, shift: bool):
        self.shift, self.outs, self.flags = shift, [], []
        for net in nets:
            net.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, out):
        given = kwargs.get("given")
        if given is None:
            return None
        if self.shift:  # a fixed, RNG-free perturbation of every given position's logits
            wave = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view(out.shape) * 7.0
            out = out + torch.where(given[..., None], wave, torch.zeros_like(out))
        if out.requires_grad:
            out.retain_grad()
            self.outs.append(out)
            self.flags.append(given)
        return out


def _nets(m):
    nets = [m.net]
    for other in (getattr(m, "teacher", None), getattr(m, "_target", None)):
        if other is not None:
            nets.append(other.net if hasattr(other, "net") else other)
    return nets


CASES = {
    "flm-vocab": lambda: flm("vocab"),
    "flm-embedded": lambda: flm("embedded"),
    "flm-mse": lambda: flm("vocab", "mse_denoiser"),
    "semigroup": lambda: fmlm(),
    "semigroup-embedded": lambda: fmlm(noise="embedded"),
    "semigroup-self-ema": lambda: fmlm(teacher=False, target_ema=0.9),
    "lagrangian": lambda: fmlm("lagrangian"),
    "eulerian": lambda: fmlm("eulerian"),
    "eulerian-embedded-mse": lambda: fmlm(
        "eulerian", teacher=False, noise="embedded", eulerian_loss="mse", projection="none"
    ),
}


SLOW = {"lagrangian", "eulerian"}  # a JVP through the network


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_conditional_loss_ignores_known_positions(case):
    """Moving the outputs (the student's, and the teacher's: the loss target) at the given positions
    changes nothing; the gradient reaches the outputs only at the free positions."""
    m = CASES[case]()
    loss, metrics = m.loss(ids_batch(), gen(11))
    assert metrics["loss"] > 0
    m2 = CASES[case]()
    rec = Perturb(_nets(m2), shift=True)
    loss2, _ = m2.loss(ids_batch(), gen(11))
    assert rec.flags and any(f.any() for f in rec.flags)  # the test is not vacuous
    assert torch.equal(loss, loss2)
    loss2.backward()
    for out, given in zip(rec.outs, rec.flags):
        assert (out.grad[given] == 0).all()
        assert out.grad[~given].abs().sum() > 0


@pytest.mark.parametrize("method", ["mdlm", "duo"])
def test_discrete_conditional_loss_ignores_known_positions(method):
    torch.manual_seed(0)
    if method == "mdlm":
        m = MDLM(perturbed(DiT(V + 1, L, 2, 32, 4, 16, given_embedding=True)), cond=COND)
    else:
        m = Duo(perturbed(DiT(V, L, 2, 32, 4, 16, given_embedding=True)), cond=COND)
    m.train()
    loss, _ = m.loss(ids_batch(), gen(11))
    rec = Perturb([m.net], shift=True)
    loss2, _ = m.loss(ids_batch(), gen(11))
    assert rec.flags and rec.flags[0].any()
    assert torch.allclose(loss, loss2, rtol=0, atol=1e-6)  # MDLM: SUBS overwrites given outputs anyway
    loss2.backward()
    out, given = rec.outs[0], rec.flags[0]
    assert (out.grad[given] == 0).all() and out.grad[~given].abs().sum() > 0


def test_conditional_flm_loss_differs_from_unconditional():
    """The conditioning changes the loss (given positions enter clean): the tests above are not vacuous."""
    a, _ = flm(cond=COND).loss(ids_batch(), gen(11))
    b, _ = flm(cond=None).loss(ids_batch(), gen(11))
    assert not torch.equal(a, b)


# ------------------------------------------------------------------------------------- sampling
KNOWN = torch.tensor([3, 0, 7, 0, 0, 2])
MASK = torch.tensor([True, False, True, False, False, True])


@pytest.mark.parametrize("make", [flm, fmlm], ids=["flm", "fmlm"])
def test_learned_conditioning_flags_the_known_positions(make):
    m = make().eval()
    flags = []
    m.net.register_forward_pre_hook(lambda mod, a, kw: flags.append(kw.get("given")), with_kwargs=True)
    ids = m.sample(6, L, 2, generator=gen(), known=KNOWN, mask=MASK)
    assert (ids[:, MASK] == KNOWN[MASK]).all()
    assert flags and all(f is not None and (f == MASK).all() for f in flags)
    flags.clear()
    opts = {"invert_iters": 2} if isinstance(m, FMLM) else {}
    steered = m.sample(6, L, 2, generator=gen(), known=KNOWN, mask=MASK, cond_mode="steer", **opts)
    assert flags and all(f is None for f in flags) and (steered[:, MASK] == KNOWN[MASK]).all()


@pytest.mark.parametrize("make", [flm, fmlm], ids=["flm", "fmlm"])
@pytest.mark.parametrize("steps", [1, 3])
def test_cfg_weight_zero_is_conditional_sampling_bit_for_bit(make, steps):
    m = make().eval()
    base = m.sample(32, L, steps, generator=gen(), known=[4, 5])
    zero = m.sample(32, L, steps, generator=gen(), known=[4, 5], cfg_weight=0.0)
    assert torch.equal(base, zero)
    strong = m.sample(32, L, steps, generator=gen(), known=[4, 5], cfg_weight=4.0)
    assert (strong[:, :2] == torch.tensor([4, 5])).all()
    assert not torch.equal(base, strong)  # the guidance does something


@pytest.mark.parametrize("make", [flm, fmlm], ids=["flm", "fmlm"])
def test_learned_mode_needs_a_conditioned_model(make):
    m = make(cond=None, given=False).eval()
    with pytest.raises(ValueError, match="trained without conditioning"):
        m.sample(2, L, 1, generator=gen(), known=[4], cond_mode="learned")
    with pytest.raises(ValueError, match="classifier-free guidance"):
        m.sample(2, L, 1, generator=gen(), known=[4], cfg_weight=1.0)
    with pytest.raises(ValueError, match="unknown cond_mode"):
        make().eval().sample(2, L, 1, generator=gen(), known=[4], cond_mode="nosuch")


# ------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cond")
    common = ["threads=1", "max_steps=2", "eval_every=2", "save_every=2", "--quiet", "--no-samples"]
    assert (
        main(["train", "tiny", "method=flm", "cond_prob=0.5", "cfg_drop=0.2", *common, "--run-dir", str(d / "c")]) == 0
    )
    assert main(["train", "tiny", "method=flm", *common, "--run-dir", str(d / "p")]) == 0
    return d


def _word(run):
    from fmlm.api import load

    m = load(str(run))
    return m, m.tokenizer.decode([m.task.phrases[0][0]])


def test_cli_learned_steer_and_cfg(cond_run, capsys):
    m, w = _word(cond_run / "c")
    for extra in ([], ["--steer"], ["--cfg-weight", "2"]):
        assert main(["sample", "--ckpt", str(cond_run / "c"), "--steps", "2", "-n", "4", "--prefix", w, *extra]) == 0
        out = capsys.readouterr().out.split("\n\n")
        assert all(t.startswith(w) for t in out if t.strip())


@pytest.mark.parametrize(
    "run,argv,msg",
    [
        ("c", ["--prefix", "LONG"], "more than the sequence length"),
        ("c", ["--infill", "WORD"], "needs at least one [MASK]"),
        ("c", ["--steer"], "need --prefix"),
        ("c", ["--prefix", "WORD", "--steer", "--cfg-weight", "1"], "not --steer"),
        ("p", ["--prefix", "WORD", "--cfg-weight", "1"], "classifier-free guidance"),
    ],
)
def test_cli_errors(cond_run, capsys, run, argv, msg):
    m, w = _word(cond_run / run)
    argv = [" ".join([w] * (m.task.seq_len + 1)) if a == "LONG" else w if a == "WORD" else a for a in argv]
    assert main(["sample", "--ckpt", str(cond_run / run), "--steps", "1", "-n", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,msg",
    [
        (["method=ar", "cond_prob=0.5"], "train.cond_prob applies to methods"),
        (["method=flm", "cfg_drop=0.5"], "need train.cond_prob > 0"),
        (["method=flm", "cond_prob=1.5"], "train.cond_prob must be in [0, 1]"),
    ],
)
def test_config_errors(tmp_path, capsys, args, msg):
    assert main(["train", "tiny", *args, "max_steps=1", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_distilling_needs_a_teacher_with_the_same_conditioning(cond_run, capsys, tmp_path):
    argv = ["distill", "--teacher", str(cond_run / "p"), "cond_prob=0.5", "threads=1", "max_steps=1"]
    assert main([*argv, "--quiet", "--no-samples", "--run-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "needs a teacher trained with it" in err and len(err.strip().splitlines()) == 1


def test_server_cfg_weight(tmp_path):
    pytest.importorskip("fastapi")
    from fmlm.api import Model
    from fmlm.data import PhrasesTask
    from fmlm.serve import BadRequest, ServeLimits, wrap_model
    from fmlm.serve.requests import parse_request

    task = PhrasesTask(n=4, k=2, phrases_per_seq=1, seed=0)
    served = {}
    for name, extra in (("c", ["cond_prob=0.5"]), ("p", []), ("m", ["method=mdlm", "cond_prob=0.5"])):
        cfg = build_config("tiny", ["method=flm", *extra])
        cfg.model.vocab_size, cfg.model.max_seq_len = task.tokenizer.vocab_size, cfg.data.seq_len
        served[name] = wrap_model(name, Model(cfg, build_method(cfg).eval(), task.tokenizer, tmp_path / name))
    word = task.tokenizer.decode([task.phrases[0][0]])

    def parse(body):
        return parse_request(json.dumps(body).encode(), served, ServeLimits(), stream=False)

    assert parse({"model": "c", "prefix": word, "cfg_weight": 2}).options["cfg_weight"] == 2.0
    for body, msg in (
        ({"model": "p", "prefix": word, "cfg_weight": 1}, "needs a model trained with conditioning"),
        ({"model": "c", "cfg_weight": 1}, "needs a prefix"),
        ({"model": "c", "prefix": word, "cfg_weight": "x"}, "must be a finite number"),
        ({"model": "m", "prefix": word, "cfg_weight": 1}, "does not apply to model 'm'"),
    ):
        with pytest.raises(BadRequest, match=msg):
            parse(body)
