"""The offline loop's exact global mean: how a batch is split into micro-batches or ranks does not
change an update."""

from __future__ import annotations

from keel.config import SFTConfig
from keel.data.tasks import write_jsonl
from keel.learner.offline import run_offline
from keel.learner.sft import SFTTrainer
from unit.learner.offline_helpers import trainer


def _uneven_rows(base):
    """Responses of very different lengths: a per-micro-batch token mean would weight them wrongly."""
    rows = [{"prompt": f"{i}+{i}=", "response": str(2 * i) + " yes" * (i % 5)} for i in range(16)]
    return write_jsonl(rows, base / "uneven.jsonl")


def _one_step(policy, data, out, **trainer_args):
    # eps = 1 makes Adam's first step nearly linear in the gradient (lr * g / (|g| + 1)), so the
    # weights compare the gradients themselves, not the signs of near-zero ones.
    opt = {"lr": 1.0, "eps": 1.0, "max_grad_norm": None}
    cfg = SFTConfig.model_validate(
        {
            "model": {"path": str(policy)},
            "data": {"path": str(data)},
            "trainer": {**trainer(**trainer_args), "optimizer": opt},
            "train": {"epochs": 1, "batch_size": 16, "max_steps": 1, "shuffle": False},
        }
    )
    history, _ = run_offline(SFTTrainer, cfg, out)
    from safetensors.torch import load_file

    return history[0]["sft/loss"], load_file(str(out / "model.safetensors"))


def test_micro_batching_does_not_change_the_update(demo_inputs, tmp_path):
    from safetensors.torch import load_file

    policy, _ = demo_inputs
    data = _uneven_rows(tmp_path)
    loss_a, a = _one_step(policy, data, tmp_path / "a", micro=16)
    loss_b, b = _one_step(policy, data, tmp_path / "b", micro=2)
    assert abs(loss_a - loss_b) < 1e-5
    start = load_file(str(policy / "model.safetensors"))
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    # seen: moved 0.44, worst 7e-7; a per-micro-batch token mean instead gives worst 0.15
    assert moved > 1e-2 and worst < 1e-5, (moved, worst)


def test_two_ranks_on_ray_make_the_same_update_as_one(demo_inputs, ray_session, tmp_path):
    policy, _ = demo_inputs
    data = _uneven_rows(tmp_path)
    loss_one, one = _one_step(policy, data, tmp_path / "one", micro=4)
    loss_two, two = _one_step(policy, data, tmp_path / "two", micro=4, replicas=2, resources={"num_cpus": 0.5})
    assert abs(loss_one - loss_two) < 1e-5
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-5, worst
