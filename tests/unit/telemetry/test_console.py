"""The console of a command (logging.console): plain lines when stdout is not a terminal, a live rich
display (progress bars and a table of the last steps) on one, nothing per step with none."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console as RichConsole

from keel.cli import _metric_line, _metric_values, _step_line, _step_values
from keel.telemetry.console import NO_PROGRESS, Console

STEPS = 20
METRICS = [
    {
        "step": s,
        "reward_mean": 0.1 * s + 0.012,
        "kl": 0.0004 * s,
        "response_length": 3.0 + s,
        "rollout/logprob_gap_mean": 1e-6,
        "samples_per_s": 64.0,
        "step_time": 1.5,
    }
    for s in range(3)
]


def _session(console: Console) -> None:
    """What keel train shows of a run's first three steps (every other step has a plain line)."""
    console.log("ready: 1 rollout worker(s) [hf], 1 learner rank(s)")
    with console.task("tokenize prompts"):
        pass
    with console.task("train", STEPS) as bar:
        for m in METRICS:
            bar.update(m["step"] + 1)
            console.step(_step_values(m, STEPS), _step_line(m, STEPS) if m["step"] % 2 == 0 else None)


class _Pipe(io.StringIO):
    def isatty(self) -> bool:  # a CI log, a file, a pipe
        return False


def _plain_lines(out: str) -> list[str]:
    return [re.sub(r"done in \d+\.\ds", "done in Ns", line) for line in out.splitlines()]


PLAIN = [
    "ready: 1 rollout worker(s) [hf], 1 learner rank(s)",
    "tokenize prompts ...",
    "tokenize prompts: done in Ns",
    "train: 0/20 ...",
    "step    1/20  reward +0.012  kl 0.0000  len 3.0  gap 1.0e-06  1.5s",
    "step    3/20  reward +0.212  kl 0.0008  len 5.0  gap 1.0e-06  1.5s",
    "train: 3/20 done in Ns",
]


@pytest.mark.parametrize("mode", ["plain", "rich"])
def test_plain_lines_when_stdout_is_not_a_terminal(mode):
    stream = _Pipe()
    console = Console(mode, stream)
    assert not console.live
    _session(console)
    console.close()
    assert _plain_lines(stream.getvalue()) == PLAIN


def test_rich_on_a_terminal_shows_the_step_of_the_total_and_the_metrics():
    buffer = io.StringIO()
    console = Console("rich", rich_console=RichConsole(file=buffer, force_terminal=True, width=120))
    assert console.live
    _session(console)
    console.close()
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())  # without the terminal's control codes
    final = out[out.rindex("step") :]  # the table as the display left it
    for row in (["1/20", "0.012", "0", "3", "1e-06", "64", "1.5"], ["3/20", "0.212", "0.0008", "5"]):
        assert re.search(r"\s+".join(re.escape(cell) for cell in row), final), (row, final)
    assert "3/20" in out and "train" in out  # the progress bar of the steps
    assert "tokenize prompts: done in" in out and "ready: 1 rollout worker(s)" in out
    assert "reward +0.012" not in out  # the table replaces the plain lines


def test_none_prints_messages_only():
    stream = _Pipe()
    console = Console("none", stream)
    _session(console)
    assert stream.getvalue() == "ready: 1 rollout worker(s) [hf], 1 learner rank(s)\n"


def test_an_operation_that_fails_prints_no_done_line():
    stream = _Pipe()
    with pytest.raises(OSError), Console("plain", stream).task("load model"):
        raise OSError("no such file")
    assert stream.getvalue() == "load model ...\n"


def test_offline_trainer_rows_and_lines():
    m = {"step": 10, "epoch": 0, "sft/loss": 1.25, "sft/lr": 1e-4, "time/step_s": 0.5}
    assert _metric_line("sft", m) == "sft step    10  loss 1.25  lr 0.0001"
    assert _metric_values("sft", m) == {"step": 10, "loss": 1.25, "lr": 1e-4}


def test_no_progress_reports_nothing_and_bad_modes_are_named():
    with NO_PROGRESS.task("anything", 3) as task:
        task.advance()
        task.update(3)
    with pytest.raises(ValueError, match="logging.console: rich, plain or none, got 'fancy'"):
        Console("fancy")
