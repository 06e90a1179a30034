"""Counting a sampler's floating-point work: measured (matmul FLOPs of the network calls, by the profiler) and
analytic (per backbone)."""

from __future__ import annotations

from fmlm.errors import ConfigError


def count_network_flops(call, net) -> dict:
    """FLOPs of one ``call()``: inside the backbone ``net`` (by module) and in total."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        call()
    counts = fc.get_flop_counts()
    key = type(net).__name__
    return {"network_flops": int(sum(counts.get(key, {}).values())), "total_flops": int(fc.get_total_flops())}


def dit_flops(net, B: int, L: int, embedded_input: bool) -> int:
    """Matmul + attention FLOPs of one DiT forward over (B, L) in closed form (what the counter counts)."""
    d, V, C = net.embed.shape[1], net.vocab_size, net.time1.mlp[0].out_features
    hidden = net.blocks[0].mlp[0].out_features
    per_token = len(net.blocks) * (2 * d * 3 * d + 2 * d * d + 4 * d * hidden + 4 * L * d) + 2 * d * V
    per_token += 0 if embedded_input else 2 * V * d  # the V-space input product x @ E
    times = 2 if net.two_time else 1
    per_sample = times * 2 * (net.time1.freq_dim * C + C * C) + len(net.blocks) * 12 * C * d + 4 * C * d
    return B * (L * per_token + per_sample)


def ar_flops(net, B: int, L: int) -> int:
    """FLOPs of KV-cache decoding of L positions in closed form: the P-th pass attends to P keys."""
    d, V = net.embed.weight.shape[1], net.vocab_size
    hidden = net.blocks[0].mlp[0].out_features
    per_pass = len(net.blocks) * (2 * d * 3 * d + 2 * d * d + 4 * d * hidden) + 2 * d * V
    attention = len(net.blocks) * 4 * d * (L * (L + 1) // 2)
    return B * (L * per_pass + attention)


def analytic_flops(name: str, net, B: int, L: int, steps: int) -> dict:
    if name == "ar":
        f = ar_flops(net, B, L)
    elif name in ("fmlm", "fmlm-ref", "flm", "duo"):
        # fmlm: embedded input; fmlm-ref and FLM: V-space input; Duo reads token ids (a lookup).
        f = dit_flops(net, B, L, embedded_input=name in ("fmlm", "duo")) * (1 if name.startswith("fmlm") else steps)
    else:
        raise ConfigError(f"--count analytic has no closed form for {name} (its passes depend on the draws)")
    return {"network_flops": f, "total_flops": None, "count": "analytic"}


_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv", "aten::dot"}


def profile_breakdown(call, device) -> dict:
    """Shares of the operator time of one ``call()``: matmuls, attention kernels, everything else.

    Self time per operator from ``torch.profiler`` (device time on CUDA, CPU time otherwise);
    ``other_top`` names the largest of the rest (elementwise work, copies, normalisation).
    """
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        call()
        _sync(device)
    times: dict[str, float] = {}
    for e in prof.key_averages():
        t = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if t > 0:
            times[e.key] = times.get(e.key, 0.0) + t
    total = sum(times.values()) or 1.0
    cat = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for k, t in times.items():
        cat["matmul" if k in _MATMUL_OPS else "attention" if "scaled_dot_product" in k else "other"] += t
    rest = sorted(
        ((k, t) for k, t in times.items() if k not in _MATMUL_OPS and "scaled_dot_product" not in k),
        key=lambda kt: -kt[1],
    )[:6]
    return {
        "shares": {k: v / total for k, v in cat.items()},
        "operator_seconds": total / 1e6,
        "other_top": [{"op": k, "share": t / total} for k, t in rest],
    }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
