"""docker/Dockerfile.cpu, built and run for real with no daemon: podman (runc, overlay or vfs) on a
local Debian bookworm base made by debootstrap (scripts/container_tools.sh sets both up, cached
under $KEEL_CONTAINER_CACHE or ~/.cache/keel/containers). The base image is the Dockerfile's
BASE_IMAGE build argument, so no registry is needed. pip in the build installs the dependency list
from a wheelhouse (KEEL_WHEELHOUSE, --no-index) that this machine's pip fills first, with its own
indexes, wheel directory and caches (about 15 s for 1.1 GB; kept per dependency list), so no sdist
is built and nothing is downloaded in the build. KEEL_IMAGE_TEST_INDEX=1 skips the wheelhouse: pip
in the build then reaches PyPI through this machine's CA bundle and the local indexes (mounted).

Inside the image, as its non-root user and with no network: `keel --version`, a tiny model,
`keel config validate`, and a 2-step `keel train` (vLLM rollout, DeepSpeed learner, Ray).
Both Dockerfiles must also pass hadolint.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KEEL_CONTAINER_CACHE") or Path.home() / ".cache" / "keel" / "containers")
IMAGE = "localhost/keel:cpu-test"
UID = "10001"  # the image's user (docker/Dockerfile.cpu)
# on the host's pip: the local wheel directory and indexes, and the CA bundle (a TLS-inspecting proxy)
LOCAL_WHEELS = "/opt/wheels"
LOCAL_INDEXES = ["/opt/pypi", "/opt/pypi-more"]
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
WHEELHOUSE = "/var/cache/keel-wheels"  # where the build sees the wheelhouse (KEEL_WHEELHOUSE)


def _root_prefix() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo", "-n"]


@pytest.fixture(scope="module")
def podman():
    """run(*args) -> CompletedProcess of `podman args` on the cached store; and the base image."""
    if shutil.which("apt-get") is None and shutil.which("podman") is None:
        pytest.fail("the image test needs podman, or apt-get to install it (scripts/container_tools.sh)")
    setup = subprocess.run(
        ["bash", str(ROOT / "scripts" / "container_tools.sh"), str(CACHE)], capture_output=True, text=True, timeout=900
    )
    assert setup.returncode == 0, setup.stderr[-3000:]
    base = setup.stdout.strip().splitlines()[-1]
    env = [f"CONTAINERS_CONF={CACHE / 'containers.conf'}", f"CONTAINERS_STORAGE_CONF={CACHE / 'storage.conf'}"]

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        cmd = [*_root_prefix(), "env", *env, "podman", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    return run, base


def _wheelhouse() -> Path | None:
    """The image's dependency list (as docker/Dockerfile.cpu reads it from pyproject.toml) and Keel's
    build requirements as wheels, made by this machine's pip (its config, indexes and caches; sdists
    such as DeepSpeed's built once, here), kept under CACHE per list. None where this interpreter
    is not the image's (CPython 3.11 on x86_64 Linux) or KEEL_IMAGE_TEST_INDEX is set."""
    if os.environ.get("KEEL_IMAGE_TEST_INDEX") or sys.version_info[:2] != (3, 11):
        return None
    if sys.platform != "linux" or platform.machine() != "x86_64" or sys.implementation.name != "cpython":
        return None
    import tomllib  # 3.11 from here on

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["cpu"] + pyproject["build-system"]["requires"]
    key = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:12]
    wheels = CACHE / f"wheelhouse-{key}"
    if (wheels / ".complete").exists():
        return wheels
    for old in CACHE.glob("wheelhouse-*"):  # other lists', and a fill that did not finish
        shutil.rmtree(old)
    wheels.mkdir(parents=True)
    (wheels / "requirements.txt").write_text("\n".join(reqs) + "\n")
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--progress-bar", "off", "--wheel-dir", str(wheels),
         "-r", str(wheels / "requirements.txt")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    (wheels / ".complete").touch()
    print(f"wheelhouse: {time.monotonic() - t0:.0f}s")
    return wheels


def _build_args(base: str) -> list[str]:
    args = ["--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"PIP_CERT={CA_BUNDLE}"]
    args += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    wheels = _wheelhouse()
    if wheels is not None:  # pip in the build installs from it alone (--no-index)
        return [*args, "--build-arg", f"KEEL_WHEELHOUSE={WHEELHOUSE}", "-v", f"{wheels}:{WHEELHOUSE}:ro"]
    if Path(LOCAL_WHEELS).is_dir():
        args += ["--build-arg", f"PIP_FIND_LINKS={LOCAL_WHEELS}", "-v", f"{LOCAL_WHEELS}:{LOCAL_WHEELS}:ro"]
    indexes = [d for d in LOCAL_INDEXES if Path(d, "simple").is_dir()]
    # the local indexes replace the default (download.pytorch.org, which this machine cannot reach)
    args += ["--build-arg", "PIP_EXTRA_INDEX_URL=" + " ".join(f"file://{d}/simple" for d in indexes)]
    for d in indexes:
        args += ["-v", f"{d}:{d}:ro"]
    return args


@pytest.fixture(scope="module")
def image(podman):
    run, base = podman
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    t0 = time.monotonic()
    # --format docker: OCI image configs have no SHELL; --network host: no CNI setup for the build
    out = run(
        "build", "--format", "docker", "--network", "host", "-f", "docker/Dockerfile.cpu", "-t", IMAGE,
        *_build_args(base), "--build-arg", f"KEEL_REVISION={revision or 'unknown'}", str(ROOT),
        timeout=1800,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    print(f"podman build: {time.monotonic() - t0:.0f}s")
    run("image", "prune", "--force")  # the images this tag replaced (in the cache's own store)
    return IMAGE


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        out = subprocess.run([hadolint, str(ROOT / "docker" / name)], capture_output=True, text=True)
        assert out.returncode == 0, f"{name}:\n{out.stdout}{out.stderr}"


@pytest.mark.slow
def test_cpu_image_trains_as_non_root_without_network(podman, image, tmp_path):
    run, _ = podman
    meta = json.loads(run("image", "inspect", image).stdout)[0]
    config = meta.get("Config") or meta["config"]
    assert config["User"] == f"{UID}:{UID}" and config["Entrypoint"] == ["keel"]
    assert config["Labels"]["org.opencontainers.image.title"] == "keel-cpu"

    # a 2-step PPO run of the demo config on a tiny model made in the container
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)  # written by the image's user
    cfg = yaml.safe_load((ROOT / "deploy" / "configs" / "demo.yaml").read_text())
    cfg["model"]["policy"], cfg["data"]["prompts"] = "/work/tiny", "/work/prompts.jsonl"
    cfg["controller"].update(steps=2, prompts_per_step=16)
    cfg["algorithm"]["mini_batch_size"] = 16
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    script = " && ".join(
        [
            "keel --version",
            "id -u",
            "keel make-tiny-model /work/tiny",
            "keel make-task-data arithmetic /work/prompts.jsonl",
            "keel config validate /work/config.yaml",
            "keel train --config /work/config.yaml --run-dir /work/run",
        ]
    )
    t0 = time.monotonic()
    out = run(
        "run", "--rm", "--network", "none", "--shm-size", "1g", "-v", f"{work}:/work",
        "--entrypoint", "/bin/bash", image, "-c", script,
        timeout=900,
    )  # fmt: skip
    print(f"podman run: {time.monotonic() - t0:.0f}s")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "keel 0.1.0" and lines[1] == UID, log[-3000:]
    metrics = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1], log[-3000:]
    assert (work / "run" / "checkpoints" / "final" / "model.safetensors").exists()
