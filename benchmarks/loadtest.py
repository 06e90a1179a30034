"""Load test of ``fmlm serve`` on loopback, bounded in request count and in time.

Starts ``fmlm serve`` on 127.0.0.1 (a free port) with one checkpoint, then ``--concurrency`` client
threads send ``--requests`` valid generate requests (one sample, ``--steps`` steps, a different seed
each) with one malformed request mixed in after every ``--bad-every`` valid ones (bad JSON, steps out
of range, too many samples, unknown field, wrong type, oversized body). The run stops early after
``--max-seconds``. It reports requests/s of the valid traffic, p50/p95/max latency, the valid
requests that did not get 200 (errors), and the share of bad requests answered 4xx, as JSON
(``--out``) and a markdown table.

    python benchmarks/loadtest.py --ckpt fmlm=runs/shakespeare-semigroup --steps 1 --requests 200
    python benchmarks/loadtest.py --ckpt flm=runs/shakespeare --steps 32 --requests 60

``--batching`` is another mode: OpenAI completions (``POST /v1/completions``, one completion of a
different seed each, ``--prompt`` as the prompt) with batching on (``--batch-max``) and off
(``--batch-max 1``), each at every ``--levels`` concurrency (default 1, 8 and 32), in one run;
it reports requests/s and p50/p99 latency per cell, the mean sequences per forward pass and each
request's share of its pass's model time (the server's ``seconds`` over the requests in the pass).

    python benchmarks/loadtest.py --batching --ckpt fmlm=runs/shakespeare-semigroup --steps 1 --requests 200
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"  # loopback only

BAD_BODIES = [
    b"{not json",
    b'{"steps": 0}',
    b'{"steps": 100000}',
    b'{"num_samples": 100000}',
    b'{"stepz": 4}',
    b'{"seed": "seven"}',
    b"[1, 2, 3]",
    json.dumps({"prefix": "x" * 100_000}).encode(),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def request(port: int, path: str, body: bytes | None = None, timeout: float = 120.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def start_server(ckpt: str, port: int, threads: int, max_queue: int, extra: tuple = ()) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "fmlm.cli",
        "serve",
        "--ckpt",
        ckpt,
        "--host",
        HOST,
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--max-queue",
        str(max_queue),
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if request(port, "/health", timeout=2)[0] == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server did not start within 120 s")


def run(args) -> dict:
    port = free_port()
    proc = start_server(args.ckpt, port, args.threads, args.max_queue)
    try:
        health = json.loads(request(port, "/health")[1])
        model = next(iter(health["models"]))
        for i in range(args.warmup):
            request(port, "/v1/generate", json.dumps({"steps": args.steps, "seed": 10**6 + i}).encode())
        plan: list[tuple[str, bytes]] = []
        for i in range(args.requests):
            plan.append(("valid", json.dumps({"steps": args.steps, "seed": i, "num_samples": 1}).encode()))
            if args.bad_every and (i + 1) % args.bad_every == 0:
                plan.append(("bad", BAD_BODIES[(i // args.bad_every) % len(BAD_BODIES)]))
        lock = threading.Lock()
        nxt = [0]
        valid_lat: list[float] = []
        valid_status: dict[int, int] = {}
        bad_status: dict[int, int] = {}
        stop_at = time.monotonic() + args.max_seconds

        def client():
            while True:
                with lock:
                    if nxt[0] >= len(plan) or time.monotonic() > stop_at:
                        return
                    kind, body = plan[nxt[0]]
                    nxt[0] += 1
                t0 = time.perf_counter()
                try:
                    status = request(port, "/v1/generate", body)[0]
                except OSError:
                    status = -1  # connection error
                dt = time.perf_counter() - t0
                with lock:
                    if kind == "valid":
                        valid_status[status] = valid_status.get(status, 0) + 1
                        if status == 200:
                            valid_lat.append(dt)
                    else:
                        bad_status[status] = bad_status.get(status, 0) + 1

        t0 = time.perf_counter()
        workers = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        alive = request(port, "/health")[0] == 200
    finally:
        proc.terminate()
        proc.wait(10)
    n_valid = sum(valid_status.values())
    n_bad = sum(bad_status.values())
    lat = sorted(valid_lat)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) >= 2 else lat * 99
    return {
        "checkpoint": args.ckpt,
        "model": model,
        "method": health["models"][model]["method"],
        "steps": args.steps,
        "seq_len": health["models"][model]["seq_len"],
        "concurrency": args.concurrency,
        "threads": args.threads,
        "wall_seconds": wall,
        "valid_sent": n_valid,
        "valid_ok": valid_status.get(200, 0),
        "valid_errors": n_valid - valid_status.get(200, 0),
        "valid_status": valid_status,
        "requests_per_second": valid_status.get(200, 0) / wall if wall > 0 else 0.0,
        "latency_ms": {"p50": 1e3 * q[49], "p95": 1e3 * q[94], "max": 1e3 * lat[-1]} if lat else None,
        "bad_sent": n_bad,
        "bad_4xx": sum(v for k, v in bad_status.items() if 400 <= k < 500),
        "bad_share_4xx": (sum(v for k, v in bad_status.items() if 400 <= k < 500) / n_bad) if n_bad else None,
        "bad_status": bad_status,
        "server_alive_after": alive,
        "stopped_early": n_valid < args.requests,
    }


def quantile_ms(lat: list[float], q: int) -> float:
    """The q-th percentile (inclusive method) of latencies in seconds, in ms."""
    lat = sorted(lat)
    if len(lat) < 2:
        return 1e3 * lat[0] if lat else float("nan")
    return 1e3 * statistics.quantiles(lat, n=100, method="inclusive")[q - 1]


def completions_cell(port: int, model: str, args, concurrency: int, seed0: int) -> dict:
    """``args.requests`` completions (at most ``args.max_seconds``) from ``concurrency`` client threads."""
    lock, nxt, lat, status, rows, compute = threading.Lock(), [0], [], {}, [], []
    stop_at = time.monotonic() + args.max_seconds

    def client():
        while True:
            with lock:
                if nxt[0] >= args.requests or time.monotonic() > stop_at:
                    return
                i = nxt[0]
                nxt[0] += 1
            body = {"model": model, "prompt": args.prompt, "seed": seed0 + i, "steps": args.steps}
            t0 = time.perf_counter()
            try:
                code, data = request(port, "/v1/completions", json.dumps(body).encode())
            except OSError:
                code, data = -1, b""
            dt = time.perf_counter() - t0
            with lock:
                status[code] = status.get(code, 0) + 1
                if code == 200:
                    lat.append(dt)
                    meta = json.loads(data)["fmlm"]
                    rows.append(meta["batch_rows"])
                    compute.append(meta["seconds"] / meta["batch_requests"])  # this request's share of its pass

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = status.get(200, 0)
    return {
        "concurrency": concurrency,
        "sent": sum(status.values()),
        "ok": ok,
        "status": status,
        "wall_seconds": wall,
        "requests_per_second": ok / wall if wall > 0 else 0.0,
        "latency_ms": {"p50": quantile_ms(lat, 50), "p99": quantile_ms(lat, 99), "max": 1e3 * max(lat, default=0)},
        "mean_batch_rows": statistics.fmean(rows) if rows else None,
        "compute_ms_per_request": 1e3 * statistics.fmean(compute) if compute else None,
    }


def run_batching(args) -> dict:
    """Batching on and off, at every concurrency level, against /v1/completions. Both servers run side
    by side (an idle one costs nothing) and the cells alternate on/off at each level, so a change of
    machine load during the run falls on both alike."""
    settings, servers = (("on", args.batch_max), ("off", 1)), {}
    queue = max(args.max_queue, max(args.levels))
    try:
        for label, batch_max in settings:
            port = free_port()
            servers[label] = (port, start_server(args.ckpt, port, args.threads, queue, ("--batch-max", str(batch_max))))
        health = json.loads(request(servers["on"][0], "/health")[1])
        model = next(iter(health["models"]))
        for port, _ in servers.values():
            for i in range(args.warmup):
                body = {"model": model, "prompt": args.prompt, "seed": 10**6 + i, "steps": args.steps}
                request(port, "/v1/completions", json.dumps(body).encode())
        cells = []
        for k, c in enumerate(args.levels):
            for label, batch_max in settings:
                cell = completions_cell(servers[label][0], model, args, c, seed0=k * args.requests)
                cells.append({"batching": label, "batch_max": batch_max, **cell})
                print(f"batching {label}, concurrency {c}: {cell['requests_per_second']:.2f} req/s", file=sys.stderr)
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(10)
    info = health["models"][model]
    return {
        "checkpoint": args.ckpt,
        "model": model,
        "method": info["method"],
        "steps": args.steps,
        "seq_len": info["seq_len"],
        "prompt": args.prompt,
        "threads": args.threads,
        "cells": cells,
        "errors": sum(c["sent"] - c["ok"] for c in cells),
    }


def batching_markdown(result: dict) -> str:
    lines = [
        "| batching | concurrency | ok / sent | req/s | p50 ms | p99 ms | rows per pass | model ms per request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["cells"]:
        rows = "-" if c["mean_batch_rows"] is None else f"{c['mean_batch_rows']:.1f}"
        ms = "-" if c["compute_ms_per_request"] is None else f"{c['compute_ms_per_request']:.1f}"
        lines.append(
            f"| {c['batching']} (max {c['batch_max']}) | {c['concurrency']} | {c['ok']}/{c['sent']} | "
            f"{c['requests_per_second']:.2f} | {c['latency_ms']['p50']:.1f} | {c['latency_ms']['p99']:.1f} | "
            f"{rows} | {ms} |"
        )
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    head = (
        "| model | steps | concurrency | valid ok / sent | errors | req/s | p50 ms | p95 ms | bad -> 4xx |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lat = r["latency_ms"] or {"p50": float("nan"), "p95": float("nan")}
        share = f"{r['bad_4xx']}/{r['bad_sent']}" if r["bad_sent"] else "-"
        lines.append(
            f"| {r['model']} ({r['method']}) | {r['steps']} | {r['concurrency']} | "
            f"{r['valid_ok']}/{r['valid_sent']} | {r['valid_errors']} | {r['requests_per_second']:.2f} | "
            f"{lat['p50']:.1f} | {lat['p95']:.1f} | {share} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="[NAME=]PATH of the checkpoint to serve")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--requests", type=int, default=100, help="valid requests to send (at most)")
    p.add_argument("--concurrency", type=int, default=4, help="client threads")
    p.add_argument("--bad-every", type=int, default=5, help="one malformed request after every N valid ones")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop sending after this long")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="server worker CPU threads")
    p.add_argument("--max-queue", type=int, default=8, help="server queue bound (>= concurrency: no 503)")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--batching", action="store_true", help="the batching mode: /v1/completions, batching on and off")
    p.add_argument("--levels", default="1,8,32", help="--batching: the concurrency levels (comma list)")
    p.add_argument("--batch-max", type=int, default=32, help="--batching: the server's --batch-max when on")
    p.add_argument("--prompt", default="", help="--batching: the prompt of every completion")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 64 or args.max_seconds <= 0:
        p.error("requests must be in 1..100000, concurrency in 1..64, max-seconds > 0")
    try:
        args.levels = [int(x) for x in args.levels.split(",")]
    except ValueError:
        p.error(f"--levels must be a comma list of integers, got {args.levels!r}")
    if not all(1 <= c <= 64 for c in args.levels) or args.batch_max < 2:
        p.error("--levels must be in 1..64 and --batch-max >= 2")
    result = run_batching(args) if args.batching else run(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    if args.batching:
        print(batching_markdown(result), file=sys.stderr)
        return 0 if result["errors"] == 0 else 1
    print(markdown([result]), file=sys.stderr)
    return 0 if result["valid_errors"] == 0 and result["server_alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
