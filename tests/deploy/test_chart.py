"""The Helm chart (helm/keel): lint, render, and check what it renders against the Kubernetes and
KubeRay schemas and against Keel's own config schema, for the default values and each ci/ file."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy.conftest import (
    CHART,
    CI_VALUES,
    K8S_VERSION,
    ROOT,
    crd_schema,
    run_helm,
    template,
)

VALUES = [None, *CI_VALUES]
IDS = ["defaults", *(p.stem for p in CI_VALUES)]
RAY_KINDS = ("RayJob", "RayCluster")
SERVICE_MONITOR = ("monitoring.coreos.com/v1", "ServiceMonitor")  # a CRD: checked by test_metrics
METRICS_VALUES = CHART / "ci" / "metrics-values.yaml"
LABELS = ("name", "instance", "version", "component", "managed-by", "part-of")


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def pod_specs(obj: dict):
    """(where, pod spec) for every pod template in an object."""
    kind = obj["kind"]
    if kind in RAY_KINDS:
        spec = cluster_spec(obj)
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield group["groupName"], group["template"]["spec"]
        if kind == "RayJob" and "submitterPodTemplate" in obj["spec"]:
            yield "submitter", obj["spec"]["submitterPodTemplate"]["spec"]
    elif kind == "Deployment":
        yield "deployment", obj["spec"]["template"]["spec"]


def containers(obj: dict):
    for where, pod in pod_specs(obj):
        for c in pod["containers"]:
            yield f"{obj['kind']}/{where}/{c['name']}", c, pod
    if obj["kind"] in RAY_KINDS and cluster_spec(obj).get("enableInTreeAutoscaling"):
        head = cluster_spec(obj)["headGroupSpec"]["template"]["spec"]
        yield f"{obj['kind']}/autoscaler", cluster_spec(obj)["autoscalerOptions"], head


def one(objs, kind: str) -> dict:
    (found,) = [o for o in objs if o["kind"] == kind]
    return found


def train_config(objs) -> dict:
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and "config.yaml" in o["data"])
    return yaml.safe_load(cm["data"]["config.yaml"])


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_helm_lint(helm, values):
    out = run_helm(helm, "lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_core_objects_match_kubernetes_schemas(render, values):
    for obj in render(values):
        if obj["kind"] in RAY_KINDS or (obj["apiVersion"], obj["kind"]) == SERVICE_MONITOR:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {err.message} at {list(err.path)}")


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_ray_objects_match_kuberay_crds(render, values):
    ray = [o for o in render(values) if o["kind"] in RAY_KINDS]
    assert len(ray) == 1, "exactly one RayJob or RayCluster per release"
    for obj in ray:
        errors = sorted(jsonschema.Draft7Validator(crd_schema(obj["kind"])).iter_errors(obj), key=str)
        assert not errors, "\n".join(f"{obj['kind']}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_strict_crd_schema_catches_a_typo(render):
    """additionalProperties: false is what makes the CRD check worth having: the CRD alone lets a
    misspelt field through, and so would the API server (it prunes unknown fields)."""
    rayjob = json.loads(json.dumps(one(render(None), "RayJob")))
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert jsonschema.Draft7Validator(crd_schema("RayJob", False)).is_valid(rayjob)
    errors = list(jsonschema.Draft7Validator(crd_schema("RayJob")).iter_errors(rayjob))
    assert any("minReplica" in e.message for e in errors)


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_config_is_a_valid_keel_config(render, values):
    """The rendered run config passes `keel config validate`; so does the reward server's config."""
    from keel.config import parse_config

    objs = render(values)
    cfg = parse_config(train_config(objs), "ConfigMap config.yaml")
    if any(o["kind"] for o in objs if o["kind"] == "Deployment"):
        from keel.reward.server import RewardServerConfig

        cm = next(o for o in objs if o["kind"] == "ConfigMap" and "reward-server.yaml" in o["data"])
        server = RewardServerConfig.model_validate(yaml.safe_load(cm["data"]["reward-server.yaml"]))
        assert server.grpc.host == "0.0.0.0"
    assert cfg is not None


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_roles_land_on_their_worker_groups(render, values):
    """Each custom resource a role asks for (config <role>.resources.custom) is offered by a worker
    group's `ray start --resources`, in enough quantity for one replica of the role."""
    objs = render(values)
    ray = next(o for o in objs if o["kind"] in RAY_KINDS)
    offered: dict[str, float] = {}
    for group in cluster_spec(ray)["workerGroupSpecs"]:
        quoted = group["rayStartParams"]["resources"]
        assert quoted.startswith('"') and quoted.endswith('"'), "KubeRay wants the JSON inside quotes"
        for name, amount in json.loads(json.loads(quoted)).items():
            offered[name] = max(offered.get(name, 0), amount)
    cfg = train_config(objs)
    external_reward = cfg.get("transport", {}).get("grpc", {}).get("reward_address")
    for role in ("rollout", "reward", "reference", "learner"):
        if role == "reward" and external_reward:
            continue
        for name, amount in cfg.get(role, {}).get("resources", {}).get("custom", {}).items():
            assert offered.get(name, 0) >= amount, f"config {role} asks for {name}={amount}; groups offer {offered}"


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_secure_by_default(render, values):
    objs = render(values)
    for obj in objs:
        for where, pod in pod_specs(obj):
            assert pod.get("automountServiceAccountToken") is False, where
            psc = pod["securityContext"]
            assert psc["runAsNonRoot"] and psc["runAsUser"] > 0 and psc["seccompProfile"]["type"] == "RuntimeDefault"
        for where, c, _pod in containers(obj):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["runAsNonRoot"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert c["resources"]["requests"] and c["resources"]["limits"], where
            assert c["resources"]["requests"] == c["resources"]["limits"], where
            for env in c.get("env", []):
                assert "valueFrom" not in env, f"{where}: {env['name']} from an env var, not a file"
            if sc["readOnlyRootFilesystem"] and where.endswith(("ray-head", "ray-worker", "reward-server")):
                mounts = {m["mountPath"] for m in c["volumeMounts"]}
                assert {"/tmp"} <= mounts, where
    for sa in (o for o in objs if o["kind"] == "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    for role in (o for o in objs if o["kind"] in ("Role", "ClusterRole")):
        assert role["kind"] == "Role", "no cluster-wide rights"
        for rule in role["rules"]:
            assert not {"create", "delete", "*"} & set(rule["verbs"]), rule
    assert any(o["kind"] == "NetworkPolicy" for o in objs)


def test_token_is_a_file_named_in_the_config(render):
    objs = render(None)
    cfg = train_config(objs)
    assert cfg["transport"]["grpc"]["token_file"] == "/var/run/secrets/keel/token"
    ray = one(objs, "RayJob")
    for where, pod in pod_specs(ray):
        if where == "submitter":
            continue
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["grpc-token"]["secret"]["secretName"] == "ppo-keel-grpc-token", where
        (c,) = pod["containers"]
        assert {"name": "grpc-token", "mountPath": "/var/run/secrets/keel", "readOnly": True} in c["volumeMounts"]
    secret = one(objs, "Secret")
    assert "token" in secret["data"] and "stringData" not in secret


def test_existing_secret_and_claim_are_used_not_created(render):
    objs = render(CHART / "ci" / "existing-secret-values.yaml")
    assert not [o for o in objs if o["kind"] == "Secret"]
    head = cluster_spec(one(objs, "RayJob"))["headGroupSpec"]["template"]["spec"]
    token = next(v for v in head["volumes"] if v["name"] == "grpc-token")
    assert token["secret"] == {
        "secretName": "keel-grpc-token",
        "defaultMode": 0o440,
        "items": [{"key": "bearer", "path": "bearer"}],
    }
    assert train_config(objs)["transport"]["grpc"]["token_file"] == "/var/run/secrets/keel/bearer"
    assert one(objs, "RayJob")["spec"]["submissionMode"] == "HTTPMode"
    assert "submitterPodTemplate" not in one(objs, "RayJob")["spec"]

    objs = render(CHART / "ci" / "existing-claim-values.yaml")
    assert not [o for o in objs if o["kind"] in ("PersistentVolumeClaim", "Secret")]
    rayjob = one(objs, "RayJob")
    assert rayjob["spec"]["entrypoint"].endswith("--run-dir /shared/runs/ppo-7b")
    head = cluster_spec(rayjob)["headGroupSpec"]["template"]["spec"]
    assert {"name": "run", "persistentVolumeClaim": {"claimName": "shared-runs"}} in head["volumes"]


def test_default_rayjob(render):
    objs = render(None)
    rayjob = one(objs, "RayJob")
    spec = rayjob["spec"]
    assert spec["entrypoint"] == "keel train --config /etc/keel/config.yaml --run-dir /var/lib/keel/runs/ppo-keel"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 3600 and spec["backoffLimit"] == 3
    assert spec["submissionMode"] == "K8sJobMode"
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["KEEL_JOB_ID"] == spec["jobId"], "keel scale --job <jobId> finds the run's control actor"
    cluster = cluster_spec(rayjob)
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"learner", "rollout", "reward"}
    assert groups["rollout"]["minReplicas"] < groups["rollout"]["maxReplicas"]
    assert groups["learner"]["minReplicas"] == groups["learner"]["maxReplicas"]
    worker = groups["rollout"]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    shm = next(v for v in worker["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", "a reinstall resumes"
    assert not [o for o in objs if o["kind"] in ("Deployment", "RayCluster")]


def test_raycluster_mode(render):
    objs = render(CHART / "ci" / "raycluster-values.yaml")
    assert not [o for o in objs if o["kind"] == "RayJob"]
    cluster = one(objs, "RayCluster")["spec"]
    assert cluster["autoscalerOptions"]["version"] == "v2"
    rollout = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "rollout")
    assert (rollout["replicas"], rollout["minReplicas"], rollout["maxReplicas"]) == (0, 0, 8)
    assert rollout["template"]["spec"]["restartPolicy"] == "Never"


def test_cpu_values_ask_for_no_gpu(render):
    objs = render(CHART / "ci" / "cpu-values.yaml")
    assert "autoscalerOptions" not in cluster_spec(one(objs, "RayJob"))
    assert not [o for o in objs if o["kind"] == "Role"], "no API rights without the autoscaler"
    for where, c, _ in containers(one(objs, "RayJob")):
        assert "nvidia.com/gpu" not in c["resources"]["limits"], where


def test_labels(render):
    for values in VALUES:
        for obj in render(values):
            labels = obj["metadata"]["labels"]
            missing = [k for k in LABELS if f"app.kubernetes.io/{k}" not in labels]
            assert not missing, f"{obj['kind']}/{obj['metadata']['name']}: {missing}"
            for tmpl in _templates(obj):
                assert all(f"app.kubernetes.io/{k}" in tmpl["metadata"]["labels"] for k in LABELS), obj["kind"]


def _templates(obj):
    if obj["kind"] in RAY_KINDS:
        spec = cluster_spec(obj)
        yield spec["headGroupSpec"]["template"]
        yield from (g["template"] for g in spec["workerGroupSpecs"])
    elif obj["kind"] == "Deployment":
        yield obj["spec"]["template"]


def test_reward_server(render):
    objs = render(CHART / "ci" / "reward-server-only-values.yaml")
    dep = one(objs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["keel", "serve", "reward", "--config", "/etc/keel/reward-server.yaml"]
    assert c["readinessProbe"]["grpc"] == {"port": 50051} and c["livenessProbe"]["grpc"] == {"port": 50051}
    assert dep["spec"]["replicas"] == 3
    assert not [o for o in objs if o["kind"] in ("HorizontalPodAutoscaler", "PodDisruptionBudget")]
    svc = one(objs, "Service")
    assert svc["spec"]["ports"][0]["appProtocol"] == "grpc"

    objs = render(CHART / "ci" / "reward-server-values.yaml")
    dep = one(objs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "exec" in c["readinessProbe"], "kubelet's grpc probe cannot speak TLS"
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert one(objs, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 4
    assert one(objs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and "reward-server.yaml" in o["data"])
    grpc = yaml.safe_load(cm["data"]["reward-server.yaml"])["grpc"]
    assert grpc["tls_cert"] == "/var/run/secrets/keel-tls/tls.crt"
    assert grpc["token_file"] == "/var/run/secrets/keel/token"
    groups = [g["groupName"] for g in cluster_spec(one(objs, "RayJob"))["workerGroupSpecs"]]
    assert "reward" not in groups


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels, matchExpressions; {} = everything) matches `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def admitted(objs, pod_labels: dict, port: int) -> list[dict]:
    """The `from` peers of every NetworkPolicy rule that lets traffic into pods with `pod_labels` on
    `port` (a rule without ports covers them all; a rule without from admits everyone: None),
    in a stable order."""
    peers = []
    for pol in (o for o in objs if o["kind"] == "NetworkPolicy"):
        if not selects(pol["spec"]["podSelector"], pod_labels):
            continue
        for rule in pol["spec"].get("ingress", []):
            if "ports" not in rule or any(p["port"] == port for p in rule["ports"]):
                peers += rule.get("from", [None])
    return sorted(peers, key=json.dumps)


def test_metrics_off_by_default(render):
    objs = render(None)
    assert "metrics_port" not in train_config(objs).get("logging", {})
    head = cluster_spec(one(objs, "RayJob"))["headGroupSpec"]["template"]["spec"]
    assert [p["name"] for p in head["containers"][0]["ports"]] == ["gcs-server", "dashboard", "client"]
    assert not [o for o in objs if o["kind"] == "ServiceMonitor" or o["metadata"]["name"].endswith("-metrics")]


@pytest.mark.parametrize("mode", ["job", "cluster"])
def test_metrics(helm, mode):
    """metrics-values.yaml: the controller serves /metrics on 0.0.0.0:9500 in the head pod, the
    reward server on 9500 beside its gRPC port; a Service each (port `metrics`) selects those pods,
    the ServiceMonitor selects both Services, and only metrics.allowFrom is admitted to the port."""
    out = template(helm, METRICS_VALUES, sets=(f"mode={mode}",))
    assert out.returncode == 0, out.stderr
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    port = 9500

    logging = train_config(objs)["logging"]
    assert (logging["metrics_port"], logging["metrics_host"]) == (port, "0.0.0.0")
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and "reward-server.yaml" in o["data"])
    assert yaml.safe_load(cm["data"]["reward-server.yaml"])["metrics_port"] == port

    # the pods serving /metrics, by the labels of their templates
    ray = one(objs, "RayJob" if mode == "job" else "RayCluster")
    head = cluster_spec(ray)["headGroupSpec"]["template"]
    reward = one(objs, "Deployment")["spec"]["template"]
    workers = [g["template"]["metadata"]["labels"] for g in cluster_spec(ray)["workerGroupSpecs"]]
    # KubeRay names Ray's own exporter port (8080) `metrics`, and adds it unless a port has the name
    assert "metrics" not in [p["name"] for p in head["spec"]["containers"][0]["ports"]]

    # each metrics Service selects its pod (and no worker) and targets a named port at metrics.port
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    expected = {"ppo-keel-metrics": head, "ppo-keel-reward-metrics": reward}
    for name, tmpl in expected.items():
        svc = services[name]["spec"]
        assert svc["type"] == "ClusterIP", name
        assert selects({"matchLabels": svc["selector"]}, tmpl["metadata"]["labels"]), name
        assert not any(selects({"matchLabels": svc["selector"]}, w) for w in workers), name
        (svc_port,) = svc["ports"]
        assert (svc_port["name"], svc_port["port"]) == ("metrics", port), name
        (c,) = tmpl["spec"]["containers"]
        target = next(p for p in c["ports"] if p["name"] == svc_port["targetPort"])
        assert (target["containerPort"], target["protocol"]) == (port, "TCP"), name
    assert [p["name"] for p in services["ppo-keel-reward"]["spec"]["ports"]] == ["grpc"]

    (monitor,) = [o for o in objs if (o["apiVersion"], o["kind"]) == SERVICE_MONITOR]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack", "metrics.serviceMonitor.labels"
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    picked = {n for n, s in services.items() if selects(monitor["spec"]["selector"], s["metadata"]["labels"])}
    assert picked == set(expected)
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}
    ]
    for name in expected:  # the endpoint's port is a port name of each Service
        assert monitor["spec"]["endpoints"][0]["port"] in [p["name"] for p in services[name]["spec"]["ports"]], name

    allow_from = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    release = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "keel", "app.kubernetes.io/instance": "ppo"}}}
    assert admitted(objs, head["metadata"]["labels"], port) == sorted([release, allow_from], key=json.dumps)
    assert admitted(objs, reward["metadata"]["labels"], port) == [allow_from]
    for labels in workers:
        assert allow_from not in admitted(objs, labels, port), "only the head serves /metrics"

    # allowFrom both {}: no scraper is admitted (port-forward still reaches the port)
    out = template(
        helm, METRICS_VALUES, sets=("metrics.allowFrom.namespaceLabels=null", "metrics.allowFrom.podLabels=null")
    )
    assert out.returncode == 0, out.stderr
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert admitted(objs, head["metadata"]["labels"], port) == [release]
    assert admitted(objs, reward["metadata"]["labels"], port) == []


def test_metrics_host_may_be_ipv6_any(helm):
    out = template(helm, sets=("metrics.enabled=true", "config.logging.metrics_host=::"))
    assert out.returncode == 0, out.stderr
    cm = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "ConfigMap")
    assert yaml.safe_load(cm["data"]["config.yaml"])["logging"] == {"metrics_host": "::", "metrics_port": 9400}


BAD_VALUES = [
    (("workerGroups.rollout.replicas=two",), "/workerGroups/rollout/replicas", "want integer"),
    (("workerGroups.rollout.replica=2",), "/workerGroups/rollout", "'replica' not allowed"),
    (("head.resources.cpuu=1",), "/head/resources", "'cpuu' not allowed"),
    (("mode=batch",), "/mode", "must be one of 'job', 'cluster'"),
    (
        ("workerGroups.rollout.maxReplicas=0",),
        "workerGroups.rollout.maxReplicas",
        "below workerGroups.rollout.minReplicas",
    ),
    (("workerGroups.rollout.replicas=9",), "workerGroups.rollout.replicas", "outside"),
    (
        (
            "rewardServer.enabled=true",
            "rewardServer.autoscaling.maxReplicas=1",
            "rewardServer.autoscaling.minReplicas=3",
        ),
        "rewardServer.autoscaling.maxReplicas",
        "below",
    ),
    (("workerGroups.reward.enabled=false",), "config.reward.resources.custom.reward", "no enabled worker group"),
    (("workerGroups.rollout.rayStartParams.resources=x",), "/workerGroups/rollout/rayStartParams/resources", ""),
    (("config=name: [unclosed",), "config: not valid YAML", ""),
    (("metrics.serviceMonitor.enabled=true",), "metrics.serviceMonitor.enabled", "metrics.enabled is false"),
    (("metrics.port=80",), "/metrics/port", "minimum"),
    (("metrics.serviceMonitor.interval=30 s",), "/metrics/serviceMonitor/interval", "does not match pattern"),
    (("metrics.enabled=true", "metrics.port=8265"), "metrics.port", "the Ray dashboard port"),
    (("metrics.enabled=true", "rewardServer.enabled=true", "metrics.port=50051"), "metrics.port", "rewardServer.port"),
    (
        ("metrics.enabled=true", "config.logging.metrics_port=9500"),
        "config.logging.metrics_port",
        "differs from metrics.port (9400)",
    ),
    (("metrics.enabled=true", "config.logging.metrics_host=127.0.0.1"), "config.logging.metrics_host", "not reachable"),
    (
        ("metrics.enabled=true", "rewardServer.enabled=true", "rewardServer.config.metrics_port=9100"),
        "rewardServer.config.metrics_port",
        "differs from metrics.port (9400)",
    ),
]


@pytest.mark.parametrize("sets,path,message", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_bad_values_fail_naming_the_value(helm, sets, path, message):
    out = template(helm, sets=sets)
    assert out.returncode != 0, f"{sets} rendered"
    assert path in out.stderr and message in out.stderr, out.stderr


def test_chart_readme_is_fresh():
    out = subprocess.run(
        [sys.executable, "scripts/gen_chart_readme.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
