"""Reward server throughput and latency at 1, 8 and 32 concurrent clients, in one run.

    .venv/bin/python benchmarks/reward_server.py [--seconds 3]

Serves the demo's rule reward (keel.reward.rules:arithmetic) on 127.0.0.1 with auth on, and
has N client threads each send 8-sample requests back to back for a fixed time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

from keel.config import GrpcConfig, RewardConfig, RewardFunctionSource
from keel.reward.client import RewardClient
from keel.reward.server import RewardServerConfig, start_reward_server


def run(clients: int, seconds: float, address: str, grpc_cfg: GrpcConfig) -> tuple[float, float, float, int]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        client = RewardClient(grpc_cfg, address)
        mine = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            client.score(["3+4="] * 8, ["7", "8", "x", "7", "1", "7", "7", "9"], [{"answer": "7"}] * 8)
            mine.append(time.perf_counter() - t0)
        client.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return len(latencies) / elapsed, statistics.median(latencies) * 1000, p99 * 1000, len(latencies)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    os.environ.setdefault("KEEL_GRPC_TOKEN", "bench-token")
    grpc_cfg = GrpcConfig()
    cfg = RewardServerConfig(
        reward=RewardConfig(source=RewardFunctionSource(function="keel.reward.rules:arithmetic")),
        grpc=grpc_cfg,
        port=0,
        max_batch_size=256,
        max_wait_ms=2,
    )
    server = start_reward_server(cfg)
    address = f"127.0.0.1:{server.port}"
    print(f"\nreward server, rule reward, 8 samples per request, {args.seconds:g} s per row, 2 CPUs\n")
    print("| clients | requests/s | p50 ms | p99 ms | requests |")
    print("|---|---|---|---|---|")
    for clients in (1, 8, 32):
        rps, p50, p99, n = run(clients, args.seconds, address, grpc_cfg)
        print(f"| {clients} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {n} |")
    print(f"\nmodel calls: {server.batcher.batches} (requests were batched together)")
    server.stop(0)


if __name__ == "__main__":
    main()
