"""The scaling study's results: the claims checked at each point, the study aggregated over points, its table and
plots."""

from __future__ import annotations

from pathlib import Path

from fmlm.bench.report import ENTROPY_TOLERANCE, _collapsed, _fmt, headline, pyplot, read_result
from fmlm.bench.rescore import _slug

#: Methods trained by distillation (their budget is the distillation's, on top of stage 1).
DISTILLED = ("semigroup", "lagrangian", "eulerian", "dcd", "sdtt")


def claims(result: dict, tolerance: float = ENTROPY_TOLERANCE) -> dict:
    """The seed's three claims, judged on one bench result by bits per byte.

    1. FMLM at one step below MDLM and Duo at every setting of 1–8 steps, with its
       entropy within ``tolerance`` of the data's (collapsed competitor settings do not count);
       ``one_step_distilled``: the same against Duo+DCD and MDLM+SDTT, the distilled baselines.
    2. FLM at 1,024 steps at or below MDLM and Duo at 1,024 steps, with the same entropy rule
       (a collapsed FLM does not hold it; collapsed rivals do not count). A sweep that stops short of
       1,024 is judged at the largest step count the FLM and a rival share (``steps`` says which).
    3. The one-step flow map's time against the cheapest setting of every other model that
       is at least as good (the bench's headline).
    """
    rows, data_h = result["rows"], result.get("data_entropy")

    def at(label, steps):
        return next(
            (r for r in rows if r["label"] == label and r["steps"] == steps and r.get("gen_bpb") is not None), None
        )

    out: dict = {}
    f1 = at("FMLM", 1)
    # (1) against the undistilled teachers, and (1') against the distilled discrete baselines.
    for key, labels in (("one_step", ("MDLM", "Duo")), ("one_step_distilled", ("Duo+DCD", "MDLM+SDTT"))):
        rivals = [
            r
            for r in rows
            if r["label"] in labels
            and r["steps"] <= 8
            and r.get("gen_bpb") is not None
            and not _collapsed(r, data_h, tolerance)
        ]
        if f1 is not None and rivals:
            best = min(rivals, key=lambda r: r["gen_bpb"])
            ok = not _collapsed(f1, data_h, tolerance)
            out[key] = {
                "holds": ok and f1["gen_bpb"] < best["gen_bpb"],
                "fmlm_bpb": f1["gen_bpb"],
                "entropy_ok": ok,
                "best_rival": f"{best['label']} {best['steps']}",
                "best_rival_bpb": best["gen_bpb"],
                "margin": best["gen_bpb"] - f1["gen_bpb"],
            }
    # (2) at 1,024 steps, or at the largest step count the FLM and a rival both sampled when the sweep stops short
    scored = {(r["label"], r["steps"]) for r in rows if r.get("gen_bpb") is not None}
    many = max((s for lab, s in scored if lab == "FLM" and {("MDLM", s), ("Duo", s)} & scored), default=None)
    flm = at("FLM", many)
    others = [r for r in (at("MDLM", many), at("Duo", many)) if r is not None and not _collapsed(r, data_h, tolerance)]
    if flm is not None and others:
        best = min(others, key=lambda r: r["gen_bpb"])
        ok = not _collapsed(flm, data_h, tolerance)
        out["many_step"] = {
            "holds": ok and flm["gen_bpb"] <= best["gen_bpb"],
            "flm_bpb": flm["gen_bpb"],
            "entropy_ok": ok,
            "best_rival": best["label"],
            "best_rival_bpb": best["gen_bpb"],
            "gap": flm["gen_bpb"] - best["gen_bpb"],
            "steps": many,
        }
    h = headline(result, entropy_tolerance=tolerance)
    if h is not None and h["metric"] == "gen_bpb":
        out["speed"] = {
            label: (
                None if o["match"] is None else {"steps": o["match"]["steps"], "time_ratio": o["match"]["time_ratio"]}
            )
            for label, o in h["others"].items()
        }
    return out


def aggregate(folders: list[tuple[str, int, Path]]) -> dict:
    """Every point's rows, references and claims, by scorer."""
    points = []
    for size, budget, folder in folders:
        r = read_result(folder)
        # Stage-1 training tokens (the distilled models' own tokens are distillation steps on top).
        tokens = max((v.get("tokens") or 0) for v in r["variants"].values() if v.get("method") not in DISTILLED)
        points.append(
            {
                "size": size,
                "budget": budget,
                "tokens": tokens,
                "folder": folder.name,
                "scorer": (r.get("scorer") or {}).get("name"),
                "data_bpb": r.get("data_bpb"),
                "shuffled_bpb": r.get("shuffled_bpb"),
                "data_entropy": r.get("data_entropy"),
                "data_word_valid": r.get("data_word_valid"),
                "shuffled_word_valid": r.get("shuffled_word_valid"),
                "parameters": {k: v.get("parameters") for k, v in r["variants"].items()},
                "val": {k: {m: x for m, x in v.items() if m.startswith("val_")} for k, v in r["variants"].items()},
                "rows": [
                    {
                        k: row.get(k)
                        for k in (
                            "label",
                            "steps",
                            "nfe",
                            "gen_bpb",
                            "gen_ppl",
                            "word_valid",
                            "entropy",
                            "seconds_per_sample",
                        )
                    }
                    | {"collapsed": _collapsed(row, r.get("data_entropy"))}
                    for row in r["rows"]
                ],
                "claims": claims(r),
            }
        )
    return {"points": points}


def _verdict(c: dict | None, field: str) -> str:
    if c is None:
        return "–"
    collapsed = "" if c.get("entropy_ok", True) else "entropy off; "
    at = f" at {c['steps']:,} steps" if c.get("steps", 1024) != 1024 else ""
    return ("holds" if c["holds"] else "fails") + f" ({collapsed}{c[field]:+.3f}{at})"


def markdown(study: dict, command: str | None = None) -> str:
    lines = ["## fmlm bench scaling", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        "Bits per byte under each scorer (lower is better; collapsed settings, entropy off the data's by "
        f"more than {ENTROPY_TOLERANCE:.0%}, marked *). Reference rows: held-out text and the same text with "
        "its characters shuffled.",
        "",
    ]
    for scorer in dict.fromkeys(p["scorer"] for p in study["points"]):
        pts = [p for p in study["points"] if p["scorer"] == scorer]
        cols = [f"{p['size']} {p['budget']}" for p in pts]
        lines += [f"### {scorer}", "", "| model | steps | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        lines.append("| held-out text | – | " + " | ".join(_fmt(p["data_bpb"], ".3f") for p in pts) + " |")
        lines.append("| shuffled characters | – | " + " | ".join(_fmt(p["shuffled_bpb"], ".3f") for p in pts) + " |")
        keys = list(dict.fromkeys((r["label"], r["steps"]) for p in pts for r in p["rows"]))
        for label, steps in keys:
            cells = []
            for p in pts:
                r = next((x for x in p["rows"] if x["label"] == label and x["steps"] == steps), None)
                cells.append("–" if r is None else _fmt(r["gen_bpb"], ".3f") + ("*" if r["collapsed"] else ""))
            lines.append(f"| {label} | {steps} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "| point | training tokens | (1) FMLM 1 step < MDLM, Duo at 1–8 "
            "| (1') FMLM 1 step < Duo+DCD, MDLM+SDTT at 1–8 | (2) FLM ≤ MDLM, Duo at 1,024 steps (or as noted) "
            "| (3) × FMLM time of the cheapest setting at least as good |",
            "|---|---|---|---|---|---|",
        ]
        for p in pts:
            c = p["claims"]
            speed = c.get("speed") or {}
            sp = (
                ", ".join(
                    f"{k} " + ("none" if v is None else f"{v['time_ratio']:.3g}× ({v['steps']})")
                    for k, v in speed.items()
                )
                or "–"
            )
            lines.append(
                f"| {p['size']} {p['budget']} | {p['tokens']:,} | {_verdict(c.get('one_step'), 'margin')} "
                f"| {_verdict(c.get('one_step_distilled'), 'margin')} | {_verdict(c.get('many_step'), 'gap')} | {sp} |"
            )
        lines += [
            "",
            "(1): margin = best rival's bits/byte − FMLM's (positive: FMLM better). (2): gap = FLM's − "
            "the best rival's (negative: FLM better). \"entropy off\": the flow map's (1) or the FLM's (2) samples are "
            f"off the data's unigram entropy by more than {ENTROPY_TOLERANCE:.0%}, which fails the claim whatever "
            "the score; collapsed rival settings do not count.",
            "",
        ]
    return "\n".join(lines) + "\n"


def plot(study: dict, out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    files = []
    for scorer in dict.fromkeys(p["scorer"] for p in study["points"]):
        pts = [p for p in study["points"] if p["scorer"] == scorer]
        # each size's points by training tokens: the first size circles and solid lines, the rest squares
        by_size = {
            sz: sorted((p for p in pts if p["size"] == sz), key=lambda p: p["tokens"])
            for sz in dict.fromkeys(p["size"] for p in pts)
        }
        size, line_pts = next(iter(by_size.items()))
        labels = list(dict.fromkeys(r["label"] for p in line_pts for r in p["rows"]))
        colors = {lab: f"C{i}" for i, lab in enumerate(labels)}
        all_steps = sorted({r["steps"] for p in pts for r in p["rows"] if r["label"] != "AR"})
        shade = {st: plt.cm.viridis(i / max(1, len(all_steps) - 1)) for i, st in enumerate(all_steps)}
        # One panel per method, one line per step count; collapsed settings hollow; the two reference
        # rows in every panel. The y range is the references' (collapsed outliers may fall below it).
        fig, axes = plt.subplots(1, len(labels), figsize=(2.6 * len(labels) + 0.6, 3.6), sharey=True, squeeze=False)
        refs = [p[k] for p in line_pts for k in ("data_bpb", "shuffled_bpb") if p[k] is not None]
        vals = [r["gen_bpb"] for p in pts for r in p["rows"] if r["gen_bpb"] is not None and not r["collapsed"]]
        lo, hi = min(refs + vals, default=0.0), max(refs + vals, default=1.0)
        for ax, label in zip(axes[0], labels):
            labelled: set[int] = set()  # each step count once in the legend
            for sz, sz_pts in by_size.items():
                first = sz == size
                for steps in sorted({r["steps"] for p in sz_pts for r in p["rows"] if r["label"] == label}):
                    pts_rows = [
                        (p["tokens"], r)
                        for p in sz_pts
                        for r in p["rows"]
                        if r["label"] == label and r["steps"] == steps and r["gen_bpb"] is not None
                    ]
                    if not pts_rows:
                        continue
                    color = colors[label] if label == "AR" else shade.get(steps, "k")
                    ax.plot(
                        [x for x, _ in pts_rows],
                        [r["gen_bpb"] for _, r in pts_rows],
                        color=color,
                        alpha=0.8,
                        linestyle="-" if first else "-.",
                        label=None
                        if steps in labelled
                        else f"{steps} {'passes' if label == 'AR' else 'step' if steps == 1 else 'steps'}",
                    )
                    labelled.add(steps)
                    for x, r in pts_rows:
                        ax.plot(
                            [x],
                            [r["gen_bpb"]],
                            marker="o" if first else "s",
                            color=color,
                            markerfacecolor="none" if r["collapsed"] else color,
                        )
            for key, style in (("data_bpb", "--"), ("shuffled_bpb", ":")):
                xy = [(p["tokens"], p[key]) for p in line_pts if p[key] is not None]
                if xy:
                    ax.plot(*zip(*xy), color="gray", linestyle=style, marker="_", markersize=16)
            ax.set_xscale("log")
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("training tokens", fontsize=8)
            ax.set_ylim(lo - 0.25, hi + 0.25)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel(f"bits per byte under {scorer}")
        sizes_note = f"; circles: {size}, squares: " + ", ".join(list(by_size)[1:]) if len(by_size) > 1 else ""
        fig.suptitle(
            "dashed: held-out text, dotted: shuffled characters; hollow: collapsed (entropy off by > 10%)" + sizes_note,
            fontsize=8,
        )
        fig.tight_layout()
        name = out / f"bpb_vs_tokens-{_slug(scorer)}.png"
        fig.savefig(name, dpi=110)
        plt.close(fig)
        files.append(name)

        top = max(line_pts, key=lambda p: p["tokens"])
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label in labels:
            xy = sorted(
                (r["seconds_per_sample"], r["gen_bpb"])
                for r in top["rows"]
                if r["label"] == label and r["gen_bpb"] is not None
            )
            if xy:
                ax.plot(*zip(*xy), marker="o", color=colors[label], label=label)
        for key, style in (("data_bpb", "--"), ("shuffled_bpb", ":")):
            if top[key] is not None:
                ax.axhline(
                    top[key],
                    color="gray",
                    linestyle=style,
                    label="held-out text" if key == "data_bpb" else "shuffled characters",
                )
        ax.set_xscale("log")
        ax.set_xlabel("seconds per sample")
        ax.set_ylabel(f"bits per byte under {scorer}")
        ax.set_title(f"{top['size']}, {top['budget']} steps")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = out / f"bpb_vs_time-{_slug(scorer)}.png"
        fig.savefig(name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files
