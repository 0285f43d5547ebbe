"""`wardrobe serve` under load, against the offline ONNX throughput of the same run (issue #38).

    python -m bench.serve_load [--seconds 20] [--soak 120]   (part of `make bench`; needs dvc repro)

A bounded client on 127.0.0.1 (it stops by itself): for batching on and off, a server in its own
process serving the committed ONNX model, then 1, 8 and 32 client threads, each sending one test
picture per request (PNG, raw body, keep-alive) for `--seconds`: requests/s, p50/p99 latency,
errors. Then a soak at 32 clients with batching for `--soak` seconds: the server's RSS each second,
the first minute's peak against the last minute's, and its peak RSS (VmHWM). The baseline: ONNX
Runtime classifying the same pictures offline in this process, 64 at a time (the server's largest
batch), in images/s. The client shares the machine's cores with the server: on 2 cores its own
work is part of what the numbers measure.
"""

from __future__ import annotations

import argparse
import http.client
import io
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from wardrobe.common import load_split
from wardrobe.model.file import load_onnx_classifier
from wardrobe.outputs import ONNX_PATH, PREPARED_DIR

PICTURES = 200
LEVELS = (1, 8, 32)
BATCH = 64


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(port: int, batching: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "wardrobe", "serve", "--port", str(port), "--max-queue", "256"]
    server = subprocess.Popen([*command, *([] if batching else ["--no-batching"])], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/ready")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("bench.serve_load: the server did not get ready in 60 s")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(port: int, clients: int, seconds: float, pictures: list[bytes]) -> dict[str, float]:
    """`clients` threads, each a keep-alive connection sending pictures until the time is up."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop_at = time.perf_counter() + seconds

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        k = index
        while time.perf_counter() < stop_at:
            body = pictures[k % len(pictures)]
            k += clients
            start = time.perf_counter()
            try:
                connection.request("POST", "/predict?top_k=1", body, {"Content-Type": "image/png"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                ok = False
            latencies[index].append(time.perf_counter() - start)
            errors[index] += not ok
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    every = np.concatenate([np.array(values) for values in latencies])
    return {
        "requests_s": len(every) / elapsed,
        "p50_ms": float(np.percentile(every, 50) * 1000),
        "p99_ms": float(np.percentile(every, 99) * 1000),
        "errors": float(sum(errors)),
    }


def soak(port: int, pid: int, seconds: float, pictures: list[bytes]) -> tuple[list[float], dict[str, float]]:
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append(rss_mb(pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    result = load(port, 32, seconds, pictures)
    done.set()
    sampler.join()
    return samples, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="per concurrency level (default 20)")
    parser.add_argument("--soak", type=float, default=120, help="the soak at 32 clients (default 120)")
    args = parser.parse_args()
    if not ONNX_PATH.is_file():
        raise SystemExit(f"bench.serve_load: {ONNX_PATH} not found; run dvc repro first")
    x_test, _ = load_split(PREPARED_DIR, "test")
    images = np.round(np.asarray(x_test[:PICTURES]) * 255).astype(np.uint8)
    pictures = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pictures.append(buffer.getvalue())

    classifier = load_onnx_classifier(ONNX_PATH)
    sample = np.asarray(x_test[:2000])
    classifier.classify(sample[:BATCH], BATCH)  # warm-up
    start = time.perf_counter()
    classifier.classify(sample, BATCH)
    offline = len(sample) / (time.perf_counter() - start)
    del classifier

    rows = {}
    for batching in (True, False):
        port = free_port()
        server = start_server(port, batching)
        try:
            for clients in LEVELS:
                rows[(batching, clients)] = load(port, clients, args.seconds, pictures)
            if batching:
                samples, soaked = soak(port, server.pid, args.soak, pictures)
                peak = rss_mb(server.pid, "VmHWM")
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(f"Offline ONNX Runtime, {BATCH} pictures a call, in this process: {offline:.0f} images/s\n")
    print("| batching | clients | requests/s | × offline | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for (batching, clients), row in rows.items():
        mode, rate = "on" if batching else "off", row["requests_s"]
        print(
            f"| {mode} | {clients} | {rate:.0f} | {rate / offline:.2f}× "
            f"| {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']:.0f} |"
        )
    gain = rows[(True, 32)]["requests_s"] / rows[(False, 32)]["requests_s"]
    print(f"\nBatching at 32 clients: {gain:.2f}× the requests/s without it.")
    minute = min(60, len(samples) // 2)
    first, last = max(samples[:minute]), max(samples[-minute:])
    print(
        f"Soak, 32 clients with batching, {args.soak:.0f} s: {soaked['requests_s']:.0f} requests/s, "
        f"{soaked['errors']:.0f} errors, p99 {soaked['p99_ms']:.1f} ms; server RSS first minute {first:.0f} MB, "
        f"last minute {last:.0f} MB ({last / first:.3f}×), peak {peak:.0f} MB"
    )


if __name__ == "__main__":
    main()
