"""Weight sync: shared memory vs the Ray object store vs gRPC on loopback vs a plain copy, in one run.

    .venv/bin/python benchmarks/weight_sync.py [--sizes 1,25,100] [--repeats 3] [--chunk-mb 4]

For models of about 1M, 25M and 100M float32 parameters (Llama-shaped square matrices), each
path ends with the same bytes written into a consumer's own preallocated weights:

- memcpy: `dst.copy_(src)` in the producer's process: the floor.
- shared memory: the producer writes the state into its shared-memory buffer
  (`keel.transport.shm`), and a consumer actor maps it, checks every value is finite and copies
  it into its weights. This is the path `transport.weights: objectstore` takes for a rollout
  worker on learner rank 0's node.
- objectstore: `ray.put(state)` in the driver, then a consumer actor (another process) gets it
  and copies it into its weights: torch tensors (pickled with their bytes), and numpy arrays
  (`keel.transport.objectstore.pack`, mapped by the consumer). The numpy path is the one
  `transport.weights: objectstore` takes for a worker on another node.
- grpc: the producer publishes the version on a WeightService (bytes, sha256 per tensor),
  and the consumer actor fetches it over 127.0.0.1. The fetch streams chunks with a CRC-32
  each, checks every sha256 with auth on, then copies into its weights. Publish and fetch are
  timed apart. This is the path `transport.weights: grpc` takes.

Prints the median of --repeats runs per cell, GB/s, and the ratios between paths.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

HIDDEN = {1: 256, 25: 1024, 100: 1024}  # matrix side per size (in millions of parameters)


def make_state(millions: int) -> dict[str, torch.Tensor]:
    """About `millions` M float32 parameters as hidden x hidden matrices."""
    side = HIDDEN.get(millions, 1024)
    count = max(1, round(millions * 1e6 / side**2))
    g = torch.Generator().manual_seed(millions)
    return {f"layers.{i}.weight": torch.randn(side, side, generator=g) for i in range(count)}


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class Consumer:
    """A rollout-worker stand-in: holds weights of the same shapes and copies updates into them."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.weights = {k: torch.empty(s) for k, s in shapes.items()}
        self.client = None

    def apply(self, state: dict[str, torch.Tensor]) -> float:
        t0 = time.perf_counter()
        for k, v in state.items():
            self.weights[k].copy_(v)
        return time.perf_counter() - t0

    def from_objectstore(self, state: dict) -> int:
        # Ray resolved the ref before this call: numpy arrays are mapped from shared memory
        from keel.transport.objectstore import unpack

        if state and isinstance(next(iter(state.values())), tuple):
            state = unpack(state)
        self.check(state)
        self.apply(state)
        return len(state)

    def check(self, state: dict[str, torch.Tensor]) -> None:
        """What a rollout worker checks before it loads anything: names, shapes, finite values."""
        from keel.rollout.worker import check_weights

        check_weights(state, {k: (tuple(v.shape), v.dtype) for k, v in self.weights.items()}, "bench")

    def from_shared(self, handle) -> int:
        from keel.transport.shm import read_shared

        state = read_shared(handle, "bench")
        self.check(state)
        self.apply(state)
        return len(state)

    def connect(self, address: str) -> None:
        from keel.config import GrpcConfig
        from keel.transport.weights import WeightClient

        self.client = WeightClient(GrpcConfig(weight_chunk_mb=4, max_message_mb=64), address)

    def from_grpc(self, version: int) -> int:
        fetched, state = self.client.fetch(version)
        assert fetched == version
        self.check(state)
        self.apply(state)
        return len(state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,25,100", help="model sizes in millions of parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mb", type=float, default=4.0)
    args = parser.parse_args()
    os.environ.setdefault("KEEL_GRPC_TOKEN", "bench-token")

    import ray

    from keel.config import GrpcConfig
    from keel.transport.objectstore import pack
    from keel.transport.shm import SharedWeights
    from keel.transport.weights import WeightPublisher

    # the workers inherit the token from this process's environment (never from a runtime_env)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    publisher = WeightPublisher(GrpcConfig(weight_chunk_mb=args.chunk_mb, max_message_mb=64, weight_versions_kept=1))
    shared = SharedWeights("bench")
    version = 0
    rows = []
    for millions in (int(s) for s in args.sizes.split(",")):
        state = make_state(millions)
        size = nbytes(state)
        params = sum(t.numel() for t in state.values())
        consumer = ray.remote(Consumer).options(num_cpus=1).remote({k: tuple(v.shape) for k, v in state.items()})
        ray.get(consumer.connect.remote(publisher.address))
        local = Consumer({k: tuple(v.shape) for k, v in state.items()})
        times: dict[str, list[float]] = {k: [] for k in ("memcpy", "shm", "torch", "numpy", "publish", "fetch")}
        for _ in range(args.repeats):
            times["memcpy"].append(local.apply(state))

            version += 1
            t0 = time.perf_counter()
            ray.get(consumer.from_shared.remote(shared.write(version, state, torch.float32)))
            times["shm"].append(time.perf_counter() - t0)

            for kind, value in (("torch", state), ("numpy", None)):
                t0 = time.perf_counter()
                ref = ray.put(value if value is not None else pack(state))
                ray.get(consumer.from_objectstore.remote(ref))
                times[kind].append(time.perf_counter() - t0)
                del ref

            t0 = time.perf_counter()
            publisher.publish(version, state)
            t1 = time.perf_counter()
            ray.get(consumer.from_grpc.remote(version))
            times["publish"].append(t1 - t0)
            times["fetch"].append(time.perf_counter() - t1)
        ray.kill(consumer)
        med = {k: statistics.median(v) for k, v in times.items()}
        med["grpc"] = med["publish"] + med["fetch"]
        rows.append((params, size, med))

    print(f"\nweight sync, float32, median of {args.repeats}, chunks {args.chunk_mb:g} MiB, auth on, 2 CPUs\n")
    paths = {"memcpy": "memcpy", "shm": "shared memory", "torch": "store, torch", "numpy": "store, numpy"}
    paths["grpc"] = "gRPC (publish + fetch)"
    print(
        "| params | MB | "
        + " | ".join(f"{p} ms" for p in paths.values())
        + " | "
        + " | ".join(f"{paths[k]} / memcpy" for k in ("shm", "torch", "numpy", "grpc"))
        + " |"
    )
    print("|---|---|" + "---|" * (len(paths) + 4))
    for params, size, m in rows:
        cells = [f"{m['memcpy'] * 1e3:.1f}", f"{m['shm'] * 1e3:.1f}", f"{m['torch'] * 1e3:.1f}"]
        cells += [f"{m['numpy'] * 1e3:.1f}", f"{m['publish'] * 1e3:.0f} + {m['fetch'] * 1e3:.0f}"]
        cells += [f"{m[k] / m['memcpy']:.1f}x" for k in ("shm", "torch", "numpy", "grpc")]
        print(f"| {params / 1e6:.1f}M | {size / 1e6:.0f} | " + " | ".join(cells) + " |")
    shared.close()
    publisher.stop(0)
    ray.shutdown()


if __name__ == "__main__":
    main()
