"""deploy/kubernetes/rayjob.yaml, the RayJob for people who do not use Helm, meets the same
schemas and rules as the chart's output."""

from __future__ import annotations

import json

import jsonschema
import kubernetes_validate
import yaml

from deploy.conftest import K8S_VERSION, RAW_RAYJOB, crd_schema
from deploy.test_chart import RAY_KINDS, cluster_spec, containers, pod_specs


def objects() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAW_RAYJOB.read_text()) if d]


def test_raw_rayjob_matches_the_schemas():
    objs = objects()
    assert [o["kind"] for o in objs if o["kind"] in RAY_KINDS] == ["RayJob"]
    for obj in objs:
        if obj["kind"] in RAY_KINDS:
            errors = list(jsonschema.Draft7Validator(crd_schema(obj["kind"])).iter_errors(obj))
            assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_raw_rayjob_config_and_placement():
    from keel.config import parse_config

    objs = objects()
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    cfg = parse_config(yaml.safe_load(cm["data"]["config.yaml"]), "rayjob.yaml ConfigMap")
    rayjob = next(o for o in objs if o["kind"] == "RayJob")
    offered = {}
    for group in cluster_spec(rayjob)["workerGroupSpecs"]:
        offered.update(json.loads(json.loads(group["rayStartParams"]["resources"])))
    need: dict[str, float] = {}
    for role in (cfg.rollout, cfg.reward, cfg.reference, cfg.learner):
        for name, amount in role.resources.custom.items():
            need[name] = need.get(name, 0) + amount
    need["learner"] += (cfg.learner.replicas - 1) * cfg.learner.resources.custom["learner"]
    assert all(offered.get(k, 0) >= v for k, v in need.items()), (need, offered)
    assert "--run-dir /var/lib/keel/" in rayjob["spec"]["entrypoint"]
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]["KEEL_JOB_ID"] == rayjob["spec"]["jobId"]


def test_raw_rayjob_is_locked_down():
    rayjob = next(o for o in objects() if o["kind"] == "RayJob")
    for where, pod in pod_specs(rayjob):
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
    for where, c, _ in containers(rayjob):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
        assert c["resources"]["limits"] == c["resources"]["requests"], where
        assert all("valueFrom" not in e for e in c.get("env", [])), where
