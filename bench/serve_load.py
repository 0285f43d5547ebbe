"""`wardrobe serve` under load, against the offline ONNX throughput of the same run (issue #38).

    python -m bench.serve_load [--seconds 20] [--soak 120]   (part of `make bench`; needs dvc repro
                                                             and wrk: apt-get install wrk)

A bounded client on 127.0.0.1 (it stops by itself): wrk, the C load generator, one thread with 1,
8 and 32 keep-alive connections, each POSTing one of 200 test pictures per request (PNG, raw body)
for `--seconds`: requests/s, p50/p99 latency, errors (failed connections, reads, timeouts and any
status but 200). For batching on and off, a server in its own process serving the committed ONNX
model. Then a soak at 32 connections with batching for `--soak` seconds: the server's RSS each
second, the first minute's peak against the last minute's, and its peak RSS (VmHWM).

The client shares the machine's cores with the server, so it should cost little: the CPU seconds
it and the server used are printed beside each row. (A Python client of 32 threads cost the server
a fifth of its rate on 2 cores: docs/benchmarks.md.)

The baseline: ONNX Runtime classifying 2,000 test pictures offline in this process, 1 and 64 at a
time (64 is the server's largest batch), in images/s. The model costs the same per picture in
batches of 4 or 64, so batching can only save what each call of it costs around the model: the
offline rate over the unbatched server's is as much as batching can gain, printed as its ceiling.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.serve import throughput
from wardrobe.common import load_split
from wardrobe.model.file import load_onnx_classifier
from wardrobe.outputs import ONNX_PATH, PREPARED_DIR

PICTURES = 200
LEVELS = (1, 8, 32)
BATCH = 64

# wrk's script: each connection POSTs the pictures in turn; done() prints one line of JSON.
WRK_SCRIPT = """
local bodies, index = {}, 0
function init(args)
  for i = 0, tonumber(args[2]) - 1 do
    local file = assert(io.open(string.format("%s/%03d.png", args[1], i), "rb"))
    bodies[#bodies + 1] = file:read("*a")
    file:close()
  end
  index = math.random(#bodies)
end
function request()
  index = index % #bodies + 1
  return wrk.format("POST", "/predict?top_k=1", {["Content-Type"] = "image/png"}, bodies[index])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "errors": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a running process has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(port: int, server_pid: int, connections: int, seconds: float, script: Path) -> dict[str, float]:
    """wrk with `connections` keep-alive connections for `seconds`, and the CPU both sides used."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--timeout", "30s", "-s", str(script)]
    command += [f"http://127.0.0.1:{port}", "--", str(script.parent), str(PICTURES)]
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = cpu_seconds(server_pid)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"bench.serve_load: wrk failed: {done.stderr.strip() or done.stdout.strip()}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    elapsed = row["duration_us"] / 1e6
    client = (client_after.ru_utime + client_after.ru_stime) - (client_before.ru_utime + client_before.ru_stime)
    return {
        "requests_s": row["requests"] / elapsed,
        "p50_ms": row["p50_us"] / 1000,
        "p99_ms": row["p99_us"] / 1000,
        "errors": float(row["errors"]),
        "server_cores": (cpu_seconds(server_pid) - server_before) / elapsed,
        "client_cores": client / elapsed,
    }


def soak(port: int, pid: int, seconds: float, script: Path) -> tuple[list[float], dict[str, float]]:
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append(rss_mb(pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    result = load(port, pid, 32, seconds, script)
    done.set()
    sampler.join()
    return samples, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="per concurrency level (default 20)")
    parser.add_argument("--soak", type=float, default=120, help="the soak at 32 connections (default 120)")
    args = parser.parse_args()
    if not ONNX_PATH.is_file():
        raise SystemExit(f"bench.serve_load: {ONNX_PATH} not found; run dvc repro first")
    if shutil.which("wrk") is None:
        raise SystemExit("bench.serve_load: needs wrk, the C load generator: apt-get install wrk")
    x_test, _ = load_split(PREPARED_DIR, "test")
    sample = np.asarray(x_test[:2000])
    classifier = load_onnx_classifier(ONNX_PATH)
    offline = {batch: throughput(lambda x, batch=batch: classifier.classify(x, batch), sample) for batch in (1, BATCH)}

    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        script = Path(scratch) / "post.lua"
        script.write_text(WRK_SCRIPT)
        for index, image in enumerate(np.round(sample[:PICTURES] * 255).astype(np.uint8)):
            Image.fromarray(image).save(Path(scratch) / f"{index:03d}.png")
        for batching in (True, False):
            port = free_port()
            server = start_server(port, batching)
            try:
                for connections in LEVELS:
                    rows[(batching, connections)] = load(port, server.pid, connections, args.seconds, script)
                if batching:
                    samples, soaked = soak(port, server.pid, args.soak, script)
                    peak = rss_mb(server.pid, "VmHWM")
            finally:
                server.terminate()
                server.wait(timeout=30)

    baseline = offline[BATCH]
    print(
        f"Offline ONNX Runtime in this process: {baseline:.0f} images/s {BATCH} pictures a call "
        f"(the baseline), {offline[1]:.0f} images/s 1 a call\n"
    )
    print("| batching | connections | requests/s | × offline | p50 ms | p99 ms | errors | server cores | wrk cores |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (batching, connections), row in rows.items():
        mode, rate = "on" if batching else "off", row["requests_s"]
        print(
            f"| {mode} | {connections} | {rate:.0f} | {rate / baseline:.2f}× | {row['p50_ms']:.1f} "
            f"| {row['p99_ms']:.1f} | {row['errors']:.0f} | {row['server_cores']:.2f} | {row['client_cores']:.2f} |"
        )
    unbatched = rows[(False, 32)]["requests_s"]
    gain = rows[(True, 32)]["requests_s"] / unbatched
    ceiling = max(offline.values()) / unbatched
    print(
        f"\nBatching at 32 connections: {gain:.2f}× the requests/s without it; its ceiling here, the "
        f"offline rate over the unbatched server's: {ceiling:.2f}×."
    )
    minute = min(60, len(samples) // 2)
    first, last = max(samples[:minute]), max(samples[-minute:])
    print(
        f"Soak, 32 connections with batching, {args.soak:.0f} s: {soaked['requests_s']:.0f} requests/s, "
        f"{soaked['errors']:.0f} errors, p99 {soaked['p99_ms']:.1f} ms; server RSS first minute {first:.0f} MB, "
        f"last minute {last:.0f} MB ({last / first:.3f}×), peak {peak:.0f} MB"
    )


if __name__ == "__main__":
    main()
