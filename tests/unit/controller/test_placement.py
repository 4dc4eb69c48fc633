import pytest

from keel.config import Resources
from keel.controller.placement import PlacementError, RoleRequest, check_fits


def test_bundle_drops_zero_amounts_and_counts_replicas():
    req = RoleRequest("rollout", 3, Resources(num_cpus=0.5, num_gpus=0, custom={"rollout": 1}))
    assert req.bundle() == {"CPU": 0.5, "rollout": 1}
    assert req.total() == {"CPU": 1.5, "rollout": 3}


def test_fits_exactly():
    check_fits(
        [RoleRequest("rollout", 2, Resources(num_cpus=0.5)), RoleRequest("learner", 1, Resources(num_cpus=1))],
        {"CPU": 2.0},
    )


def test_error_names_role_request_and_cluster():
    requests = [RoleRequest("rollout", 2, Resources(num_cpus=0.5)), RoleRequest("learner", 2, Resources(num_cpus=1))]
    with pytest.raises(PlacementError) as info:
        check_fits(requests, {"CPU": 2.0, "memory": 1e9})
    msg = str(info.value)
    assert "cannot place role 'learner'" in msg
    assert "2 x {CPU=1} = CPU 2" in msg and "only CPU 1 is left" in msg


def test_missing_custom_resource():
    with pytest.raises(PlacementError, match="role 'rollout'.*rollout 1.*only rollout 0 is left"):
        check_fits([RoleRequest("rollout", 1, Resources(num_cpus=0.5, custom={"rollout": 1}))], {"CPU": 2.0})


def test_a_run_reserves_a_bundle_per_reward_and_reference_replica():
    from keel.config import parse_config
    from keel.controller.placement import role_requests

    base = {
        "model": {"policy": "p"},
        "data": {"prompts": "prompts.jsonl"},
        "reward": {"source": {"type": "function", "function": "keel.reward.rules:arithmetic"}, "replicas": 3},
        "reference": {"replicas": 2},
    }
    requests = {r.role: r for r in role_requests(parse_config(base))}
    assert (requests["reward"].replicas, requests["reference"].replicas) == (3, 2)
    assert requests["reward"].total() == {"CPU": 1.5}  # 3 x the default 0.5 CPU
    external = {**base, "reward": {**base["reward"], "replicas": 1}}
    external["transport"] = {"reward": "grpc", "grpc": {"reward_address": "rm:50051", "tls_ca": "ca.pem"}}
    assert "reward" not in {r.role for r in role_requests(parse_config(external))}  # its server is elsewhere
