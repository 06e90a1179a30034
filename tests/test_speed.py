"""Lean sampling paths, fused distillation losses, the AR decoder and `fmlm bench speed` / the GPU check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fmlm.methods.flow_map.losses as fmlm_mod
from fmlm.config import build_config
from fmlm.methods import build_method
from fmlm.methods.embedded import draw_embedded, noise_factor
from fmlm.methods.fmlm import FMLM, kl_capped, kl_rows
from fmlm.nn.dit import apply_rotary, rotary_qkv

ROOT = Path(__file__).resolve().parents[1]


def _fmlm(V: int, L: int = 16, seed: int = 0) -> FMLM:
    cfg = build_config("tiny", ["train.method=semigroup"])
    cfg.model.vocab_size, cfg.model.max_seq_len = V, L
    torch.manual_seed(seed)
    m = build_method(cfg).eval()
    with torch.no_grad():  # leave adaLN-zero: every block does something
        for p in m.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("steps,gamma", [(1, 0.0), (2, 0.0), (4, 0.0), (4, 0.3)])
def test_lean_sampler_same_tokens_as_reference_when_x0_is_drawn_exactly(steps, gamma):
    # V = 40 < d = 64: the lean path draws x0 itself (the exact and cheaper way), so it consumes the
    # generator exactly as the reference does and must give its tokens at the same seed.
    m = _fmlm(40)
    a = m.sample(6, 16, steps, generator=torch.Generator().manual_seed(3), gamma=gamma)
    b = m.sample(6, 16, steps, generator=torch.Generator().manual_seed(3), gamma=gamma, noise="vocab")
    assert torch.equal(a, b)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lean_sampler_same_tokens_as_reference_for_the_same_x0(steps):
    # V = 300 > d = 64: the lean draw goes through a Cholesky factor of EᵀE (another random stream),
    # so the comparison feeds both paths one x0: the reference draws it first from its generator.
    m = _fmlm(300)
    ref = m.sample(8, 16, steps, generator=torch.Generator().manual_seed(5), noise="vocab")
    x0 = torch.randn(8, 16, 300, generator=torch.Generator().manual_seed(5))
    lean = m.sample_embedded(x0 @ m.net.embed, steps)
    if steps == 1:
        assert torch.equal(lean, ref)  # the same arithmetic: bit for bit
    else:  # the states after the first step differ by rounding ((a·x + b·δ) @ E vs a·(x @ E) + b·(δ @ E))
        assert (lean == ref).float().mean() >= 0.99


def test_lean_draw_has_the_embedded_covariance_and_factor_follows_the_weights():
    torch.manual_seed(0)
    E = torch.randn(200, 8) * 0.3
    factor = noise_factor(E)
    y = draw_embedded(E, (40_000,), torch.Generator().manual_seed(0), factor)
    cov = y.t() @ y / y.shape[0]
    target = E.t() @ E
    assert torch.allclose(cov, target, atol=0.05 * target.diag().max())
    assert noise_factor(torch.randn(5, 8)) is None  # d >= V: draw x0 itself
    m = _fmlm(300)
    f1 = m._noise_factor()
    assert m._noise_factor() is f1  # cached
    with torch.no_grad():
        m.net.embed.mul_(2.0)
    assert torch.allclose(m._noise_factor(), 2 * f1, rtol=1e-4, atol=1e-6)


def test_lean_sampler_draws_without_a_vocab_sized_gaussian(randn_shapes):
    m = _fmlm(300)
    shapes = randn_shapes
    m.sample(2, 16, 1, generator=torch.Generator().manual_seed(0))
    assert shapes and all(s[-1] != 300 for s in shapes)
    shapes.clear()
    m.sample(2, 16, 1, generator=torch.Generator().manual_seed(0), noise="vocab")
    assert any(s[-1] == 300 for s in shapes)


def test_unknown_noise_path_is_an_error():
    with pytest.raises(ValueError, match="noise path"):
        _fmlm(40).sample(1, 16, 1, noise="bogus")


@pytest.mark.parametrize("cap", [0.0, 2.0, 30.0])
def test_kl_capped_equals_autograd_reference(cap, monkeypatch):
    # Two rows per chunk, so that the chunking itself is exercised.
    monkeypatch.setattr(fmlm_mod, "_row_chunks", lambda n, v: [slice(i, min(i + 2, n)) for i in range(0, n, 2)])
    torch.manual_seed(0)
    z = (torch.randn(3, 5, 70) * 5).requires_grad_()
    p = torch.randn(3, 5, 70).softmax(-1)
    p[0, 0, :10] = 0  # zeros in the target: 0·log 0 = 0
    p[0, 0] /= p[0, 0].sum()
    y = cap * torch.tanh(z / cap) if cap > 0 else z
    ref = kl_rows(p, y.log_softmax(-1))
    g = torch.randn(3, 5)
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), z)
    out = kl_capped(p, z, cap)
    (grad,) = torch.autograd.grad((out * g).sum(), z)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(grad, grad_ref, atol=1e-6)


def _distill(objective: str, noise: str, fused: bool, self_distill: bool = False) -> FMLM:
    cfg = build_config("tiny", ["train.method=flm"])
    cfg.model.vocab_size, cfg.model.max_seq_len = 120, 16
    torch.manual_seed(0)
    teacher = build_method(cfg)
    with torch.no_grad():
        for p in teacher.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    scfg = build_config("tiny", [f"train.method={objective}"])
    scfg.model.vocab_size, scfg.model.max_seq_len = 120, 16
    student = build_method(scfg)
    if self_distill:
        student.net.load_state_dict(teacher.net.state_dict(), strict=False)
        return FMLM(student.net, teacher.schedule, objective=objective, noise=noise, fused=fused)
    return FMLM.from_teacher(teacher, student.net, objective=objective, noise=noise, fused=fused)


@pytest.mark.parametrize(
    "objective,noise,self_distill",
    [
        ("semigroup", "embedded", False),
        ("semigroup", "vocab", False),
        ("semigroup", "embedded", True),
        ("lagrangian", "embedded", False),
        ("eulerian", "vocab", False),
    ],
)
def test_fused_distillation_loss_equals_the_reference(objective, noise, self_distill):
    ids = torch.randint(120, (6, 16), generator=torch.Generator().manual_seed(1))
    out = []
    for fused in (True, False):
        m = _distill(objective, noise, fused, self_distill)
        loss, metrics = m.loss(ids, torch.Generator().manual_seed(2))
        loss.backward()
        out.append(
            (
                loss.detach(),
                {k: v.item() for k, v in metrics.items()},
                [p.grad.clone() for p in m.net.parameters() if p.grad is not None],
            )
        )
    (l1, m1, g1), (l2, m2, g2) = out
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-6)
    assert m1.keys() == m2.keys() and all(abs(m1[k] - m2[k]) <= 1e-5 * (1 + abs(m2[k])) for k in m1)
    assert len(g1) == len(g2) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g1, g2))


def test_no_graph_logit_cap_in_place_is_bit_identical():
    m = _fmlm(50)
    x = torch.randn(2, 16, 50)
    t = torch.rand(2)
    with torch.no_grad():
        a = m.net(x, t, t)
        m.net.inplace_cap = False
        b = m.net(x, t, t)
    assert torch.equal(a, b)
    raw = m.net(x, t, t, cap=False)
    assert torch.equal(m.net.logit_cap * torch.tanh(raw / m.net.logit_cap), m.net(x, t, t))


def test_rotary_qkv_is_apply_rotary_bit_for_bit():
    torch.manual_seed(0)
    B, L, H, hd = 2, 7, 3, 8
    qkv = torch.randn(B, L, 3 * H * hd)
    cos, sin = torch.randn(L, hd // 2), torch.randn(L, hd // 2)
    q, k, v = qkv.view(B, L, 3, H, hd).permute(2, 0, 3, 1, 4)
    q2, k2, v2 = rotary_qkv(qkv, H, (cos, sin))
    assert torch.equal(q2, apply_rotary(q, cos, sin)) and torch.equal(k2, apply_rotary(k, cos, sin))
    assert torch.equal(v2, v)


@pytest.mark.parametrize("opts", [{}, {"temperature": 0.0}, {"float64": True, "top_k": 5}])
def test_ar_cached_decoder_same_tokens_as_full_recompute(opts):
    cfg = build_config("tiny", ["train.method=ar"])
    cfg.model.vocab_size, cfg.model.max_seq_len = 30, 12
    torch.manual_seed(0)
    m = build_method(cfg).eval()
    seen = []
    a = m.sample(
        5,
        12,
        generator=torch.Generator().manual_seed(4),
        callback=lambda l, ids, logits: seen.append(ids.clone()),
        **opts,
    )
    b = m.sample(5, 12, generator=torch.Generator().manual_seed(4), use_cache=False, **opts)
    assert torch.equal(a, b)
    assert [s.shape[1] for s in seen] == list(range(1, 13)) and torch.equal(seen[-1], a)
    assert all(torch.equal(s, a[:, : s.shape[1]]) for s in seen)


def test_bench_speed_counts_flops_exactly_and_writes_its_outputs(tmp_path):
    from fmlm.bench import dispatch
    from fmlm.bench.flops import ar_flops, dit_flops

    out = tmp_path / "speed"
    rc = dispatch(
        "speed",
        [
            "--shape",
            "tiny:50:16:1,2",
            "--shape",
            "tiny:300:16:2",
            "--steps",
            "2",
            "--repeats",
            "2",
            "--min-seconds",
            "0",
            "--gemm",
            "128",
            "--threads",
            "1",
            "--profile",
            "--out",
            str(out),
        ],
    )
    assert rc == 0
    res = json.loads((out / "speed.json").read_text())
    assert (out / "speed.md").read_text().count("### tiny") == 2
    assert (out / "speed.png").stat().st_size > 0
    assert len(res["shapes"]) == 2
    s0 = res["shapes"][0]
    assert {(r["method"], r["batch"]) for r in s0["rows"]} == {
        (m, b) for m in ("fmlm", "fmlm-ref", "flm", "mdlm", "duo", "ar") for b in (1, 2)
    }
    for shape in res["shapes"]:
        V = shape["shape"]["vocab"]
        fm, ar = _fmlm(V), None
        cfg = build_config("tiny", ["train.method=ar"])
        cfg.model.vocab_size, cfg.model.max_seq_len = V, 16
        ar = build_method(cfg)
        for r in shape["rows"]:
            assert len(r["seconds"]) == 2 and r["utilisation"] > 0 and r["seconds_per_sample"] > 0
            if r["method"] == "fmlm":  # the lean path: no input product inside the network
                assert r["network_flops"] == dit_flops(fm.net, r["batch"], 16, embedded_input=True)
            if r["method"] == "fmlm-ref":
                assert r["network_flops"] == dit_flops(fm.net, r["batch"], 16, embedded_input=False)
            if r["method"] == "ar":
                assert r["network_flops"] == ar_flops(ar.net, r["batch"], 16)
        assert shape["peak_flop_per_s"] >= max(p["flop_per_s"] for p in shape["peaks"]) > 0
        profiled = [r for r in shape["rows"] if "profile" in r]
        assert sorted(r["method"] for r in profiled) == ["ar", "fmlm"]
        assert all(abs(sum(r["profile"]["shares"].values()) - 1) < 1e-6 for r in profiled)


def test_analytic_flops_equal_the_counter():
    from fmlm.bench.flops import analytic_flops, count_network_flops
    from fmlm.bench.speed import _models, _sampler

    cpu = torch.device("cpu")
    names = ["fmlm", "fmlm-ref", "flm", "duo", "ar"]
    for name, (method, net) in _models({"size": "tiny", "vocab": 70, "seq_len": 16}, names, cpu, None).items():
        for B in (1, 3):
            counted = count_network_flops(_sampler(name, method, B, 16, 2, 0, cpu), net)["network_flops"]
            assert analytic_flops(name, net, B, 16, 2)["network_flops"] == counted, (name, B)


def test_bench_speed_bad_input_is_a_config_error(tmp_path):
    from fmlm.bench import dispatch
    from fmlm.errors import ConfigError

    with pytest.raises(ConfigError, match="bad --shape"):
        dispatch("speed", ["--shape", "tiny:50", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="unknown sampler"):
        dispatch("speed", ["--methods", "fmlm,gpt", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="unknown model size"):
        dispatch("speed", ["--shape", "huge:50:16:1", "--out", str(tmp_path)])


def test_gpu_check_runs_in_tiny_cpu_mode(tmp_path):
    env = dict(
        os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHON=sys.executable
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["config"] for r in res["train"]] == ["flm-vocab", "flm-embedded", "fmlm", "mdlm"]
    assert all(r["tokens_per_s"] > 0 and r["batch"] == 4 and r["peak_mib"] > 0 for r in res["train"])
    rows = res["sampling"][0]["shapes"][0]["rows"]
    assert {r["method"] for r in rows} == {"fmlm", "fmlm-ref", "ar"}
    assert "| fmlm |" in (tmp_path / "gpu_check.md").read_text()


def test_bench_speed_times_a_checkpoint(tmp_path):
    from fmlm.bench import dispatch
    from fmlm.cli import main
    from test_cli import TINY  # the CLI tests' tiny preset

    run = tmp_path / "flm"
    assert (
        main(
            [
                "train",
                *TINY,
                "method=flm",
                f"data.cache_dir={tmp_path / 'cache'}",
                "--run-dir",
                str(run),
                "--quiet",
                "--no-samples",
            ]
        )
        == 0
    )
    out = tmp_path / "speed"
    assert (
        dispatch(
            "speed",
            [
                "--ckpt",
                str(run),
                "--batches",
                "1,2",
                "--steps",
                "2",
                "--repeats",
                "1",
                "--min-seconds",
                "0",
                "--gemm",
                "128",
                "--threads",
                "1",
                "--no-plot",
                "--out",
                str(out),
            ],
        )
        == 0
    )
    res = json.loads((out / "speed.json").read_text())
    assert [(r["method"], r["batch"]) for r in res["shapes"][0]["rows"]] == [("flm", 1), ("flm", 2)]
    assert res["settings"]["ckpt"] == str(run)
