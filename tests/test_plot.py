"""fmlm plot: the schedule figure, the V = 3 simplex task and its pictures."""

import math

import pytest
import torch

pytest.importorskip("matplotlib")

from fmlm.cli import main  # noqa: E402
from fmlm.data.simplex import Simplex3, from_plane, to_plane  # noqa: E402
from fmlm.errors import DataError  # noqa: E402
from fmlm.plot import plot_schedule, plot_simplex  # noqa: E402


def test_plane_projection_roundtrip_and_corners():
    uv = torch.randn(50, 2, dtype=torch.float64)
    x = from_plane(uv)
    assert torch.allclose(x.sum(-1), torch.ones(50, dtype=torch.float64))
    assert torch.allclose(to_plane(x), uv)
    # Moving along (1, 1, 1) does not change the projection; the corners form an equilateral triangle.
    assert torch.allclose(to_plane(x + 0.7), uv)
    c = to_plane(torch.eye(3))
    d = [float((c[i] - c[j]).norm()) for i, j in ((0, 1), (1, 2), (0, 2))]
    assert all(abs(v - math.sqrt(2)) < 1e-12 for v in d)


def test_exact_denoiser_is_the_bayes_posterior():
    task = Simplex3((0.6, 0.3, 0.1))
    g = torch.Generator().manual_seed(0)
    t = 0.4
    # Monte Carlo: the share of each token among draws whose I_t lands near a fixed point.
    ids = task.sample(400_000, g)[:, 0]
    x = (1 - t) * torch.randn(400_000, 3, generator=g, dtype=torch.float64) + t * torch.eye(3, dtype=torch.float64)[ids]
    point = torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64)
    near = (x - point).norm(dim=-1) < 0.25
    mc = torch.bincount(ids[near], minlength=3).double() / near.sum()
    assert near.sum() > 2000
    assert torch.allclose(task.exact_denoiser(point, t), mc, atol=0.05)
    # Bayes with the Gaussian likelihoods written out.
    lik = torch.exp(-((point - t * torch.eye(3, dtype=torch.float64)) ** 2).sum(-1) / (2 * (1 - t) ** 2))
    post = task.probs * lik / (task.probs * lik).sum()
    assert torch.allclose(task.exact_denoiser(point, t), post, atol=1e-12)
    # Invariant to shifts along (1, 1, 1); tensor t broadcasts.
    assert torch.allclose(task.exact_denoiser(point + 3.0, t), task.exact_denoiser(point, t))
    both = task.exact_denoiser(torch.stack([point, point]), torch.tensor([t, t]))
    assert torch.allclose(both[1], task.exact_denoiser(point, t))
    with pytest.raises(DataError):
        Simplex3((0.5, 0.5, 0.5))


def test_plot_schedule_writes_png_and_svg(tmp_path):
    files = plot_schedule([3, 100], tmp_path)
    assert sorted(p.rsplit(".", 1)[1] for p in files) == ["png", "svg"]
    assert all((tmp_path / f"schedule.{e}").stat().st_size > 5_000 for e in ("png", "svg"))


@pytest.mark.slow
def test_plot_simplex_trains_and_draws(tmp_path):
    r = plot_simplex(
        tmp_path, seed=0, flm_steps=100, fmlm_steps=10, progress=False, n_metrics=300, ref_steps=16, res=24
    )
    names = {p.rsplit("/", 1)[1] for p in r["files"]}
    for stem in ("simplex-field", "simplex-trajectories", "simplex-flow-vs-map"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
    m = r["metrics"]
    # Even 100 training steps bring the denoiser close to the exact posterior.
    assert m["denoiser_tv_mean"] < 0.2
    assert abs(sum(m["flm16_freq"]) - 1.0) < 1e-6
    assert 0.0 <= m["fmlm1_agree_flm16"] <= 1.0


def test_cli_plot_schedule_and_bad_vocab(tmp_path, capsys):
    assert main(["plot", "schedule", "--vocab", "3,7", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "schedule.svg").is_file()
    capsys.readouterr()
    assert main(["plot", "schedule", "--vocab", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "vocab_size must be >= 2" in err and "Traceback" not in err
