"""Rollout autoscaling by node group, for real: Ray's own autoscaler with the fake multi-node
provider (what `ray.cluster_utils.AutoscalingCluster` drives) brings nodes up and down on this one
machine, as KubeRay's autoscaler does pods.

The cluster: a head (1 CPU, no custom resource), a `learner` node type ({"learner": 1}, one node)
and a `rollout` node type ({"rollout": 1}, one node at least, two at most). The run asks for those
custom resources in its roles' `resources.custom`, as the Helm chart's worker groups do. A scale
request left with the job's control actor (what `keel scale rollout 2` sends) makes the controller
ask the autoscaler for room (`keel.controller.scaling.request_capacity`): a second rollout node
comes up, the new worker's placement bundle lands on it, and a step trains with both workers.
Scaling back to 1 releases the node: the autoscaler removes it once idle.

Two things differ from `AutoscalingCluster.start()`, on purpose: it runs `ray stop --force`, which
kills every Ray on the machine (the suite's own session, other people's), and it reads an
example.yaml that Ray's wheel does not ship. So the head is started here with the same command,
on ports and a temp dir of its own, and stopped by its process group. The run itself happens in a
child process: a process holds one Ray driver connection, and the suite's `ray_session` may hold it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_MIN = 0.1  # the autoscaler removes a node idle this long (6 s)

NODE_TYPES = {
    "learner": {
        "resources": {"CPU": 1, "learner": 1, "object_store_memory": 150 * 2**20},
        "node_config": {},
        "min_workers": 1,
        "max_workers": 1,
    },
    "rollout": {
        "resources": {"CPU": 1, "rollout": 1, "object_store_memory": 150 * 2**20},
        "node_config": {},
        "min_workers": 1,
        "max_workers": 2,
    },
}

# The run: one worker per rollout node ({"rollout": 1}), the learner on its node, reward and
# reference wherever a quarter CPU is free. Placement waits long enough for a node to start.
RUN = {
    "rollout.resources": {"num_cpus": 0.25, "custom": {"rollout": 1}},
    "learner.resources": {"num_cpus": 0.5, "custom": {"learner": 1}},
    "reward.resources": {"num_cpus": 0.25},
    "reference.resources": {"num_cpus": 0.25},
    "controller.prompts_per_step": 8,
    "controller.steps": 3,
    "controller.placement_timeout_s": 120,
    "algorithm.mini_batch_size": 8,
    "learner.micro_batch_size": 8,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_env() -> dict[str, str]:
    return {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",  # the fake multi-node provider refuses to start without it
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "disabled",  # Ray turns token auth on when ~/.ray/auth_token exists
        "RAY_USAGE_STATS_ENABLED": "0",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture
def autoscaling_cluster(tmp_path):
    """A head with the autoscaler and the fake node provider; yields its GCS address."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    config = {
        "cluster_name": "keel-autoscaling-test",
        "max_workers": 3,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": address,  # else the fake nodes look for a head on port 6379
        },
        "available_node_types": {
            **NODE_TYPES,
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "docker": {},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{k: [] for k in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }
    (tmp_path / "autoscaling.json").write_text(json.dumps(config))
    temp_dir = tempfile.mkdtemp(prefix="keel-as-", dir="/tmp")  # short: Ray's socket paths must fit
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--autoscaling-config={tmp_path / 'autoscaling.json'}",
        "--num-cpus=1",
        f"--object-store-memory={150 * 2**20}",
        "--include-dashboard=false",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(cmd, env=_cluster_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield address
    finally:
        # the head stops its own processes on SIGTERM; the fake nodes (the autoscaler's children)
        # and their workers share its process group, which goes last
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


@pytest.mark.slow
def test_keel_scale_brings_up_a_rollout_node_and_releases_it(autoscaling_cluster, tiny_model_dir, tmp_path):
    from keel.data.tasks import arithmetic_rows, write_jsonl

    prompts = write_jsonl(arithmetic_rows(64, seed=3), tmp_path / "prompts.jsonl")
    args = {"address": autoscaling_cluster, "policy": str(tiny_model_dir), "prompts": str(prompts)}
    args["run_dir"] = str(tmp_path / "run")
    env = {**_cluster_env(), "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run(
        [sys.executable, __file__, json.dumps(args)], env=env, capture_output=True, text=True, timeout=300
    )
    tail = (child.stdout + child.stderr)[-6000:]
    assert child.returncode == 0, tail
    out = json.loads(child.stdout.strip().splitlines()[-1])

    assert out["rollout_nodes"][0] == 1, tail  # the min_workers node
    assert out["workers"] == [1, 2, 1], tail  # rollout workers in each step
    # a second rollout node came up, and the new worker's bundle is on it
    new_nodes = set(out["rollout_nodes_after_up"]) - set(out["rollout_nodes_before"])
    assert len(new_nodes) == 1, tail
    assert out["new_worker_node"] in new_nodes, tail
    # back to one worker: the idle node went, the first one stays
    assert out["rollout_nodes_after_down"] == out["rollout_nodes_before"], tail
    # the controller asked the autoscaler for one rollout bundle, then two, then one again
    assert out["requested_rollout_bundles"] == [2, 1], tail


# ------------------------------------------------------------------ the run, in its own process


def _rollout_nodes() -> list[str]:
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("rollout"))


def _wait(what: str, ok, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:g}s for {what}")
        time.sleep(0.5)


def _requested_rollout_bundles() -> int:
    """How many rollout bundles the last `request_resources` asked for (Ray keeps it in the GCS)."""
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    bundles = json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL))
    return sum(1 for b in bundles if b.get("rollout"))


def _scenario(args: dict) -> dict:
    import ray

    from integration.configs import demo_config
    from keel.controller.actors import ROLE_ENV
    from keel.controller.loop import Controller

    ray.init(address=args["address"], log_to_driver=False, runtime_env={"env_vars": ROLE_ENV})
    _wait("the learner and rollout nodes (min_workers)", lambda: len(ray.nodes()) >= 3 and _rollout_nodes(), 120)
    out: dict = {"rollout_nodes": [len(_rollout_nodes())], "workers": [], "requested_rollout_bundles": []}
    cfg = demo_config(args["policy"], args["prompts"], **RUN)
    controller = Controller(cfg, Path(args["run_dir"]), log=lambda *a: print(*a, file=sys.stderr))
    controller.start()
    try:
        out["workers"].append(int(controller.step()["rollout/workers"]))
        out["rollout_nodes_before"] = _rollout_nodes()

        # keel scale rollout 2: the request waits with the control actor until the next step
        ray.get(controller.control.request_rollout.remote(2))
        out["workers"].append(int(controller.step()["rollout/workers"]))
        out["requested_rollout_bundles"].append(_requested_rollout_bundles())
        out["rollout_nodes_after_up"] = _rollout_nodes()
        group = controller.pool._slots[1].group
        out["new_worker_node"] = ray.util.placement_group_table(group)["bundles_to_node_id"][0]

        ray.get(controller.control.request_rollout.remote(1))
        out["workers"].append(int(controller.step()["rollout/workers"]))
        out["requested_rollout_bundles"].append(_requested_rollout_bundles())
        before = out["rollout_nodes_before"]
        _wait("the idle rollout node to go", lambda: _rollout_nodes() == before, 60 + 60 * IDLE_TIMEOUT_MIN)
        out["rollout_nodes_after_down"] = _rollout_nodes()
    finally:
        controller.shutdown()
        ray.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(_scenario(json.loads(sys.argv[1]))))
