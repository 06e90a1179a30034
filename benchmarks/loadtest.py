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


def start_server(ckpt: str, port: int, threads: int, max_queue: int) -> subprocess.Popen:
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
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 64 or args.max_seconds <= 0:
        p.error("requests must be in 1..100000, concurrency in 1..64, max-seconds > 0")
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    print(markdown([result]), file=sys.stderr)
    return 0 if result["valid_errors"] == 0 and result["server_alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
