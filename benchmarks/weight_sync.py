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

    .venv/bin/python benchmarks/weight_sync.py --part lora [--lora-sizes 28m,100m] [--rank 16] [--backend vllm]

The LoRA part (model.lora) runs Keel's own roles on Llamas of the peer workload's sizes: a Learner
(DeepSpeed, one rank) and a RolloutWorker (--backend), each a Ray actor, as a run starts them. For
full fine-tuning and for rank --rank adapters on q/k/v/o it reports the bytes of one sync and its
time over shared memory (learner export + the worker's check, merge and reload) and over gRPC
(publish + fetch, check, merge, reload), and the learner's resident memory after an update (weights,
gradients and AdamW state; with LoRA the base is frozen and only the adapters have the latter two).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
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
    parser.add_argument("--part", choices=["paths", "lora", "all"], default="all")
    parser.add_argument("--sizes", default="1,25,100", help="model sizes in millions of parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mb", type=float, default=4.0)
    parser.add_argument("--lora-sizes", default="28m,100m", help="peer workload sizes for the LoRA part")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the LoRA part")
    parser.add_argument("--backend", choices=["vllm", "hf"], default="vllm", help="rollout backend of the LoRA part")
    args = parser.parse_args()
    os.environ.setdefault("KEEL_GRPC_TOKEN", "bench-token")

    import ray

    # the workers inherit the token from this process's environment (never from a runtime_env)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    if args.part in ("paths", "all"):
        transport_paths(args)
    if args.part in ("lora", "all"):
        lora_sync(args)
    ray.shutdown()


def transport_paths(args) -> None:
    import ray

    from keel.config import GrpcConfig
    from keel.transport.objectstore import pack
    from keel.transport.shm import SharedWeights
    from keel.transport.weights import WeightPublisher

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


# --------------------------------------------------------------------------- model.lora: full vs adapters


def fake_batch(vocab: int, batch: int = 8, prompt: int = 16, response: int = 16):
    """A scored batch of random tokens for one on-policy update (every token a response token)."""
    from keel.trajectory import Trajectories

    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, response, dtype=torch.bool)
    return Trajectories(
        rollout_id="bench",
        weight_version=0,
        prompt_ids=[str(i // 2) for i in range(batch)],
        sample_index=[i % 2 for i in range(batch)],
        prompt_tokens=torch.randint(4, vocab, (batch, prompt), generator=g),
        prompt_mask=torch.ones(batch, prompt, dtype=torch.bool),
        response_tokens=torch.randint(4, vocab, (batch, response), generator=g),
        response_mask=mask,
        behaviour_logprobs=torch.zeros(batch, response),
        prompts=[""] * batch,
        responses=[""] * batch,
        advantages=torch.randn(batch, 1, generator=g).expand(batch, response).contiguous(),
        ref_logprobs=torch.zeros(batch, response),
    )


def memory_mb() -> dict[str, float]:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), in MB."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def lora_sync(args) -> None:
    """Full fine-tuning against --rank adapters: sync bytes, sync time (shm, gRPC), learner memory."""
    import tempfile
    from pathlib import Path

    import ray

    from keel.config import (
        AlgorithmConfig,
        GrpcConfig,
        KLConfig,
        LearnerConfig,
        LoraConfig,
        ModelConfig,
        OptimizerConfig,
        Resources,
        RolloutConfig,
    )
    from keel.controller.actors import free_port, remote
    from keel.learner.learner import Learner, LearnerPlan
    from keel.rollout.worker import RolloutWorker

    sys.path.insert(0, str(Path(__file__).parent))
    from peer_workload import make_model

    grpc_cfg = GrpcConfig(weight_chunk_mb=args.chunk_mb, max_message_mb=64, weight_versions_kept=1)
    algo = AlgorithmConfig(estimator="grpo", mini_batch_size=8, kl=KLConfig(coef=0.0, placement="loss"))
    learner_cfg = LearnerConfig(micro_batch_size=8, optimizer=OptimizerConfig(lr=1e-4))
    plan = LearnerPlan(temperature=1.0, use_critic=False, total_optimizer_steps=10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.lora_sizes.split(","):
            path = make_model(Path(tmp) / size, size)
            vocab = json.loads((path / "config.json").read_text())["vocab_size"]
            batch = ray.put(fake_batch(vocab))
            for lora in (None, LoraConfig(rank=args.rank, alpha=2 * args.rank)):
                model = ModelConfig(policy=str(path), lora=lora)
                env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
                env |= {"OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
                learner = remote(Learner, Resources(num_cpus=1), env).remote(model, learner_cfg, algo, plan)
                rollout = RolloutConfig(backend=args.backend)
                worker = remote(RolloutWorker, Resources(num_cpus=1), env).remote(model, rollout, 64, 0)
                ray.get(learner.update_on_policy.remote(batch))  # AdamW state exists from the first step on
                memory = ray.get(learner.__ray_call__.remote(lambda _: memory_mb()))
                address = ray.get(learner.serve_weights.remote(grpc_cfg))
                ray.get(worker.connect.remote(grpc_cfg, address))
                times: dict[str, list[float]] = {k: [] for k in ("export", "apply", "publish", "fetch")}
                version = 0
                for _ in range(args.repeats + 1):  # the first round warms up
                    version += 1
                    t0 = time.perf_counter()
                    handle = ray.get(learner.export_shared.remote(version))
                    t1 = time.perf_counter()
                    assert ray.get(worker.update_weights_shared.remote(handle, version)) == version
                    t2 = time.perf_counter()
                    version += 1
                    published = ray.get(learner.publish_weights.remote(version))
                    t3 = time.perf_counter()
                    assert ray.get(worker.pull_weights.remote(version)) == version
                    t4 = time.perf_counter()
                    if version > 2:
                        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                            times[k].append(v)
                med = {k: statistics.median(v) for k, v in times.items()}
                params = ray.get(learner.__ray_call__.remote(lambda lr: lr.params))
                rows.append((size, "full" if lora is None else f"LoRA r{args.rank}", handle.total_bytes, med, memory))
                rows[-1][3]["bytes_grpc"] = published["bytes"]
                rows[-1][3]["params"] = params
                for actor in (learner, worker):
                    ray.kill(actor)

    print(f"\nmodel.lora weight sync, {args.backend} rollout, median of {args.repeats}, auth on, 2 CPUs\n")
    print(
        "| model | trained | trainable params | bytes per sync | shared memory: export + apply ms "
        "| gRPC: publish + fetch ms | learner RSS MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for size, kind, size_bytes, m, memory in rows:
        trainable = f"{m['params']['params/trainable'] / 1e6:.2f}M of {m['params']['params/total'] / 1e6:.1f}M"
        shm = f"{m['export'] * 1e3:.0f} + {m['apply'] * 1e3:.0f}"
        grpc_ms = f"{m['publish'] * 1e3:.0f} + {m['fetch'] * 1e3:.0f}"
        line = [size, kind, trainable, _size(size_bytes), shm, grpc_ms, f"{memory['VmRSS']:.0f}"]
        print("| " + " | ".join(line) + " |")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


if __name__ == "__main__":
    main()
