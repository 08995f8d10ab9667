"""A bounded load test of ``iap-rt serve`` on the embedded model, beside the in-process ceiling.

For batching on (``--max-batch B``) and off (``--max-batch 1``) it starts ``iap-rt serve`` on
free localhost ports and, for each N in ``--clients``, runs N closed-loop client threads that
each send ``--requests-per-client`` one-image requests (a fixed number, distinct seeds): images/s,
p50/p95/p99 latency, the mean UNet batch the server formed (from the gateway's metrics: images /
batches) and failed requests. The in-process ``Pipeline`` (no server, the ceiling) is timed at
the batch sizes 1, 4, 16, 32 and at every mean batch the server formed. Then a soak: ``--soak-s``
seconds of ``--soak-clients`` clients on the batching server, sampling the RSS of the whole
``iap-rt serve`` process tree (gateway + Triton + Python-backend stub) every second.

    python bench/serve_load.py                      # -> bench/results/serve_toy.json
    python bench/serve_load.py --clients 1,2 --requests-per-client 2 --soak-s 3 --out /tmp/x.json

Targets (issue 12): server images/s at 16 clients >= 85 % of the in-process pipeline at the batch
size the server formed; no failed request in the soak; RSS growth over the soak < 10 %.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from iap_rt.bench.machine import machine_info, process_tree
from iap_rt.serve.metrics import parse_text
from iap_rt.serve.triton import free_ports

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROMPTS = [
    "左边有一个红色的圆",
    "一个蓝色的正方形，位于右边",
    "中间有一个绿色的三角形",
    "上面有一个黄色的十字",
]


class Server:
    """``iap-rt serve`` in a child process on free ports."""

    def __init__(self, max_batch: int, args: argparse.Namespace, log_dir: Path):
        self.port, http_, grpc, metrics = free_ports(4)
        cmd = [sys.executable, "-m", "iap_rt.cli", "serve", "--port", str(self.port),
               "--triton-http-port", str(http_), "--triton-grpc-port", str(grpc),
               "--triton-metrics-port", str(metrics), "--max-batch", str(max_batch),
               "--max-queue-delay-ms", str(args.max_queue_delay_ms), "--max-queue", "100000",
               "--timeout-s", "600"]  # fmt: skip
        self.log = log_dir / f"serve-batch{max_batch}.log"
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"iap-rt serve exited {self.proc.returncode}; see {self.log}")
            if request(self.port, "GET", "/readyz")[0] == 200:
                return
            time.sleep(1.0)
        self.stop()
        raise SystemExit(f"iap-rt serve not ready in 600 s; see {self.log}")

    def metrics(self) -> dict[str, float]:
        return parse_text(request(self.port, "GET", "/metrics")[1].decode())

    def rss_mb(self) -> float:
        """Resident memory of the server's whole process tree."""
        return sum(_rss_kb(p) for p in process_tree(self.proc.pid)) / 1024

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(180)


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def request(port: int, method: str, path: str, body: dict | None = None,
            conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:  # fmt: skip
    """One HTTP request (on ``conn`` when given, keep-alive); (0, b"") when unreachable."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
        conn.request(method, path, data, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    except OSError:
        conn.close()
        return 0, b""
    finally:
        if own:
            conn.close()


def load(port: int, clients: int, per_client: int | None, steps: int, seed0: int,
         until: float | None = None) -> dict:  # fmt: skip
    """``clients`` closed-loop threads, each ``per_client`` requests (or until ``until``)."""
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        i = 0
        while (per_client is None or i < per_client) and (
            until is None or time.monotonic() < until
        ):
            body = {"prompt": PROMPTS[(k + i) % len(PROMPTS)], "seed": seed0 + k * 100000 + i,
                    "steps": steps, "n": 1}  # fmt: skip
            t0 = time.perf_counter()
            status, _ = request(port, "POST", "/v1/images/generations", body, conn)
            dt = time.perf_counter() - t0
            with lock:
                (latencies if status == 200 else failures).append(dt if status == 200 else status)
            if status == 0:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            i += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"latencies": latencies, "failures": failures, "wall_s": wall}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def sweep(server: Server, args: argparse.Namespace, label: str) -> list[dict]:
    """One row per client count."""
    load(server.port, 2, 2, args.steps, 10**9)  # warm-up: sessions, arenas, caches
    rows = []
    for n in args.clients:
        before = server.metrics()
        r = load(server.port, n, args.requests_per_client, args.steps, 1000 * n)
        after = server.metrics()
        images = after["iap_rt_images_generated_total"] - before["iap_rt_images_generated_total"]
        batches = after["iap_rt_batches_total"] - before["iap_rt_batches_total"]
        lat = r["latencies"]
        row = {
            "server": label, "clients": n, "requests": n * args.requests_per_client,
            "images": int(images), "failed": len(r["failures"]),
            "failed_statuses": sorted(set(r["failures"])), "wall_s": round(r["wall_s"], 3),
            "images_per_s": round(len(lat) / r["wall_s"], 3),
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "latency_p99_s": percentile(lat, 99),
            "mean_batch": round(images / batches, 3) if batches else None,
        }  # fmt: skip
        rows.append(row)
        print(f"{label:>12}  clients {n:>3}: {row['images_per_s']:7.2f} img/s  p50 "
              f"{row['latency_p50_s']:.3f}s  p99 {row['latency_p99_s']:.3f}s  batch "
              f"{row['mean_batch']}  failed {row['failed']}", flush=True)  # fmt: skip
    return rows


def soak(server: Server, args: argparse.Namespace) -> dict:
    """``--soak-clients`` clients for ``--soak-s`` seconds; RSS of the tree every second."""
    load(server.port, min(4, args.soak_clients), 2, args.steps, 2 * 10**9)  # settle arenas
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(round(server.rss_mb(), 1))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample)
    sampler.start()
    r = load(server.port, args.soak_clients, None, args.steps, 3 * 10**9,
             until=time.monotonic() + args.soak_s)  # fmt: skip
    stop.set()
    sampler.join()
    start, end = samples[0], samples[-1]
    return {
        "seconds": round(r["wall_s"], 2), "clients": args.soak_clients,
        "requests": len(r["latencies"]) + len(r["failures"]), "failed": len(r["failures"]),
        "images_per_s": round(len(r["latencies"]) / r["wall_s"], 3),
        "latency_p99_s": percentile(r["latencies"], 99),
        "rss_start_mb": start, "rss_end_mb": end, "rss_max_mb": max(samples),
        "rss_growth_pct": round(100 * (end - start) / start, 2), "rss_samples_mb": samples,
    }  # fmt: skip


def ceiling(batch_sizes: list[int], args: argparse.Namespace) -> list[dict]:
    """The in-process pipeline (no server) at each batch size: images/s of one call."""
    from iap_rt.pipeline import Pipeline, PromptRequest

    pipe = Pipeline.from_dir(progress=False)
    pipe.chunk_size = max(batch_sizes)
    rows = []
    for b in batch_sizes:
        reqs = [PromptRequest(PROMPTS[i % len(PROMPTS)], seed=i) for i in range(b)]
        pipe.generate(reqs, steps=args.steps)  # warm-up at this shape
        times = []
        for _ in range(args.ceiling_repeat):
            t0 = time.perf_counter()
            pipe.generate(reqs, steps=args.steps)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append({"batch": b, "call_s": round(med, 4), "images_per_s": round(b / med, 3),
                     "repeat": args.ceiling_repeat})  # fmt: skip
        print(f"{'pipeline':>12}  batch   {b:>3}: {b / med:7.2f} img/s", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,4,16,32", help="client counts [1,4,16,32]")
    ap.add_argument("--requests-per-client", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--max-batch", type=int, default=32, help="batching server's --max-batch")
    ap.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    ap.add_argument("--soak-s", type=float, default=60.0)
    ap.add_argument("--soak-clients", type=int, default=32)
    ap.add_argument("--ceiling-repeat", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "serve_toy.json"))
    args = ap.parse_args(argv)
    args.clients = [int(x) for x in args.clients.split(",")]
    from iap_rt.fileio import write_json_atomic

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": " ".join(["python", "bench/serve_load.py", *(argv or sys.argv[1:])]),
           "machine": machine_info(), "config": {k: v for k, v in vars(args).items()},
           "results": {}}  # fmt: skip
    t_start = time.time()
    server = Server(args.max_batch, args, out.parent)
    try:
        doc["results"]["batching"] = sweep(server, args, f"batch<={args.max_batch}")
        doc["results"]["soak"] = soak(server, args)
    finally:
        doc["config"]["exit_code_batching"] = server.stop()
    server = Server(1, args, out.parent)
    try:
        doc["results"]["no_batching"] = sweep(server, args, "batch=1")
    finally:
        doc["config"]["exit_code_no_batching"] = server.stop()
    formed = {max(1, round(r["mean_batch"] or 1)) for r in doc["results"]["batching"]}
    sizes = sorted({1, 4, 16, 32} | formed)
    doc["results"]["pipeline"] = ceiling(sizes, args)
    doc["summary"] = summarise(doc)
    doc["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["config"]["total_s"] = round(time.time() - t_start, 1)
    write_json_atomic(out, doc)
    print(json.dumps(doc["summary"], indent=1))
    print(f"wrote {out}")
    return 0


def summarise(doc: dict) -> dict:
    """Server vs ceiling at the batch the server formed; batching gain; the soak targets."""
    ceil = {r["batch"]: r["images_per_s"] for r in doc["results"]["pipeline"]}
    off = {r["clients"]: r["images_per_s"] for r in doc["results"]["no_batching"]}
    per_n = []
    for r in doc["results"]["batching"]:
        b = max(1, round(r["mean_batch"] or 1))
        per_n.append({
            "clients": r["clients"], "mean_batch": r["mean_batch"],
            "server_vs_pipeline": round(r["images_per_s"] / ceil[b], 3),
            "batching_gain": round(r["images_per_s"] / off[r["clients"]], 3)
            if off.get(r["clients"]) else None,
        })  # fmt: skip
    s = doc["results"]["soak"]
    at16 = next((p for p in per_n if p["clients"] == 16), None)
    return {
        "per_clients": per_n,
        "target_server_vs_pipeline_at_16_ge_0.85": None if at16 is None
        else at16["server_vs_pipeline"] >= 0.85,
        "target_soak_zero_failed": s["failed"] == 0,
        "target_soak_rss_growth_lt_10pct": s["rss_growth_pct"] < 10,
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
