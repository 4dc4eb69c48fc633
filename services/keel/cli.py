"""`keel`: the command line.

Imports stay cheap: each command imports what it needs when it runs, so `keel --help` and
`keel config validate` start in well under a second.

Exit codes: 0 success, 1 the command ran and failed, 2 bad input (usage or config), nothing started.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_STOPPED = 75  # stopped by a signal after a checkpoint: run the same command again to resume


def _err(message: str) -> None:
    print(f"keel: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- commands


def _load_config(path: str, kind: str = "train"):
    """The config of `kind` (a run config by default), or None after printing one `config error`
    line per problem."""
    from keel.config import CONFIG_KINDS, ConfigError, load_config

    try:
        return load_config(path, CONFIG_KINDS[kind])
    except ConfigError as err:
        for line in err.lines:
            _err(f"config error: {err.source}: {line}")
        return None


def _checked_config(path: str, kind: str, preflight_fn):
    """The config, when it loads and `preflight_fn(cfg)` finds no problem (files that are not there,
    a missing token); else None after one `config error` line per problem. Nothing has started."""
    cfg = _load_config(path, kind)
    if cfg is None:
        return None
    problems = preflight_fn(cfg)
    for problem in problems:
        _err(f"config error: {path}: {problem}")
    return None if problems else cfg


def cmd_config_validate(args: argparse.Namespace) -> int:
    cfg = _load_config(args.file, args.kind)
    if cfg is None:
        return EXIT_BAD_INPUT
    if args.kind == "train":
        what = f"estimator {cfg.algorithm.estimator}, rollout {cfg.rollout.backend} x{cfg.rollout.replicas}"
    elif args.kind == "eval":
        what = f"{len(cfg.checkpoints)} checkpoint(s)"
    elif args.kind == "bon":
        what = f"best of {cfg.bon.n} from {cfg.model.policy}, keep {cfg.bon.keep}"
    elif args.kind == "cai":
        what = f"{cfg.cai.principles_per_prompt} critique(s) and revision(s) per prompt of {cfg.model.policy}"
    else:
        what = f"{args.kind} from {cfg.model.path}, {cfg.train.epochs} epoch(s) of batch {cfg.train.batch_size}"
    print(f"{args.file}: ok ({what})")
    return EXIT_OK


def cmd_config_schema(args: argparse.Namespace) -> int:
    from keel.config import CONFIG_KINDS, config_schema

    print(json.dumps(config_schema(CONFIG_KINDS[args.kind]), indent=2))
    return EXIT_OK


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from keel.models.tiny import TinyModelSpec, make_tiny_model

    spec = TinyModelSpec(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads or args.heads,
        intermediate_size=args.intermediate_size,
    )
    try:
        spec.check()
    except ValueError as err:
        _err(f"make-tiny-model: {err}")
        return EXIT_BAD_INPUT
    corpus = None
    if args.corpus:
        try:
            with open(args.corpus) as f:
                corpus = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as err:
            _err(f"make-tiny-model: --corpus {args.corpus}: {err.strerror}")
            return EXIT_BAD_INPUT
    out = make_tiny_model(
        args.dir, spec, reward=args.reward, seed=args.seed, corpus=corpus, pretrain_steps=args.pretrain_steps
    )
    kind = "reward model" if args.reward else "causal LM"
    shape = f"{spec.num_layers} layers, hidden {spec.hidden_size}, head_dim {spec.head_dim}"
    print(f"wrote tiny Llama {kind} to {out} ({shape})")
    return EXIT_OK


def cmd_make_task_data(args: argparse.Namespace) -> int:
    from keel.data import tasks

    if not 0.0 <= args.wrong_share < 1.0:
        _err(f"make-task-data: --wrong-share must be in [0, 1), got {args.wrong_share}")
        return EXIT_BAD_INPUT
    make = {
        "prompts": lambda: tasks.arithmetic_rows(args.rows, args.seed),
        "sft": lambda: tasks.arithmetic_sft_rows(args.rows, args.seed, args.wrong_share),
        "preferences": lambda: tasks.arithmetic_preference_rows(args.rows, args.seed),
    }[args.kind]
    path = tasks.write_jsonl(make(), args.out)
    print(f"wrote {args.rows} {args.task} {args.kind} rows to {path}")
    return EXIT_OK


def _role_env() -> None:
    """The environment every role runs with (quiet transformers, no hub, DeepSpeed's accelerator),
    unless the caller set otherwise."""
    import os

    from keel.controller.actors import ROLE_ENV

    for key, value in ROLE_ENV.items():
        os.environ.setdefault(key, value)


def _missing(fields: list[tuple[str, str | None]]) -> list[str]:
    from pathlib import Path

    return [f"{field}: {path} does not exist" for field, path in fields if path and not Path(path).exists()]


def offline_preflight(cfg) -> list[str]:
    """Files an SFT / RM / DPO config names that are not there, and trackers that are not installed."""
    from keel.telemetry.sinks import tracker_problems

    fields = [("model.path", cfg.model.path), ("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)]
    if cfg.model.tokenizer:
        fields.append(("model.tokenizer", cfg.model.tokenizer))
    return _missing(fields + [("reference", getattr(cfg, "reference", None))]) + tracker_problems(cfg.logging.trackers)


def eval_preflight(cfg) -> list[str]:
    """Files an eval config names that are not there."""
    fields = [(f"checkpoints[{i}].path", c.path) for i, c in enumerate(cfg.checkpoints)]
    fields += [("reference", cfg.reference), ("data.prompts", cfg.data.prompts), ("judge", cfg.judge)]
    if cfg.reward is None:
        return _missing(fields)
    from keel.reward.model import source_problems

    return _missing(fields) + source_problems(cfg.reward)


def _metric_line(kind: str, m: dict) -> str:
    """`sft step    10  loss 1.23  accuracy 0.41 ...`, or `... held out: loss ...` for an evaluation."""
    held_out = any(k.startswith("eval/") for k in m)
    prefix = f"eval/{kind}/" if held_out else f"{kind}/"
    shown = "  ".join(f"{k[len(prefix) :]} {v:.4g}" for k, v in m.items() if k.startswith(prefix))
    return f"{kind} step {m['step']:5d}  {'held out: ' if held_out else ''}{shown}"


def _metric_values(kind: str, m: dict) -> dict:
    """A training step's row of the rich console's table: the step and the `kind/` metrics."""
    return {"step": m["step"], **{k[len(kind) + 1 :]: v for k, v in m.items() if k.startswith(f"{kind}/")}}


def cmd_offline(args: argparse.Namespace) -> int:
    """keel sft / rm / dpo: check the config and files, resume what --out holds (or start afresh),
    train, print progress, write the model."""
    from keel.controller.checkpoint import CheckpointError, ResumeRefused
    from keel.data.rows import DataError
    from keel.learner.offline import open_run, output_dir, run_offline

    cfg = _checked_config(args.config, args.kind, offline_preflight)
    if cfg is None:
        return EXIT_BAD_INPUT
    _role_env()
    if args.kind == "sft":
        from keel.learner.sft import SFTTrainer as trainer
    elif args.kind == "rm":
        from keel.learner.reward_model import RewardModelTrainer as trainer
    else:
        from keel.learner.dpo import DPOTrainer as trainer
    out = output_dir(cfg, args.out)
    try:  # decided before anything starts
        start = open_run(cfg, out, args.force_new)
    except ResumeRefused as err:
        _err(f"config error: {args.config}: {err} (--force-new starts over)")
        return EXIT_BAD_INPUT
    except CheckpointError as err:
        _err(str(err))
        return EXIT_FAILED
    if start.finished:
        print(f"{out}: the run already finished ({start.step} steps); nothing to train")
        return EXIT_OK
    if start.checkpoint is not None:
        print(f"{args.kind}: resuming from {start.checkpoint} ({start.step} steps done)", flush=True)
    if start.replaced is not None:
        print(f"{args.kind}: the previous run's files in {out} are now in {start.replaced}", flush=True)

    from keel.telemetry.console import Console

    console = Console(cfg.logging.console)

    def show(m: dict) -> None:
        if "note" in m:
            console.log(f"{args.kind}: data: {m['note']}")
        elif any(k.startswith("eval/") for k in m):
            console.log(_metric_line(args.kind, m))
        else:
            shown = m["step"] % args.log_every == 0 or m["step"] == 1
            console.step(_metric_values(args.kind, m), _metric_line(args.kind, m) if shown else None)

    from keel.learner.offline import STOP_FILE

    try:
        with stop_on_signals(lambda: (out / STOP_FILE).touch(), cfg.checkpoint.stop_grace_s):
            run_offline(trainer, cfg, out, show, start, progress=console)
    except DataError as err:
        _err(f"data error: {err}")
        return EXIT_BAD_INPUT
    finally:
        console.close()
    if (out / STOP_FILE).exists():
        (out / STOP_FILE).unlink()
        if not open_run_finished(out):
            print(f"{args.kind}: stopped with a checkpoint in {out}; run the same command to resume")
            return EXIT_STOPPED
    _write_plots(out)
    if cfg.model.lora is not None:
        print(f"wrote {args.kind} LoRA adapter to {out} and the merged model to {out / 'merged'}")
    else:
        print(f"wrote {args.kind} model to {out}")
    return EXIT_OK


def open_run_finished(out) -> bool:
    """Whether the latest checkpoint in an output directory is a finished run's."""
    from keel.controller.checkpoint import CheckpointStore

    latest = CheckpointStore(out / "checkpoints", 1).latest()
    return latest is not None and CheckpointStore.read_state(latest)["finished"]


def cmd_eval(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from keel.data.rows import DataError
    from keel.evaluation import evaluate, write_eval

    cfg = _checked_config(args.config, "eval", eval_preflight)
    if cfg is None:
        return EXIT_BAD_INPUT
    _role_env()
    from keel.telemetry.console import Console

    console = Console("rich")  # progress bars on a terminal, plain lines in a log (an eval config has no logging)
    try:
        result = evaluate(cfg, log=console.log, progress=console)
    except DataError as err:
        _err(f"data error: {err}")
        return EXIT_BAD_INPUT
    finally:
        console.close()
    out = Path(args.out or cfg.output or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}/eval.json")
    print(f"wrote {write_eval(result, out)}")
    return EXIT_OK


def bon_preflight(cfg) -> list[str]:
    """What `preflight` finds in the run config keel bon starts its roles from: files that are not
    there, a reward function that cannot be imported."""
    from keel.config import bon_run_config

    return preflight(bon_run_config(cfg))


def cmd_bon(args: argparse.Namespace) -> int:
    """keel bon: check the config and files, start the rollout and reward roles on Ray, sample n per
    prompt, score, keep the best (or those above a threshold), write the SFT dataset."""
    import os
    import time
    from pathlib import Path

    cfg = _checked_config(args.config, "bon", bon_preflight)
    if cfg is None:
        return EXIT_BAD_INPUT
    out = Path(args.out or cfg.bon.output or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}/bon.jsonl")
    import ray

    _role_env()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    from keel.bon import run_bon
    from keel.controller.placement import PlacementError
    from keel.controller.supervisor import RoleFailed
    from keel.data.rows import DataError
    from keel.telemetry.console import Console

    console = Console("rich")  # progress bars on a terminal, plain lines in a log (a bon config has no logging)
    try:
        run_bon(cfg, out, log=console.log, progress=console)
    except DataError as err:
        _err(f"data error: {err}")
        return EXIT_BAD_INPUT
    except (PlacementError, RoleFailed) as err:
        _err(f"error: {err}")
        return EXIT_FAILED
    finally:
        console.close()
    print(f"wrote {out}")
    return EXIT_OK


def cai_preflight(cfg) -> list[str]:
    """Files a cai config names that are not there, and a constitution that does not load or lacks a
    principle asked for, found before any model loads."""
    from keel.constitution import ConstitutionError, load_constitution

    fields = [("model.policy", cfg.model.policy), ("model.tokenizer", cfg.model.tokenizer)]
    fields += [("data.prompts", cfg.data.prompts), ("cai.critic", cfg.cai.critic)]
    problems = _missing(fields)
    try:
        principles = load_constitution(cfg.cai.constitution).select(cfg.cai.principles, "cai.principles")
    except ConstitutionError as err:
        text = str(err)
        return problems + [text if text.startswith("cai.") else f"cai.constitution: {text}"]
    if cfg.cai.principles_per_prompt > len(principles):
        k = cfg.cai.principles_per_prompt
        problems.append(f"cai.principles_per_prompt: {k} drawn per prompt from {len(principles)} principles")
    return problems


def cmd_cai(args: argparse.Namespace) -> int:
    """keel cai: check the config and files, then generate, critique and revise each prompt's response and
    write the SFT rows, the preference pairs and the trace."""
    import time
    from pathlib import Path

    cfg = _checked_config(args.config, "cai", cai_preflight)
    if cfg is None:
        return EXIT_BAD_INPUT
    out = Path(args.out or cfg.cai.output_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    _role_env()
    from keel.cai import run_cai
    from keel.data.rows import DataError
    from keel.telemetry.console import Console

    console = Console("rich")
    try:
        run_cai(cfg, out, log=console.log, progress=console)
    except DataError as err:
        _err(f"data error: {err}")
        return EXIT_BAD_INPUT
    finally:
        console.close()
    print(f"wrote {out / 'sft.jsonl'}, {out / 'preferences.jsonl'} and {out / 'trace.jsonl'}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from keel.demo import DemoPlan, run_demo

    plan = DemoPlan.quick() if args.quick else DemoPlan()
    run_demo(Path(args.out), plan.with_backend(args.backend))
    return EXIT_OK


def preflight(cfg) -> list[str]:
    """Problems that would only surface inside an actor: missing files, unimportable reward,
    a gRPC channel without its token or TLS files; and trackers that are not installed."""
    from pathlib import Path

    from keel.telemetry.sinks import tracker_problems

    problems = tracker_problems(cfg.logging.trackers)
    for field, path in (("model.policy", cfg.model.policy), ("data.prompts", cfg.data.prompts)):
        if not Path(path).exists():
            problems.append(f"{field}: {path} does not exist")
    if cfg.data.eval_prompts and not Path(cfg.data.eval_prompts).exists():
        problems.append(f"data.eval_prompts: {cfg.data.eval_prompts} does not exist")
    if cfg.data.eval_task_metric:
        from keel.reward.model import RewardError, import_function

        try:
            import_function(cfg.data.eval_task_metric, "data.eval_task_metric")
        except RewardError as err:
            problems.append(str(err))
    if cfg.reference.model and not Path(cfg.reference.model).exists():
        problems.append(f"reference.model: {cfg.reference.model} does not exist")
    from keel.config import reward_sources
    from keel.reward.model import source_problems

    grpc_cfg = cfg.transport.grpc
    if grpc_cfg.reward_address is None:  # the job scores with its own reward; an external server has its own
        problems.extend(source_problems(cfg.reward))
    servers = any(s.type == "server" for s in reward_sources(cfg.reward))  # called with transport.grpc's token
    if cfg.transport.uses_grpc() or servers:
        from keel.transport.security import SecurityConfigError, job_tls_problems, load_token

        try:
            load_token(grpc_cfg)
        except SecurityConfigError as err:
            problems.append(str(err))
        problems.extend(job_tls_problems(grpc_cfg))
    return problems


def cmd_train(args: argparse.Namespace) -> int:
    import os
    import time
    from pathlib import Path

    cfg = _checked_config(args.config, "train", preflight)
    if cfg is None:
        return EXIT_BAD_INPUT
    run_dir = Path(args.run_dir or cfg.logging.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    from keel.controller.checkpoint import CheckpointError, ResumeRefused, resume_point

    try:  # decided before anything starts
        checkpoint, state, replaced = resume_point(
            run_dir, cfg.model_dump(mode="json"), cfg.checkpoint.resume, getattr(args, "force_new", False)
        )
    except ResumeRefused as err:
        _err(f"config error: {args.config}: {run_dir} holds a run made with another config (--force-new starts over):")
        for line in err.lines:
            _err(f"config error: {args.config}: {line}")
        return EXIT_BAD_INPUT
    except CheckpointError as err:
        _err(str(err))
        return EXIT_FAILED
    if state is not None and state["finished"]:
        print(f"{run_dir}: the run already finished ({state['step']} steps); nothing to train")
        return EXIT_OK
    if replaced is not None:
        print(f"the previous run's files in {run_dir} are now in {replaced}", flush=True)

    import ray

    from keel.controller.restarts import RunRestarts

    _role_env()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=cfg.logging.level == "DEBUG")
    from keel.controller.placement import PlacementError
    from keel.controller.supervisor import RoleFailed, RoleOutage
    from keel.data.rows import DataError
    from keel.telemetry.console import Console

    console = Console(cfg.logging.console)  # the step lines, and progress of the long operations
    steps = cfg.controller.steps

    def show(m: dict, bar) -> None:
        bar.update(m["step"] + 1)
        shown = m["step"] % cfg.logging.log_every == 0
        console.step(_step_values(m, steps), _step_line(m, steps) if shown else None)

    # a lost learner rank (or a role that keeps failing) starts every role again from the latest
    # checkpoint, up to controller.max_restarts times (keel.controller.restarts)
    from keel.telemetry.status import clear_error, record_error

    def failed(message: str, code: int = EXIT_FAILED) -> int:
        _err(message)
        record_error(run_dir, message)  # keel status RUN_DIR shows it
        return code

    runner = RunRestarts(cfg, run_dir, log=console.log, resume_from=checkpoint, progress=console)
    clear_error(run_dir)
    with stop_on_signals(runner.request_stop, cfg.checkpoint.stop_grace_s):
        try:
            with console.task("train", steps, state["step"] if state is not None else 0) as bar:
                runner.run(on_step=lambda m: show(m, bar))
        except PlacementError as err:
            return failed(str(err))
        except DataError as err:  # a bad prompt or held-out prompt file: read before any actor starts
            return failed(f"data error: {err}", EXIT_BAD_INPUT)
        except RoleOutage as err:  # stopped at a step boundary, with a checkpoint
            return failed(f"error: {err}")
        except RoleFailed as err:
            restarts = f"after {runner.restarts} restart(s) (controller.max_restarts {cfg.controller.max_restarts})"
            return failed(f"error: {err}; the run stops {restarts}; the latest checkpoint stays, run again to resume")
        except Exception as err:
            record_error(run_dir, f"{type(err).__name__}: {err}")
            raise
        finally:
            console.close()
    _write_plots(run_dir)
    print(f"run directory: {run_dir}")
    return EXIT_STOPPED if runner.stop_requested else EXIT_OK


def _step_line(m: dict, steps: int) -> str:
    """A training step's console line (logging.console plain)."""
    return (
        f"step {m['step'] + 1:4d}/{steps}  reward {m['reward_mean']:+.3f}  kl {m['kl']:.4f}  "
        f"len {m['response_length']:.1f}  gap {m['rollout/logprob_gap_mean']:.1e}  {m['step_time']:.1f}s"
    )


def _step_values(m: dict, steps: int) -> dict:
    """A training step's row of the rich console's table."""
    return {
        "step": f"{m['step'] + 1}/{steps}",
        "reward": m["reward_mean"],
        "kl": m["kl"],
        "len": m["response_length"],
        "gap": m["rollout/logprob_gap_mean"],
        "samples/s": m["samples_per_s"],
        "time_s": m["step_time"],
    }


def _write_plots(run_dir) -> None:
    """The run's curves into run_dir/plots (a plotting problem is reported, never fatal to the run)."""
    from keel.telemetry.plots import plot_run

    try:
        written = plot_run(run_dir)
    except Exception as err:  # the run itself is done and saved
        _err(f"plots: not written ({type(err).__name__}: {err})")
        return
    print(f"plots: {len(written)} PNGs in {run_dir}/plots")


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from keel.telemetry.plots import NoMetrics, plot_run

    try:
        written = plot_run(Path(args.run_dir), Path(args.out) if args.out else None)
    except NoMetrics as err:
        _err(str(err))
        return EXIT_BAD_INPUT
    for path in written:
        print(path)
    return EXIT_OK


def stop_on_signals(request_stop: Callable[[], None], grace_s: float):
    """While a run goes on, SIGTERM or SIGINT calls `request_stop` (the run then stops at its next
    step boundary with a checkpoint); past `grace_s` seconds, or on a second signal, the process
    exits at once with EXIT_STOPPED (the last checkpoint stays). `keel stop` and a Kubernetes pod
    deletion send SIGTERM."""
    import contextlib
    import os
    import signal
    import threading

    def now(reason: str) -> None:
        _err(f"{reason}: stopping now, without a new checkpoint")
        sys.stderr.flush()
        os._exit(EXIT_STOPPED)

    signalled = []

    def handle(signum, _frame) -> None:
        if signalled:
            now(f"second {signal.Signals(signum).name}")
        signalled.append(signum)
        request_stop()
        _err(
            f"{signal.Signals(signum).name}: finishing this step, then a checkpoint (at most {grace_s:.0f}s; "
            "signal again to stop at once)"
        )
        timer = threading.Timer(grace_s, now, args=(f"grace period of {grace_s:.0f}s over",))
        timer.daemon = True
        timer.start()

    @contextlib.contextmanager
    def installed():
        old = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, previous in old.items():
                signal.signal(sig, previous)

    return installed()


def cmd_serve_reward(args: argparse.Namespace) -> int:
    import asyncio

    import yaml
    from pydantic import ValidationError

    from keel.config import ConfigError, validation_error_lines
    from keel.reward.model import RewardError
    from keel.reward.server import RewardServer, RewardServerConfig
    from keel.transport.security import SecurityConfigError

    try:
        with open(args.config) as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping, got {type(data).__name__}")
        if args.port is not None:
            data["port"] = args.port
        cfg = RewardServerConfig.model_validate(data)
    except (OSError, yaml.YAMLError, ValueError) as err:
        if isinstance(err, ValidationError):
            for line in ConfigError(args.config, validation_error_lines(err)).lines:
                _err(f"config error: {args.config}: {line}")
        else:
            _err(f"config error: {args.config}: {err}")
        return EXIT_BAD_INPUT

    server = RewardServer(cfg)

    def ready(port: int) -> None:
        g = cfg.grpc
        tls = "mutual TLS" if g.tls_client_ca else "TLS" if g.tls_cert else "no TLS"
        print(f"reward server on {g.host}:{port} (auth {'on' if g.auth else 'off'}, {tls})", flush=True)
        if server.metrics_port is not None:
            print(f"metrics: http://{g.host}:{server.metrics_port}/metrics", flush=True)

    try:
        asyncio.run(server.serve_until_signal(on_ready=ready))
    except (SecurityConfigError, RewardError) as err:
        _err(f"config error: {args.config}: {err}")
        return EXIT_BAD_INPUT
    return EXIT_OK


def _token_in_runtime_env(config_path: str, runtime_env_path: str) -> str | None:
    """Why `--runtime-env` must not be sent: it holds the run's gRPC token, which the Jobs API and
    the dashboard would show to anyone who can read the job. None when it does not (or cannot be
    read: `jobs.submit` reports that)."""
    from pathlib import Path

    import yaml

    from keel.config import ConfigError, load_config

    try:
        token_env = load_config(config_path).transport.grpc.token_env
        env_vars = yaml.safe_load(Path(runtime_env_path).read_text()).get("env_vars") or {}
    except (ConfigError, OSError, yaml.YAMLError, AttributeError):
        return None
    if token_env not in env_vars:
        return None
    return (
        f"--runtime-env {runtime_env_path}: env_vars holds ${token_env}, the gRPC token, which the job's info "
        "would show: set it in the environment of `ray start` on every node, or mount transport.grpc.token_file"
    )


def cmd_submit(args: argparse.Namespace) -> int:
    from keel.config import ConfigError
    from keel.controller import jobs

    if args.runtime_env and (problem := _token_in_runtime_env(args.config, args.runtime_env)):
        _err(problem)
        return EXIT_BAD_INPUT
    try:
        job_id = jobs.submit(args.address, args.config, args.working_dir, args.runtime_env, args.run_dir)
    except ConfigError as err:
        for line in err.lines:
            _err(f"config error: {err.source}: {line}")
        return EXIT_BAD_INPUT
    except jobs.JobError as err:
        _err(str(err))
        return EXIT_BAD_INPUT
    print(f"submitted {job_id}", flush=True)
    print(f"  keel status {job_id}   keel logs {job_id} --follow   keel stop {job_id}", flush=True)
    if not args.follow:
        return EXIT_OK
    final = jobs.follow(args.address, job_id, sys.stdout)
    print(f"job {job_id}: {final}")
    return EXIT_OK if final == "SUCCEEDED" else EXIT_FAILED


def _job_command(fn):
    """Run a job query; a JobError is one line and exit 1."""
    from keel.controller.jobs import JobError

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except JobError as err:
            _err(str(err))
            return EXIT_FAILED

    return run


@_job_command
def cmd_status(args: argparse.Namespace) -> int:
    """A run directory's status (read from its files), or a submitted job's (from the cluster);
    with --watch, again every few seconds until the run or job has ended."""
    import time
    from pathlib import Path

    from keel.controller import jobs
    from keel.telemetry.status import format_status, run_status

    ended = ("finished", "failed", "not running")
    while True:
        if Path(args.job).is_dir():
            try:
                info = run_status(Path(args.job))
            except FileNotFoundError as err:
                _err(str(err))
                return EXIT_BAD_INPUT
            text, over = format_status(info), info["state"].startswith(ended + ("stopped",))
        else:
            job = jobs.status(args.address, args.job)
            text = f"{job['job']}: {job['status']}" + (f" ({job['message']})" if job["message"] else "")
            over = job["status"] in ("SUCCEEDED", "FAILED", "STOPPED")
            if job["status"] == "RUNNING":  # the run's own status, from its controller
                try:
                    live = jobs.live_status(args.address, args.job)
                except jobs.JobError as err:
                    live = {"summary": None, "why": str(err)}
                if live["summary"] is not None:
                    text += "\n" + format_status({**live["summary"], "state": "running"})
                else:
                    text += "\n  " + live.get("why", "no step done yet")
        if args.watch and sys.stdout.isatty():
            print("\033[2J\033[H", end="")  # a terminal: redraw in place
        print(text, flush=True)
        if not args.watch or over:
            return EXIT_OK
        time.sleep(args.watch)


@_job_command
def cmd_stop(args: argparse.Namespace) -> int:
    from keel.controller import jobs

    print(f"{args.job}: {jobs.stop(args.address, args.job, args.timeout)}")
    return EXIT_OK


@_job_command
def cmd_logs(args: argparse.Namespace) -> int:
    from keel.controller import jobs

    if args.follow:
        final = jobs.follow(args.address, args.job, sys.stdout)
        print(f"job {args.job}: {final}")
        return EXIT_OK
    print(jobs.logs(args.address, args.job), end="")
    return EXIT_OK


@_job_command
def cmd_scale(args: argparse.Namespace) -> int:
    from keel.controller import jobs

    if args.replicas < 1:
        _err(f"scale: rollout replicas must be >= 1, got {args.replicas}")
        return EXIT_BAD_INPUT
    print(jobs.scale(args.address, args.job, args.replicas, args.timeout), end="")
    return EXIT_OK


def cmd_control_status(args: argparse.Namespace) -> int:
    """Inside the cluster (the control job that `keel status JOB` submits): the job's state and
    status summary as one JSON line."""
    from keel.controller.control import read_status

    try:
        status = read_status(args.job)
    except LookupError as err:
        _err(str(err))
        return EXIT_FAILED
    print(json.dumps(status))
    return EXIT_OK


def cmd_control_scale(args: argparse.Namespace) -> int:
    """Inside the cluster (the control job that `keel scale` submits)."""
    from keel.controller.control import send_scale

    try:
        state = send_scale(args.job, args.rollout, args.timeout)
    except (LookupError, RuntimeError, TimeoutError, ValueError) as err:
        _err(str(err))
        return EXIT_FAILED
    print(json.dumps(state))
    print(f"job {args.job}: {state['rollout_replicas']} rollout workers (policy version {state['version']})")
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def _usage(parser: argparse.ArgumentParser) -> int:
    """A command group called without its action: show its help, exit as bad usage."""
    parser.print_help(sys.stderr)
    return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keel",
        description="Keel: distributed RLHF (PPO, GRPO, RLOO, REINFORCE++, SFT, RM, DPO) on Ray.",
    )
    from keel import __version__

    parser.add_argument("--version", action="version", version=f"keel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    config = sub.add_parser("config", help="validate a run config or print its JSON schema")
    config.set_defaults(func=lambda _: _usage(config))
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    kinds = ["train", "sft", "rm", "dpo", "eval", "bon", "cai"]
    validate = config_sub.add_parser("validate", help="check a YAML config; errors name the field")
    validate.add_argument("file", help="YAML config")
    validate.add_argument("--kind", choices=kinds, default="train", help="which command reads it (default train)")
    validate.set_defaults(func=cmd_config_validate)
    schema = config_sub.add_parser("schema", help="print a config's JSON schema")
    schema.add_argument("--kind", choices=kinds, default="train", help="which command's config (default train)")
    schema.set_defaults(func=cmd_config_schema)

    tiny = sub.add_parser("make-tiny-model", help="build a tiny Llama + tokenizer in HF format (no hub needed)")
    tiny.add_argument("dir", help="output directory")
    tiny.add_argument("--reward", action="store_true", help="one-logit sequence-classification head (a reward model)")
    tiny.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    tiny.add_argument("--hidden-size", type=int, default=128, help="hidden size (default 128)")
    tiny.add_argument("--heads", type=int, default=2, help="attention heads (default 2: head_dim 64)")
    tiny.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    tiny.add_argument("--intermediate-size", type=int, default=256, help="MLP width (default 256)")
    tiny.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary upper bound (default 512)")
    tiny.add_argument("--corpus", help="text file (one example per line) to train the tokenizer on")
    tiny.add_argument("--seed", type=int, default=0, help="seed for the tokenizer corpus and weights")
    tiny.add_argument("--pretrain-steps", type=int, default=0, help="warm the LM up on the corpus for this many steps")
    tiny.set_defaults(func=cmd_make_tiny_model)

    data = sub.add_parser("make-task-data", help="write a synthetic task's data as JSONL")
    data.add_argument("task", choices=["arithmetic"], help="arithmetic: single-digit addition, 'a+b=' -> a+b")
    data.add_argument("out", help="output JSONL file")
    data.add_argument(
        "--kind",
        choices=["prompts", "sft", "preferences"],
        default="prompts",
        help="prompts (prompt, answer): PPO and eval; sft (prompt, response); preferences (prompt, chosen, rejected)",
    )
    data.add_argument("--rows", type=int, default=512, help="number of rows (default 512)")
    data.add_argument("--wrong-share", type=float, default=0.0, help="sft: share of demonstrations with a wrong sum")
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=cmd_make_task_data)

    helps = {
        "sft": "supervised fine-tuning (loss on response tokens), DeepSpeed, HF output",
        "rm": "train a reward model on preference pairs (Bradley-Terry), HF output",
        "dpo": "DPO / IPO / conservative DPO against a frozen reference, HF output",
    }
    for kind, text in helps.items():
        cmd = sub.add_parser(kind, help=text)
        cmd.add_argument("--config", required=True, help=f"YAML {kind} config (keel config schema --kind {kind})")
        cmd.add_argument(
            "--out",
            help="output directory (default: the config's output_dir, else runs/<name>-<time>); one holding "
            "checkpoints of the same config resumes from the latest",
        )
        cmd.add_argument(
            "--force-new", action="store_true", help="start over in --out, moving a previous run there aside"
        )
        cmd.add_argument("--log-every", type=int, default=10, help="print every this many steps (default 10)")
        cmd.set_defaults(func=cmd_offline, kind=kind)

    ev = sub.add_parser("eval", help="evaluate checkpoints on held-out prompts: reward, KL, task metric, win rate")
    ev.add_argument("--config", required=True, help="YAML eval config (keel config schema --kind eval)")
    ev.add_argument("--out", help="eval.json path (default: the config's output, else runs/<name>-<time>/eval.json)")
    ev.set_defaults(func=cmd_eval)

    bon = sub.add_parser(
        "bon", help="best-of-n / rejection sampling: n samples per prompt, scored, the best kept as an SFT dataset"
    )
    bon.add_argument("--config", required=True, help="YAML bon config (keel config schema --kind bon)")
    bon.add_argument("--out", help="the dataset (JSONL; default: bon.output, else runs/<name>-<time>/bon.jsonl)")
    bon.set_defaults(func=cmd_bon)

    cai = sub.add_parser(
        "cai", help="constitutional AI, supervised phase: generate, critique, revise -> SFT rows and preference pairs"
    )
    cai.add_argument("--config", required=True, help="YAML cai config (keel config schema --kind cai)")
    cai.add_argument("--out", help="output directory (default: cai.output_dir, else runs/<name>-<time>)")
    cai.set_defaults(func=cmd_cai)

    demo = sub.add_parser("demo", help="the whole pipeline on a checkable task: SFT -> RM -> PPO (and DPO), evaluated")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--backend", choices=["vllm", "hf"], default="vllm", help="PPO rollout backend (default vllm)")
    demo.add_argument("--quick", action="store_true", help="a reduced run (fewer steps and prompts) for smoke tests")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="run PPO (or GRPO, RLOO, REINFORCE++) as configured, on Ray")
    train.add_argument("--config", required=True, help="YAML run config")
    train.add_argument(
        "--run-dir",
        help="where config snapshot, metrics.jsonl and checkpoints go (default runs/<name>-<time>); a directory "
        "holding a run with the same config resumes it",
    )
    train.add_argument(
        "--force-new", action="store_true", help="start over in --run-dir, moving a previous run there aside"
    )
    train.set_defaults(func=cmd_train)

    plot = sub.add_parser("plot", help="PNG curves of a run's metrics (reward, KL, losses, lengths, step time)")
    plot.add_argument("run_dir", help="a keel train run directory, or a keel sft/rm/dpo output directory")
    plot.add_argument("--out", help="where the PNGs go (default RUN_DIR/plots)")
    plot.set_defaults(func=cmd_plot)

    address_help = "Ray Jobs API address, http://HEAD:8265 (default: $RAY_ADDRESS)"
    submit = sub.add_parser("submit", help="run `keel train` as a job on a Ray cluster (Ray Jobs API)")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--config", required=True, help="YAML run config (inside --working-dir when given)")
    submit.add_argument("--working-dir", help="directory uploaded to the cluster (without .venv, runs/, .git)")
    submit.add_argument("--runtime-env", help="YAML/JSON Ray runtime env merged in (env_vars, pip, excludes, ...)")
    submit.add_argument("--run-dir", help="the run directory on the cluster (default runs/<name>-<time>)")
    submit.add_argument(
        "--follow", action="store_true", help="print the job's log until it ends; exit 1 unless it succeeded"
    )
    submit.set_defaults(func=cmd_submit)
    for name, func, text in (
        ("status", cmd_status, "a run directory's status (progress, reward and KL, speed, ETA, checkpoint) or a job's"),
        ("stop", cmd_stop, "stop a job and its actors"),
        ("logs", cmd_logs, "a job's log"),
    ):
        cmd = sub.add_parser(name, help=text)
        if name == "status":
            cmd.add_argument("job", metavar="RUN_DIR|JOB", help="a keel train run directory, or a job id")
            cmd.add_argument(
                "--watch", type=float, nargs="?", const=5.0, default=0.0, help="refresh every N seconds (default 5)"
            )
        else:
            cmd.add_argument("job", help="job id (printed by keel submit)")
        cmd.add_argument("--address", help=address_help)
        if name == "stop":
            cmd.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to stop")
        if name == "logs":
            cmd.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        cmd.set_defaults(func=func)
    scale = sub.add_parser("scale", help="change a running job's rollout workers (between steps)")
    scale.add_argument("role", choices=["rollout"], help="the role to scale")
    scale.add_argument("replicas", type=int, help="rollout workers wanted")
    scale.add_argument("--job", required=True, help="job id (printed by keel submit)")
    scale.add_argument("--address", help=address_help)
    scale.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the job to apply it")
    scale.set_defaults(func=cmd_scale)
    control = sub.add_parser("_control")  # run inside the cluster by `keel scale` and `keel status JOB`
    control_sub = control.add_subparsers(dest="control_command", metavar="ACTION")
    control_scale = control_sub.add_parser("scale")
    control_scale.add_argument("--job", required=True)
    control_scale.add_argument("--rollout", type=int, required=True)
    control_scale.add_argument("--timeout", type=float, default=300.0)
    control_scale.set_defaults(func=cmd_control_scale)
    control_status = control_sub.add_parser("status")
    control_status.add_argument("--job", required=True)
    control_status.set_defaults(func=cmd_control_status)
    control.set_defaults(func=lambda _: _usage(control))

    serve = sub.add_parser("serve", help="run a role as a standalone gRPC server")
    serve.set_defaults(func=lambda _: _usage(serve))
    serve_sub = serve.add_subparsers(dest="serve_command", metavar="ROLE")
    reward = serve_sub.add_parser("reward", help="RewardService with dynamic batching, health and reflection")
    reward.add_argument("--config", required=True, help="YAML: reward (as in a run config), grpc, port, batching")
    reward.add_argument("--port", type=int, help="override the config's port (0 = any free port)")
    reward.set_defaults(func=cmd_serve_reward)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = getattr(args, "func", lambda _: _usage(parser))
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
