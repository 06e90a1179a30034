"""The tables and plot of ``fmlm bench speed``."""

from __future__ import annotations

from pathlib import Path

from fmlm.io import write_atomic

#: The samplers ``fmlm bench speed`` measures, in the order of its tables.
METHODS = ("fmlm", "fmlm-ref", "flm", "mdlm", "duo", "ar")


LABELS = {
    "fmlm": "FMLM 1 step (lean)",
    "fmlm-ref": "FMLM 1 step (reference)",
    "flm": "FLM",
    "mdlm": "MDLM",
    "duo": "Duo",
    "ar": "AR (KV cache)",
}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"device {s['device']}, {s['dtype'].replace('torch.', '')}, threads {s['threads']}, "
        f"best of {s['repeats']} interleaved rounds (each ≥ {s['min_seconds']} s), N = {s['steps']} "
        f"steps for FLM/MDLM/Duo, load average {s['load_start']:.2f} at start, {s['load_end']:.2f} at end"
    ]
    for r in result["shapes"]:
        sh = r["shape"]
        p = r["peaks"]
        lines += [
            "",
            f"### {sh['size']}, V = {sh['vocab']:,}, L = {sh['seq_len']:,}",
            "",
            f"matmul peak ({p[0]['gemm']}² GEMM, {p[0]['dtype']}): "
            f"{', '.join('%.1f' % (q['flop_per_s'] / 1e9) for q in p)} GFLOP/s (before, after; the higher is "
            f"the reference)",
            "",
            "| sampler | batch | passes | ms / sample | samples/s | network GFLOP / call | GFLOP/s | "
            "utilisation | load |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {LABELS[row['method']]} | {row['batch']} | {row['passes']} | "
                f"{row['seconds_per_sample'] * 1e3:,.2f} | {row['samples_per_s']:,.3g} | "
                f"{row['network_flops'] / 1e9:,.3f} | {row['network_flop_per_s'] / 1e9:,.1f} | "
                f"{row['utilisation']:.0%} | {row['load_at_best']:.2f} |"
            )
        sm = r["summary"]
        best = ", ".join(f"{LABELS[m]} {b['utilisation']:.0%} (batch {b['batch']})" for m, b in sm["best"].items())
        lines += ["", f"Best utilisation: {best}."]
        if sm["lean_speedup"]:
            lines.append(
                "One step, reference / lean time per sample: "
                + ", ".join(f"{v:.2f}× (batch {b})" for b, v in sm["lean_speedup"].items())
                + "."
            )
        if sm["fmlm_vs_ar"]:
            lines.append(
                "AR / FMLM one-step time per sample: "
                + ", ".join(f"{v:.1f}× (batch {b})" for b, v in sm["fmlm_vs_ar"].items())
                + "."
            )
        for row in r["rows"]:
            pr = row.get("profile")
            if pr:
                sh_ = pr["shares"]
                top = ", ".join(f"{o['op'].replace('aten::', '')} {o['share']:.0%}" for o in pr["other_top"][:4])
                lines.append(
                    f"Where the time goes ({LABELS[row['method']]}, batch {row['batch']}; operator self "
                    f"time): matmuls {sh_['matmul']:.0%}, attention kernels {sh_['attention']:.0%}, "
                    f"the rest {sh_['other']:.0%} ({top})."
                )
        goals = []
        if "fmlm_goal_met" in sm:
            goals.append(f"FMLM one step ≥ 50%: {'met' if sm['fmlm_goal_met'] else 'NOT met'}")
        if "ar_goal_met" in sm:
            goals.append(f"AR ≥ 30%: {'met' if sm['ar_goal_met'] else 'NOT met'}")
        if goals:
            lines.append("Goals: " + "; ".join(goals) + ".")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Utilisation against batch size, one panel per shape, one line per sampler (needs matplotlib)."""
    from fmlm.bench.report import pyplot

    plt = pyplot()
    if plt is None:
        return
    shapes = result["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False)
    for ax, r in zip(axes[0], shapes):
        sh = r["shape"]
        for m in METHODS:
            pts = sorted((row["batch"], row["utilisation"]) for row in r["rows"] if row["method"] == m)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=LABELS[m])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("% of measured matmul FLOP/s")
        ax.set_title(f"{sh['size']}, V={sh['vocab']}, L={sh['seq_len']}", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
