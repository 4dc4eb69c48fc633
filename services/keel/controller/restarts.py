"""Restarts of a whole run (`controller.max_restarts`).

Some losses a step cannot recover from in place: a learner rank (a DeepSpeed process group takes
no new member), or a role that keeps failing past the supervisor's attempts. They raise
`RoleFailed`. `RunRestarts` then stops every role, starts them all again and continues from the
run's latest checkpoint (from scratch when there is none yet), at most `controller.max_restarts`
times; the next failure past that is raised. metrics.jsonl continues from the checkpoint's step
(lines after it are cut: no step appears twice), and `run/restarts` counts the restarts.

Everything else is raised at once: a bad config or data, a reward server outage past its budget
(the run has stopped with a checkpoint: `RoleOutage`), a bug.
"""

from __future__ import annotations

from pathlib import Path

from keel.config import RunConfig
from keel.controller.checkpoint import CheckpointStore
from keel.controller.errors import ErrorTally
from keel.controller.supervisor import RoleError, RoleFailed
from keel.telemetry.console import NO_PROGRESS


class RunRestarts:
    """Runs a `Controller` to the end, starting it again after a `RoleFailed` (see the module)."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        log=print,
        resume_from: Path | None = None,
        make=None,
        progress=NO_PROGRESS,
    ):
        from keel.controller.loop import Controller

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.log = log
        self.progress = progress  # handed to each controller (keel.telemetry.console)
        self.resume_from = resume_from
        self.make = make or Controller  # (cfg, run_dir, log, resume_from, run_restarts, progress, errors) -> Controller
        self.restarts = 0
        self.errors = ErrorTally()  # by role and kind, over every start (keel.controller.errors)
        self.controller = None  # the one running now
        self.stop_requested = False

    def request_stop(self) -> None:
        """Stop at the next step boundary with a checkpoint (a signal handler calls it)."""
        self.stop_requested = True
        if self.controller is not None:
            self.controller.request_stop()

    def run(self, on_step=None, on_start=None):
        """Start and run the controller until its steps are done or a stop is requested; returns the
        last controller (shut down). `on_start(controller)` is called once it is up."""
        resume = self.resume_from
        while True:
            ctrl = self.make(
                self.cfg,
                self.run_dir,
                log=self.log,
                resume_from=resume,
                run_restarts=self.restarts,
                progress=self.progress,
                errors=self.errors,
            )
            self.controller = ctrl
            if self.stop_requested:
                ctrl.request_stop()
            try:
                ctrl.start()
                if on_start is not None:
                    on_start(ctrl)
                ctrl.run(on_step=on_step)
                return ctrl
            except RoleError as err:
                self.errors.add(err.role, err.kind)
                if not isinstance(err, RoleFailed) or self.restarts >= self.cfg.controller.max_restarts:
                    raise
                if self.stop_requested:
                    raise
                resume = CheckpointStore(self.run_dir / "checkpoints", 1).latest()
                self.restarts += 1
                where = f"its latest checkpoint ({resume})" if resume is not None else "the start (no checkpoint yet)"
                self.log(
                    f"{err}: stopping every role and starting again from {where}, "
                    f"restart {self.restarts} of controller.max_restarts {self.cfg.controller.max_restarts}"
                )
            finally:
                ctrl.shutdown()  # its metric sinks too
