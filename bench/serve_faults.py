"""A fault drill of ``iap-rt serve``'s scale-out layout, on the embedded model: two Tritons
(``iap-rt serve --no-gateway``) behind one gateway (``--triton-url`` twice), ``--clients``
closed-loop clients for ``--duration-s`` seconds; at ``--kill-at-s`` one Triton's
``tritonserver`` gets ``kill -9``, at ``--restart-at-s`` that node is started again on the same
ports. Recorded: requests answered / failed (and their statuses) / retried by the gateway, p50 /
p99 latency before the kill, while one Triton is up and after the restarted one is back, how
long after its restart the restarted Triton got rows again, and each process's exit code.

    python bench/serve_faults.py                      # -> bench/results/serve_faults.json
    python bench/serve_faults.py --duration-s 12 --kill-at-s 4 --restart-at-s 7 --out /tmp/f.json

Target (issue 30): after the first second following the kill, 0 failed requests while one
Triton is up. Every request is seeded, so a row the dead Triton was generating is generated
again on the other, the same image.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from serve_load import PROMPTS, percentile, request

from iap_rt.bench.machine import find_process, machine_info
from iap_rt.serve.metrics import parse_text
from iap_rt.serve.triton import free_ports

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START_TIMEOUT_S = 300


class Proc:
    """One ``iap-rt serve`` child process (``args`` after ``serve``) on ``ports``."""

    def __init__(self, name: str, args: list[str], ports, log_dir: Path):
        self.name, self.ports = name, ports
        port, http_, grpc, metrics = ports
        cmd = [sys.executable, "-m", "iap_rt.cli", "serve", "--port", str(port),
               "--triton-http-port", str(http_), "--triton-grpc-port", str(grpc),
               "--triton-metrics-port", str(metrics), "--timeout-s", "600", *args]  # fmt: skip
        self.log = log_dir / f"faults-{name}.log"
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports[2]}"

    def tritonserver_pid(self) -> int:
        pid = find_process(self.proc.pid, "tritonserver")
        if pid is None:
            raise SystemExit(f"{self.name}: no tritonserver under pid {self.proc.pid}")
        return pid

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(180)


def wait_until(predicate, what: str, timeout_s: float = START_TIMEOUT_S) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise SystemExit(f"{what}: not within {timeout_s} s")


def metrics(port: int) -> dict[str, float]:
    return parse_text(request(port, "GET", "/metrics")[1].decode())


def readyz(port: int) -> dict:
    status, body = request(port, "GET", "/readyz")
    return json.loads(body) if body else {"ready": False, "triton": {}, "status": status}


def clients(port: int, n: int, steps: int, t0: float, until: float, log: list) -> list:
    """``n`` closed-loop clients; each request appends (start, end, status) to ``log``."""
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        i = 0
        while time.monotonic() < until:
            body = {"prompt": PROMPTS[(k + i) % len(PROMPTS)], "seed": k * 100000 + i,
                    "steps": steps}  # fmt: skip
            start = time.monotonic() - t0
            status, _ = request(port, "POST", "/v1/images/generations", body, conn)
            with lock:
                log.append((start, time.monotonic() - t0, status))
            if status == 0:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            i += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    return threads


def phase(log: list, start: float, end: float | None) -> dict:
    """Requests that *started* in [start, end): answered, failed (by status), latency."""
    rows = [r for r in log if r[0] >= start and (end is None or r[0] < end)]
    ok = [r[1] - r[0] for r in rows if r[2] == 200]
    failed: dict[str, int] = {}
    for r in rows:
        if r[2] != 200:
            failed[str(r[2])] = failed.get(str(r[2]), 0) + 1
    p = {q: percentile(ok, q) for q in (50, 99)}
    return {"from_s": round(start, 3), "to_s": None if end is None else round(end, 3),
            "requests": len(rows), "answered": len(ok), "failed": sum(failed.values()),
            "failed_by_status": failed,
            "latency_p50_s": None if p[50] is None else round(p[50], 4),
            "latency_p99_s": None if p[99] is None else round(p[99], 4)}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration-s", type=float, default=60.0)
    ap.add_argument("--kill-at-s", type=float, default=20.0)
    ap.add_argument("--restart-at-s", type=float, default=35.0)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per request")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS / "serve_faults.json"))
    ap.add_argument("--log-dir", default=None, help="the servers' logs [a temporary directory]")
    args = ap.parse_args(argv)
    if not 0 < args.kill_at_s < args.restart_at_s < args.duration_s:
        ap.error("need 0 < --kill-at-s < --restart-at-s < --duration-s")
    from iap_rt.fileio import write_json_atomic

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="iap-rt-faults-"))
    logs.mkdir(parents=True, exist_ok=True)
    load_start = [round(x, 2) for x in os.getloadavg()]
    node = ["--no-gateway", "--max-batch", str(args.max_batch)]
    a = Proc("a", node, free_ports(4), logs)
    b = Proc("b", node, free_ports(4), logs)
    gw_ports = free_ports(4)
    gw = Proc("gateway", ["--triton-url", a.grpc_url, "--triton-url", b.grpc_url], gw_ports,
              logs)  # fmt: skip
    port = gw_ports[0]
    procs = {"a": a, "b": b, "gateway": gw}
    events: dict = {}
    log: list = []
    try:
        wait_until(lambda: all(readyz(port).get("triton", {}).values())
                   and len(readyz(port)["triton"]) == 2, "both Tritons in rotation")  # fmt: skip
        t0 = time.monotonic()
        threads = clients(port, args.clients, args.steps, t0, t0 + args.duration_s, log)
        rows_a = f'iap_rt_upstream_rows_total{{upstream="{a.grpc_url}"}}'
        time.sleep(max(0.0, t0 + args.kill_at_s - time.monotonic()))
        os.kill(a.tritonserver_pid(), signal.SIGKILL)
        events["kill_s"] = time.monotonic() - t0
        events["node_a_exit_code_after_kill"] = a.proc.wait(120)
        time.sleep(max(0.0, t0 + args.restart_at_s - time.monotonic()))
        before = metrics(port)[rows_a]
        events["restart_s"] = time.monotonic() - t0
        a2 = Proc("a-restarted", node, a.ports, logs)
        procs["a"] = a2
        wait_until(
            lambda: readyz(port)["triton"].get(a.grpc_url), "the restarted Triton in rotation"
        )
        events["back_in_rotation_s"] = time.monotonic() - t0
        wait_until(lambda: metrics(port)[rows_a] > before, "the restarted Triton's first row",
                   timeout_s=max(30.0, args.duration_s))  # fmt: skip
        events["traffic_again_s"] = time.monotonic() - t0
        for t in threads:
            t.join()
        m = metrics(port)
        events["gateway_retries"] = int(m["iap_rt_upstream_retries_total"])
        events["upstream_failures"] = {k.split('"')[1]: int(v) for k, v in m.items()
                                       if k.startswith("iap_rt_upstream_failures_total")}  # fmt: skip
    finally:
        codes = {k: p.stop() for k, p in procs.items()}
    kill, back = events["kill_s"], events["back_in_rotation_s"]
    res = {
        "before_kill": phase(log, 0.0, kill),
        "first_second_after_kill": phase(log, kill, kill + 1.0),
        "one_triton_up": phase(log, kill + 1.0, back),
        "after_restart": phase(log, back, None),
        "all": phase(log, 0.0, None),
    }
    events = {k: round(v, 3) if isinstance(v, float) else v for k, v in events.items()}
    doc = {
        "command": " ".join(["python", "bench/serve_faults.py", *(argv or sys.argv[1:])]),
        "machine": machine_info() | {"loadavg_start": load_start,
                                     "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "logs": str(logs),
        "config": vars(args) | {"exit_codes_at_end": codes},
        "events": events,
        "results": res,
        "summary": {
            "failed_after_first_second_while_one_up": res["one_triton_up"]["failed"],
            "target_zero_failed": res["one_triton_up"]["failed"] == 0,
            "restarted_triton_traffic_after_s": round(events["traffic_again_s"] - events["restart_s"], 3),
            "retries": events["gateway_retries"],
        },
    }  # fmt: skip
    write_json_atomic(out, doc)
    print(json.dumps(doc["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
