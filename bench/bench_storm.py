"""A request storm against Serve on 127.0.0.1: what clients get when the service is overloaded.

    python bench/bench_storm.py --bundle DIR [--requests 64] [--images 8] [--out storm.json]

Deploys ``serving/config.yaml`` for the bundle (as ``unclip serve`` does) on a local Ray with
2 CPUs, then sends ``--requests`` concurrent ``/v1/generate`` requests of ``--images``
images each, while a poller asks ``/v1/health`` (liveness) every 0.5 s. Prints, per status
code, how many answers and how long they took, whether every error was JSON with a
``Retry-After`` on 503s, how long liveness took, and then: readiness, one request after
the storm, and a 64 MiB chunked upload (the memory of the ingress and proxy processes
before and after it). Bounded: every request has a client timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.local_serve import local_serve  # noqa: E402


def post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        r = requests.post(url + "/v1/generate", json=body, timeout=timeout)
    except requests.RequestException as e:
        return {"status": type(e).__name__, "s": time.monotonic() - t0}
    return {
        "status": r.status_code,
        "s": time.monotonic() - t0,
        "json": r.headers.get("content-type") == "application/json",
        "retry_after": r.headers.get("retry-after"),
        "detail": None if r.status_code == 200 else r.text[:160],
    }


def poll_liveness(url: str, stop: threading.Event, out: list[tuple[int, float]]) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            status = requests.get(url + "/v1/health", timeout=10).status_code
        except requests.RequestException:
            status = -1
        out.append((status, time.monotonic() - t0))
        stop.wait(0.5)


def rss_mb(names: tuple[str, ...]) -> dict[str, float]:
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        for n in names:
            if n in cmd and p.info["memory_info"] is not None:
                found[n] = p.info["memory_info"].rss / 2**20
    return found


def chunked_upload(port: int, total: int) -> tuple[int, int]:
    """POST ``total`` bytes chunked; stop once answered. (status, bytes sent)."""
    chunk = b"A" * 65536
    sent = 0
    head = (
        "POST /v1/variations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode())
        try:
            while sent < total and not select.select([s], [], [], 0)[0]:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:
            pass
        data = s.recv(4096)
    return (int(data.split(b" ", 2)[1]) if data else -1), sent


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[Any, list[float]] = defaultdict(list)
    for r in results:
        by[r["status"]].append(r["s"])
    return {
        str(k): {
            "n": len(v),
            "min_s": round(min(v), 2),
            "median_s": round(statistics.median(v), 2),
            "max_s": round(max(v), 2),
        }
        for k, v in sorted(by.items(), key=lambda kv: str(kv[0]))
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--client-timeout", type=float, default=180.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    out: dict[str, Any] = {"requests": args.requests, "images": args.images}
    with local_serve(args.bundle) as (url, port):
        out["load_before"] = os.getloadavg()[0]
        stop = threading.Event()
        live: list[tuple[int, float]] = []
        poller = threading.Thread(target=poll_liveness, args=(url, stop, live), daemon=True)
        poller.start()
        bodies = [
            {"prompt": f"a red circle {i}", "num_images": args.images, "seed": i}
            for i in range(args.requests)
        ]
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.requests) as pool:
            results = list(pool.map(lambda b: post(url, b, args.client_timeout), bodies))
        out["storm_s"] = round(time.monotonic() - t0, 1)
        stop.set()
        poller.join()
        out["status"] = summarize(results)
        errors = [r for r in results if r["status"] != 200]
        out["errors_all_json"] = all(r.get("json") for r in errors)
        out["503_with_retry_after"] = all(
            r.get("retry_after") for r in errors if r["status"] in (503, 429)
        )
        out["error_examples"] = sorted({str(r.get("detail")) for r in errors})[:3]
        out["liveness"] = {
            "n": len(live),
            "statuses": sorted({s for s, _ in live}),
            "max_s": round(max(t for _, t in live), 3) if live else None,
        }
        ready = requests.get(url + "/v1/ready", timeout=30)
        out["ready_after"] = ready.status_code
        out["one_request_after"] = post(url, bodies[0] | {"num_images": 1}, 120)["status"]
        names = ("ServeReplica:unclip:Ingress", "ProxyActor")
        before = rss_mb(names)
        status, sent = chunked_upload(port, 64 << 20)
        out["chunked_64MiB"] = {"status": status, "bytes_sent": sent}
        time.sleep(1)
        after = rss_mb(names)
        out["rss_mb"] = {n: [round(before.get(n, 0)), round(after.get(n, 0))] for n in names}
        out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
