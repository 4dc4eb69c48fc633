"""TRL's side of the peer comparison (issue 14): its own virtual environment, and one run in it.

    ensure_trl_env(root) -> python      # <root>/.cache/peer-trl/venv, made once, reused while it works
    run_trl(python, workload, ...)      # runs trl_side.py there and returns its RESULT.json

TRL gets an environment of its own so that nothing it pulls in touches Keel's: trl and torch are
pinned, transformers is pinned to the version Keel's environment holds (read here, in the calling
process), so both sides run the same model code. The venv's own pip installs with the machine's
default pip configuration, which finds the CPU build of torch on local disk.

PyPI's torchvision, torchaudio and torchcodec, dragged in by the install, are built against other
torch releases; an import of a broken torchvision makes `import transformers` fail ("operator
torchvision::nms does not exist"), so whichever of them does not import is uninstalled.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from peer_workload import Workload

TRL = "trl==1.16.0"
TORCH = "torch==2.13.0"
EXTRAS = ("accelerate", "datasets")
TORCH_ADDONS = ("torchvision", "torchaudio", "torchcodec")  # uninstalled when they don't import
SIDE = Path(__file__).resolve().parent / "trl_side.py"


def _requirements() -> list[str]:
    return [TRL, TORCH, f"transformers=={importlib.metadata.version('transformers')}", *EXTRAS]


def _run(cmd: list[str | Path], what: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out


def _imports(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def ensure_trl_env(root: Path) -> Path:
    """The python of TRL's venv under `root`/.cache/peer-trl, made on first use (a few minutes)."""
    venv = root / ".cache" / "peer-trl" / "venv"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = " ".join(_requirements())
    if python.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        if _imports(python, "trl, transformers, torch"):
            print(f"trl env: reusing {venv}")
            return python
        print(f"trl env: {venv} no longer imports trl; making it again")
    t0 = time.perf_counter()
    print(f"trl env: making {venv}")
    _run([sys.executable, "-m", "venv", "--clear", venv], "python -m venv")
    print(f"trl env: pip install {wanted}")
    _run([python, "-m", "pip", "install", "--progress-bar", "off", *_requirements()], "pip install")
    _drop_broken_addons(python)
    _run([python, "-c", "import trl, transformers, torch"], f"import trl, transformers, torch in {venv}")
    stamp.write_text(wanted)
    print(f"trl env: ready in {time.perf_counter() - t0:.0f} s")
    return python


def _drop_broken_addons(python: Path) -> None:
    """Uninstall whichever of torchvision, torchaudio, torchcodec is installed but does not import."""
    broken = [name for name in TORCH_ADDONS if _installed(python, name) and not _imports(python, name)]
    if broken:
        print(f"trl env: uninstalling {', '.join(broken)} (they don't import with {TORCH})")
        _run([python, "-m", "pip", "uninstall", "--yes", *broken], "pip uninstall")


def _installed(python: Path, dist: str) -> bool:
    return subprocess.run([str(python), "-m", "pip", "show", "--quiet", dist], capture_output=True).returncode == 0


def run_trl(
    python: Path, workload: Workload, model_dir: Path, prompts: Path, precision: str, threads: int, out_dir: Path
) -> dict:
    """One TRL GRPOTrainer run of `workload` (trl_side.py in TRL's venv); returns its RESULT.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = out_dir / f"trl-{precision}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        str(python), str(SIDE), "--workload", workload.to_json(), "--model", str(model_dir),
        "--prompts", str(prompts), "--precision", precision, "--threads", str(threads), "--out", str(result),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"trl_side.py ({precision}) failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(result.read_text())
