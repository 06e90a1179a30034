"""``fmlm plot``: the explanatory pictures (matplotlib, PNG and SVG).

* ``schedule``: the decoding error P_e(t) and the network time τ(t) for some vocabulary sizes.
* ``simplex``: a tiny FLM and a flow map distilled from it, trained in seconds on the V = 3 task
  :class:`fmlm.data.simplex.Simplex3`, drawn on the 2-simplex (projection: see that module):
  the learned denoiser's decision regions with the velocity field, sample trajectories, and
  the flow (many small Euler steps) versus the flow map (one or two jumps) from the same noise.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from fmlm.errors import FmlmError
from fmlm.io import write_json

_COLOURS = ((0.85, 0.20, 0.20), (0.20, 0.55, 0.85), (0.25, 0.70, 0.30))  # tokens a, b, c


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FmlmError("fmlm plot needs matplotlib: pip install 'fmlm[plot]'") from None
    return plt


def _save(fig, out: Path, name: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, dpi=130 if ext == "png" else None, bbox_inches="tight")
        paths.append(str(p))
    _plt().close(fig)
    return paths


# --------------------------------------------------------------------------- schedule
def plot_schedule(vocab_sizes: list[int], out: Path) -> list[str]:
    """P_e(t) (log scale) and τ(t) for each vocabulary size."""
    import numpy as np

    from fmlm.schedule import DecodingErrorSchedule

    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    t = np.linspace(0.0, 0.999, 1000)
    for K in vocab_sizes:
        s = DecodingErrorSchedule(K)
        ax1.semilogy(t, s.p_error(t), label=f"V = {K:,}")
        ax2.plot(t, s.tau(torch.as_tensor(t)).numpy(), label=f"V = {K:,}")
    ax1.set(
        xlabel="interpolant time t",
        ylabel="P_e(t) = P[argmax I_t ≠ true token]",
        title="Decoding error of the noisy one-hot",
        ylim=(1e-6, 1.0),
    )
    ax2.plot(t, t, "k:", lw=1, label="τ = t (uniform)")
    ax2.set(
        xlabel="interpolant time t",
        ylabel="τ(t) = 1 − V/(V−1)·P_e(t)",
        title="Network time τ (sampler steps are uniform in τ)",
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, "schedule")


# --------------------------------------------------------------------------- the toy models
def _toy_net(two_time: bool):
    from fmlm.config import ModelConfig
    from fmlm.nn.dit import build_dit

    return build_dit(dataclasses.replace(ModelConfig(), vocab_size=3, max_seq_len=1, two_time=two_time))


def _fit(module, task, steps: int, batch: int, lr: float, gen: torch.Generator, desc: str, progress: bool) -> float:
    from tqdm import tqdm

    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.99))
    module.train()
    loss = torch.zeros(())
    bar = tqdm(range(steps), desc=desc, disable=not progress, file=sys.stderr, leave=False)
    for _ in bar:
        loss, _ = module.loss(task.sample(batch, gen), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        if hasattr(module, "on_step_end"):
            module.on_step_end()
    module.eval()
    return float(loss.detach())


def train_toy(task, seed: int = 0, flm_steps: int = 1000, fmlm_steps: int = 1500, progress: bool = True):
    """A tiny FLM on ``task`` and a semigroup flow map distilled from it (seconds on a CPU)."""
    from fmlm.methods.flm import FLM
    from fmlm.methods.flow_map import FMLM
    from fmlm.schedule import DecodingErrorSchedule

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    flm = FLM(_toy_net(False), DecodingErrorSchedule(3), noise="vocab")
    flm_loss = _fit(flm, task, flm_steps, 256, 2e-3, gen, "simplex3 FLM", progress)
    for p in flm.parameters():
        p.requires_grad_(False)
    fmlm = FMLM.from_teacher(flm, _toy_net(True), objective="semigroup", noise="vocab")
    fmlm_loss = _fit(fmlm, task, fmlm_steps, 256, 1e-3, gen, "simplex3 flow map", progress)
    return flm, fmlm, {"flm_final_loss": flm_loss, "fmlm_final_loss": fmlm_loss}


@torch.no_grad()
def _trajectories(method, n: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """States (n, steps + 1, 3): the start, the state before each later step, and the final prediction."""
    states = []

    def cb(i, z, d):
        states.append(z[:, 0].double().clone())
        if i == steps - 1:
            states.append(d[:, 0].double().clone())

    ids = method.sample(n, 1, steps, generator=torch.Generator().manual_seed(seed), callback=cb)
    return torch.stack(states, 1), ids[:, 0]


@torch.no_grad()
def toy_metrics(task, flm, fmlm, n: int = 2000, seed: int = 1, ref_steps: int = 128) -> dict:
    """How well the toy models learned: denoiser vs the exact one (total variation at random
    (τ, I_t)), token frequencies, and how often few-step samplers end on the same token as the
    ``ref_steps``-step flow from the same noise (``*_agree_flm<ref_steps>``)."""
    gen = torch.Generator().manual_seed(seed)
    ids = task.sample(n, gen)
    tau = torch.rand(n, generator=gen)
    t = flm.schedule.t(tau.double()).float()
    noise = torch.randn(n, 1, 3, generator=gen)
    x = flm.interpolate(ids, t, noise)
    d = flm.denoise(x, tau)[:, 0].double()
    exact = task.exact_denoiser(x[:, 0], t.double())
    tv = 0.5 * (d - exact).abs().sum(-1)
    ref_traj, ref_ids = _trajectories(flm, n, ref_steps, seed)
    ref = f"flm{ref_steps}"
    out = {
        "denoiser_tv_mean": float(tv.mean()),
        "denoiser_tv_p95": float(tv.quantile(0.95)),
        "data_probs": task.probs.tolist(),
        "ref_steps": ref_steps,
        f"{ref}_freq": torch.bincount(ref_ids, minlength=3).div(n).tolist(),
    }
    for name, m, steps in (
        ("flm", flm, 1),
        ("flm", flm, 2),
        ("flm", flm, 4),
        ("flm", flm, 16),
        ("fmlm", fmlm, 1),
        ("fmlm", fmlm, 2),
        ("fmlm", fmlm, 4),
    ):
        traj, got = _trajectories(m, n, steps, seed)
        out[f"{name}{steps}_agree_{ref}"] = float((got == ref_ids).double().mean())
        out[f"{name}{steps}_end_dist_{ref}"] = float((traj[:, -1] - ref_traj[:, -1]).norm(dim=-1).mean())
        out[f"{name}{steps}_freq"] = torch.bincount(got, minlength=3).div(n).tolist()
    return out


# --------------------------------------------------------------------------- simplex pictures
def _triangle(ax, lim: float):
    from fmlm.data.simplex import to_plane

    corners = to_plane(torch.eye(3))
    tri = torch.cat([corners, corners[:1]])
    ax.plot(tri[:, 0], tri[:, 1], "k-", lw=1.2)
    for k, name in enumerate("abc"):
        u, v = corners[k].tolist()
        ax.annotate(
            name,
            (u, v),
            xytext=(u * 1.13, v * 1.13 - 0.02),
            ha="center",
            va="center",
            fontsize=11,
            fontweight="bold",
            color=_COLOURS[k],
        )
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


@torch.no_grad()
def plot_field(task, flm, out: Path, taus=(0.15, 0.4, 0.65, 0.9), lim: float = 1.4, res: int = 112) -> list[str]:
    """Decision regions (colour = the learned D mixed from the token colours), the exact
    decision boundary (dashed) and the projected velocity (D − x)/(1 − t) on the plane."""
    from fmlm.data.simplex import from_plane, to_plane

    plt = _plt()
    fig, axes = plt.subplots(1, len(taus), figsize=(4.2 * len(taus), 4.4))
    g = torch.linspace(-lim, lim, res)
    uu, vv = torch.meshgrid(g, g, indexing="xy")
    x = from_plane(torch.stack([uu, vv], -1)).float()  # (res, res, 3)
    colours = torch.tensor(_COLOURS)
    for ax, tau in zip(axes, taus):
        t = float(flm.schedule.t(torch.tensor(tau, dtype=torch.float64)))
        d = flm.denoise(x.reshape(-1, 1, 3), torch.full((res * res,), tau))[:, 0].reshape(res, res, 3)
        img = (d @ colours) * d.max(-1).values[..., None] + (1 - d.max(-1).values[..., None])  # fade when unsure
        ax.imshow(img.clamp(0, 1).numpy(), origin="lower", extent=(-lim, lim, -lim, lim), interpolation="bilinear")
        exact = task.exact_denoiser(x.double(), t).argmax(-1).double()
        ax.contour(uu, vv, exact, levels=[0.5, 1.5], colors="k", linestyles="--", linewidths=1.0)
        learned = d.argmax(-1).double()
        ax.contour(uu, vv, learned, levels=[0.5, 1.5], colors="w", linewidths=1.2)
        step = res // 14
        xs, ds = x[::step, ::step], d[::step, ::step]
        vel = to_plane((ds.double() - xs.double()) / (1 - t))
        pos = to_plane(xs)
        ax.quiver(
            pos[..., 0],
            pos[..., 1],
            vel[..., 0],
            vel[..., 1],
            color="k",
            alpha=0.55,
            angles="xy",
            scale_units="xy",
            scale=max(1.0, float(vel.norm(dim=-1).max()) / 0.25),
            width=0.004,
        )
        _triangle(ax, lim)
        ax.set_title(f"τ = {tau:.2f}  (t = {t:.2f})")
    fig.suptitle(
        "Learned denoiser on the simplex plane (V = 3, p = "
        f"{', '.join(f'{p:.1f}' for p in task.probs.tolist())}): colour = D_t(x), "
        "white = learned decision boundary, dashed = exact, arrows = velocity (D − x)/(1 − t)",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, out, "simplex-field")


def _draw_paths(ax, traj: torch.Tensor, ids: torch.Tensor, alpha: float, lw: float, marker: str | None = None):
    from fmlm.data.simplex import to_plane

    p = to_plane(traj)
    for j in range(p.shape[0]):
        ax.plot(p[j, :, 0], p[j, :, 1], "-", color=_COLOURS[int(ids[j])], alpha=alpha, lw=lw, marker=marker, ms=3)


@torch.no_grad()
def plot_trajectories(task, flm, out: Path, n: int = 200, steps: int = 64, seed: int = 0, lim: float = 2.2):
    from fmlm.data.simplex import to_plane

    plt = _plt()
    traj, ids = _trajectories(flm, n, steps, seed)
    fig, ax = plt.subplots(figsize=(6, 6))
    _draw_paths(ax, traj, ids, 0.35, 0.8)
    start = to_plane(traj[:, 0])
    ax.scatter(start[:, 0], start[:, 1], s=6, c="k", alpha=0.5, label="noise x0 (projected)", zorder=3)
    _triangle(ax, lim)
    freq = torch.bincount(ids, minlength=3).div(n).tolist()
    ax.set_title(
        f"FLM sample paths, {steps} Euler steps, {n} samples\n"
        f"end tokens a/b/c: {freq[0]:.2f}/{freq[1]:.2f}/{freq[2]:.2f}  (data "
        f"{'/'.join(f'{p:.2f}' for p in task.probs.tolist())})",
        fontsize=10,
    )
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, out, "simplex-trajectories")


@torch.no_grad()
def plot_flow_vs_map(task, flm, fmlm, out: Path, metrics: dict, n: int = 14, seed: int = 5, lim: float = 1.9):
    from fmlm.data.simplex import to_plane

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    r = metrics["ref_steps"]
    ref, ref_ids = _trajectories(flm, n, r, seed)
    coarse, coarse_ids = _trajectories(flm, n, 2, seed)
    one, one_ids = _trajectories(fmlm, n, 1, seed)
    two, two_ids = _trajectories(fmlm, n, 2, seed)
    for ax in axes:
        _draw_paths(ax, ref, ref_ids, 0.9, 1.0)
        s = to_plane(ref[:, 0])
        ax.scatter(s[:, 0], s[:, 1], s=14, c="k", zorder=4)
    p = to_plane(coarse)
    for j in range(n):
        axes[0].plot(p[j, :, 0], p[j, :, 1], "--", color="0.25", lw=1.2, marker="o", ms=4)
    for traj, style in ((one, "-"), (two, ":")):
        p = to_plane(traj)
        for j in range(n):
            axes[1].annotate(
                "",
                xy=tuple(p[j, -1].tolist()),
                xytext=tuple(p[j, -2].tolist()),
                arrowprops=dict(arrowstyle="->", color="0.15", lw=1.3, linestyle=style),
            )
            if traj.shape[1] > 2:
                axes[1].annotate(
                    "",
                    xy=tuple(p[j, 1].tolist()),
                    xytext=tuple(p[j, 0].tolist()),
                    arrowprops=dict(arrowstyle="->", color="0.15", lw=1.3, linestyle=style),
                )
    for ax in axes:
        _triangle(ax, lim)
    m = metrics
    axes[0].set_title(
        f"Flow: coloured = {r} Euler steps; dashed = 2 Euler steps\n"
        f"2 steps end on the {r}-step token for {m[f'flm2_agree_flm{r}']:.0%} of starts "
        f"(1 step: {m[f'flm1_agree_flm{r}']:.0%}, 4: {m[f'flm4_agree_flm{r}']:.0%})",
        fontsize=10,
    )
    axes[1].set_title(
        "Flow map: solid = 1 jump X(0→1); dotted = 2 jumps\n"
        f"1 jump ends on the {r}-step token for {m[f'fmlm1_agree_flm{r}']:.0%} of starts "
        f"(2 jumps: {m[f'fmlm2_agree_flm{r}']:.0%})",
        fontsize=10,
    )
    fig.suptitle("Same noise, same teacher: integrating the flow vs jumping with the flow map (V = 3)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out, "simplex-flow-vs-map")


def plot_simplex(
    out: Path,
    seed: int = 0,
    flm_steps: int = 1000,
    fmlm_steps: int = 1500,
    probs=(0.6, 0.3, 0.1),
    progress: bool = True,
    n_metrics: int = 2000,
    ref_steps: int = 128,
    res: int = 112,
) -> dict:
    from fmlm.data.simplex import Simplex3

    task = Simplex3(probs)
    flm, fmlm, info = train_toy(task, seed, flm_steps, fmlm_steps, progress)
    metrics = {**info, **toy_metrics(task, flm, fmlm, n=n_metrics, ref_steps=ref_steps)}
    files = plot_field(task, flm, out, res=res) + plot_trajectories(task, flm, out)
    files += plot_flow_vs_map(task, flm, fmlm, out, metrics)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "simplex-metrics.json", metrics)
    return {"files": files + [str(out / "simplex-metrics.json")], "metrics": metrics}


def run(
    what: str,
    out: Path,
    vocab_sizes: list[int],
    seed: int = 0,
    flm_steps: int = 1000,
    fmlm_steps: int = 1500,
    progress: bool = True,
) -> dict:
    result: dict = {"files": []}
    if what in ("schedule", "all"):
        result["files"] += plot_schedule(vocab_sizes, out)
    if what in ("simplex", "all"):
        r = plot_simplex(out, seed, flm_steps, fmlm_steps, progress=progress)
        result["files"] += r["files"]
        result["simplex"] = r["metrics"]
    return result
