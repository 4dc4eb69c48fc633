"""DeepSpeed op loads: a build lock that no process holds is removed, a live one is waited for within a
bound, and `keel sft` finishes although a killed build left its lock behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from keel.learner import ds_ops
from keel.learner.ds_ops import OpBuildError, build_guard, clear_lock, lock_state
from unit.learner.offline_helpers import sft_data

# Takes torch's build lock as FileBaton.try_acquire does (O_CREAT | O_EXCL, the fd kept open), says so,
# and sleeps: a build in progress, until the test kills it as a crash would.
HOLD_BATON = (
    "import os, sys, time; os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); time.sleep(120)"
)
HOLD_FLOCK = (
    "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
    "print('held', flush=True); time.sleep(120)"
)


def _holder(code: str, path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "held\n"
    return child


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_a_lock_is_live_while_a_process_holds_it_and_stale_once_that_process_died(tmp_path):
    lock = tmp_path / "lock"
    assert lock_state(lock) == "gone"
    child = _holder(HOLD_BATON, lock)
    try:
        assert lock_state(lock) == "live"
        assert ds_ops.lock_holders(lock) == ({child.pid}, True)
    finally:
        _kill(child)
    assert lock.exists() and lock_state(lock) == "stale"  # killed mid-build: the file stays, nobody holds it
    fd = os.open(lock, os.O_RDONLY)  # this process holds it now
    try:
        assert lock_state(lock) == "live"
    finally:
        os.close(fd)


def test_where_some_processes_cannot_be_looked_at_only_an_old_lock_is_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(ds_ops, "lock_holders", lambda path: (set(), False))  # e.g. a non-dumpable process
    lock = tmp_path / "lock"
    lock.touch()
    assert lock_state(lock, build_s=60) == "unknown"
    os.utime(lock, (time.time() - 61, time.time() - 61))  # older than any build takes
    assert lock_state(lock, build_s=60) == "stale"


def test_a_stale_lock_is_removed_with_a_warning_and_a_live_one_waited_for_within_the_bound(tmp_path):
    lock = tmp_path / "lock"
    child = _holder(HOLD_BATON, lock)
    try:
        start = time.monotonic()
        with (
            pytest.raises(OpBuildError, match=rf"{re.escape(str(lock))} is still held by process {child.pid}"),
            pytest.warns(RuntimeWarning, match=f"waiting for process {child.pid} to finish loading"),
        ):
            clear_lock(lock, "deepspeed_shm_comm", deadline=time.monotonic() + 1.0)
        assert time.monotonic() - start < 5 and lock.exists()  # a live lock is never removed
    finally:
        _kill(child)
    with pytest.warns(RuntimeWarning, match=f"removed a stale DeepSpeed build lock {re.escape(str(lock))}"):
        clear_lock(lock, "deepspeed_shm_comm", deadline=time.monotonic() + 1.0)
    assert not lock.exists()


def test_keel_processes_take_turns_and_the_wait_for_the_other_is_bounded(tmp_path):
    child = _holder(HOLD_FLOCK, tmp_path / "keel.lock")  # another Keel process inside its guard
    try:
        with pytest.raises(OpBuildError, match="another Keel process has been loading it"):
            with build_guard(tmp_path, "deepspeed_shm_comm", timeout_s=1.0):
                pytest.fail("entered the guard while another process held it")
    finally:
        _kill(child)
    with build_guard(tmp_path, "deepspeed_shm_comm", timeout_s=1.0):  # the kernel dropped the dead one's flock
        pass


def test_the_optimizer_op_follows_the_deepspeed_config():
    from keel.config import OptimizerConfig, TrainerConfig
    from keel.learner.learner import deepspeed_config

    def op(**ds) -> str | None:
        trainer = TrainerConfig.model_validate({"micro_batch_size": 2, "deepspeed": ds})
        return ds_ops.optimizer_op(deepspeed_config(trainer, OptimizerConfig(), "float32", 1, 4))

    assert op() is None  # torch's AdamW: nothing to build
    assert op(zero_stage=2, offload_optimizer=True) == "CPUAdamBuilder"


@pytest.mark.slow
def test_keel_sft_finishes_though_a_killed_build_left_its_lock(tiny_model_dir, tmp_path):
    """A real `keel sft` whose DeepSpeed comm op build directory holds a dead build's lock file:
    torch alone waits on it forever. Runs on a copy of the build directory: the cache other
    processes use is only read."""
    cached = ds_ops.build_dir("deepspeed_shm_comm")  # the user's cache: a build there saves one here
    extensions = tmp_path / "torch_extensions"
    with build_guard(cached, "deepspeed_shm_comm"):  # not while another process builds there
        shutil.copytree(cached, extensions / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("*lock"))
    lock = extensions / "deepspeed_shm_comm" / "lock"
    _kill(_holder(HOLD_BATON, lock))  # a build killed while it held the lock
    config = tmp_path / "sft.yaml"
    data = {"path": str(sft_data(tmp_path, rows=32)), "max_tokens": 16}
    train = {"epochs": 1, "batch_size": 16}
    config.write_text(yaml.safe_dump({"model": {"path": str(tiny_model_dir)}, "data": data, "train": train}))
    keel = shutil.which("keel", path=os.path.dirname(sys.executable)) or "keel"
    out = subprocess.run(
        [keel, "sft", "--config", str(config), "--out", str(tmp_path / "out")],
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)},
        capture_output=True,
        text=True,
        timeout=300,  # without the guard: a silent hang until here
    )
    assert out.returncode == 0, out.stderr
    assert f"removed a stale DeepSpeed build lock {lock}" in out.stderr
    assert not lock.exists() and (tmp_path / "out" / "model.safetensors").exists()
