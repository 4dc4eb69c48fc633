"""DeepSpeed's JIT-built C++ ops, loaded so that a build killed half-way cannot hang a later run.

DeepSpeed builds some ops the first time a process needs them, with `torch.utils.cpp_extension.load`
into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions/py311_cpu/<op>/): on the CPU
accelerator `deepspeed_shm_comm`, when its comm backend starts (`deepspeed.init_distributed`, in
every process); `cpu_adam` or `fused_adam` when the optimizer is not torch's AdamW
(`deepspeed.initialize`). Every load, even of an op built long ago, first creates `<op>/lock` with
O_EXCL (torch.utils.file_baton.FileBaton) and, while that file exists, polls for it to go away:
silently and forever. A process killed during a load leaves the file behind, and every later
`keel sft`, `keel demo` or test run hangs.

`load_ops` loads the ops a run needs before DeepSpeed asks for them, each under `build_guard`:

1. An flock on `<op>/keel.lock` makes Keel processes take turns. The kernel drops an flock when its
   holder dies, so this lock cannot go stale; the wait for it is bounded.
2. Holding it, a `lock` file that is there belongs to a process outside Keel, or to a dead one.
   FileBaton keeps the file open from its O_EXCL create until just before it removes it, so the
   lock is live exactly while some process has it open, and /proc/<pid>/fd shows which. Only
   processes of the file's owner can be its creator, so only theirs are looked at. Nobody holding
   it in two looks a moment apart (the second lets FileBaton's close-then-remove pass) means the
   build died: the file is removed, with a warning. A process holding it is waited for, up to
   `timeout_s`, then OpBuildError names the lock and the process.
3. Still under the flock, the op is loaded (built when needed). DeepSpeed keeps loaded ops by
   name, so its own load later returns this one without touching the lock.

When some of the owner's processes cannot be looked at (the lock is another user's and we are not
root), a lock none of the others holds is taken as dead only once it is older than `timeout_s`,
longer than a build takes. Assumed: no process in another PID namespace (a second container
sharing this extensions directory) builds there at the same moment; /proc does not show it, so its
live lock would look dead.
"""

from __future__ import annotations

import fcntl
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

BUILD_WAIT_S = 900.0  # the longest a build may take: Keel's ops take under a minute on 2 cores
POLL_S = 0.5
COMM_OP = "ShareMemCommBuilder"  # built when DeepSpeed's comm backend starts, on the CPU accelerator

LockState = Literal["gone", "live", "stale", "unknown"]


class OpBuildError(RuntimeError):
    """A DeepSpeed op could not be loaded within the wait; the message names the lock and its holder."""


def optimizer_op(ds_config: dict) -> str | None:
    """The op builder DeepSpeed's Adam needs under `ds_config` (as `deepspeed_config` makes it), None
    for torch's AdamW: the choice DeepSpeedEngine.get_optimizer_configuration makes."""
    if ds_config["optimizer"]["params"].get("torch_adam", False):
        return None
    return "CPUAdamBuilder" if "offload_optimizer" in ds_config["zero_optimization"] else "FusedAdamBuilder"


def load_ops(builders: Iterable[str | None], timeout_s: float = BUILD_WAIT_S) -> None:
    """Load (building when needed) the op of each named DeepSpeed op builder, under `build_guard`.
    Skipped: None, and builders this accelerator lacks or cannot build (DeepSpeed skips those too)."""
    for name in builders:
        builder = _builder(name) if name else None
        if builder is not None:
            with build_guard(build_dir(builder.name), builder.name, timeout_s):
                builder.load()


def build_dir(op: str) -> Path:
    """Where torch builds the extension `op` (TORCH_EXTENSIONS_DIR honoured)."""
    from torch.utils.cpp_extension import _get_build_directory  # what cpp_extension.load itself calls

    return Path(_get_build_directory(op, verbose=False))


@contextmanager
def build_guard(directory: Path, op: str, timeout_s: float = BUILD_WAIT_S) -> Iterator[None]:
    """For the block: hold `directory`/keel.lock, with torch's `directory`/lock cleared or waited out."""
    deadline = time.monotonic() + timeout_s
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "keel.lock", "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OpBuildError(
                        f"DeepSpeed op {op}: another Keel process has been loading it for over {timeout_s:.0f}s "
                        f"(it holds {directory / 'keel.lock'})"
                    ) from None
                time.sleep(POLL_S)
        try:
            clear_lock(directory / "lock", op, deadline, timeout_s)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clear_lock(lock: Path, op: str, deadline: float, build_s: float = BUILD_WAIT_S) -> None:
    """Return once torch's build lock is gone: removed with a warning when stale (see `lock_state`),
    waited for otherwise; OpBuildError once time.monotonic() passes `deadline`."""
    waited = False
    while (state := lock_state(lock, build_s)) != "gone":
        if state == "stale":
            lock.unlink(missing_ok=True)
            warnings.warn(
                f"removed a stale DeepSpeed build lock {lock}: no process holds it (a load of {op} was killed)",
                RuntimeWarning,
                stacklevel=1,
            )
            return
        holders = _holders_text(lock)
        if time.monotonic() > deadline:
            raise OpBuildError(
                f"DeepSpeed op {op}: {lock} is still held by {holders}; if no build of {op} is running, delete it"
            )
        if not waited:
            note = f"waiting for {holders} to finish loading DeepSpeed op {op} ({lock})"
            warnings.warn(note, RuntimeWarning, stacklevel=1)
            waited = True
        time.sleep(POLL_S)


def lock_state(lock: Path, build_s: float = BUILD_WAIT_S, recheck_s: float = 0.2) -> LockState:
    """torch's build lock is gone, live (a process has it open), stale or unknown. Stale: no process
    has it open in two looks `recheck_s` apart at the same file, or, where some of the owner's
    processes cannot be looked at, none of the others has, and the file is older than `build_s`;
    unknown: that, but younger."""
    first = _stat(lock)
    if first is None:
        return "gone"
    pids, complete = lock_holders(lock)
    if pids:
        return "live"
    if not complete:
        return "stale" if time.time() - first.st_mtime > build_s else "unknown"
    time.sleep(recheck_s)  # FileBaton.release closes the file, then removes it: let that instant pass
    again = _stat(lock)
    if again is None:
        return "gone"
    if again.st_ino != first.st_ino:  # another build has taken the lock meanwhile
        return "live"
    pids, complete = lock_holders(lock)
    return "live" if pids else "stale" if complete else "unknown"


def lock_holders(path: Path, proc: Path = Path("/proc")) -> tuple[set[int], bool]:
    """(ids of the processes that have `path` open, whether every process that can have opened it
    could be looked at). Only the file's owner's processes can: its creator holds it."""
    target, st = os.path.realpath(path), _stat(path)
    if st is None:
        return set(), True
    if not proc.is_dir():  # no /proc: nothing can be looked at
        return set(), False
    pids, complete = set(), True
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != st.st_uid:
                continue
            fds = os.listdir(f"{entry.path}/fd")
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            continue
        except PermissionError:  # not dumpable, or another user's while we are not root
            complete = False
            continue
        for fd in fds:
            try:
                if os.readlink(f"{entry.path}/fd/{fd}") == target:
                    pids.add(int(entry.name))
            except OSError:  # closed meanwhile
                pass
    return pids, complete


def _holders_text(lock: Path) -> str:
    pids, _ = lock_holders(lock)
    return f"process {', '.join(map(str, sorted(pids)))}" if pids else "a process that cannot be looked at"


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _builder(name: str):
    """The named op builder when DeepSpeed would load its op here, else None: the accelerator has no
    such builder, or it cannot build it (DeepSpeed then skips the op, or fails before any lock)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder
