"""keel sft's trainer on tiny data: the loss falls, the output is an HF model that generates."""

from __future__ import annotations

import io
import json

import pytest

from keel.config import SFTConfig
from keel.learner.offline import run_offline
from keel.learner.sft import SFTTrainer
from keel.telemetry.console import Console
from unit.learner.offline_helpers import sft_data, trainer
from unit.telemetry.trackers import tensorboard_scalars


def test_sft_loss_falls_and_the_output_loads(demo_inputs, tmp_path):
    policy, _ = demo_inputs
    cfg = SFTConfig.model_validate(
        {
            "model": {"path": str(policy)},
            "data": {"path": str(sft_data(tmp_path)), "eval_fraction": 0.125, "max_tokens": 16},
            "trainer": trainer(),
            "train": {"epochs": 3, "batch_size": 32},
        }
    )
    shown = io.StringIO()
    history, notes = run_offline(SFTTrainer, cfg, tmp_path / "out", progress=Console("plain", shown))
    train = [m["sft/loss"] for m in history if "sft/loss" in m]
    evals = [m["eval/sft/loss"] for m in history if "eval/sft/loss" in m]
    assert len(train) == 3 * (224 // 32) and len(evals) == 3  # an evaluation after each epoch
    assert sum(train[-3:]) / 3 < 0.7 * sum(train[:3]) / 3, train
    assert evals[-1] < evals[0], evals
    assert notes == []
    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(history) and (out / "keel_config.yaml").exists()
    # the trackers (TensorBoard by default) hold every step's metrics at the step of metrics.jsonl
    scalars = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["sft/loss"]] == list(range(1, 22))
    assert [v for _, v in scalars["sft/loss"]] == pytest.approx(train, rel=1e-6)  # float32 in the event file
    assert [s for s, _ in scalars["eval/sft/loss"]] == [7, 14, 21]
    # each long operation reported its progress: a line as it starts and ends on a non-terminal
    ends = [line.split(":")[1].strip() for line in shown.getvalue().splitlines() if "done in" in line]
    assert ends == ["tokenize rows", "load model", "evaluate", "evaluate", "evaluate", "train"], shown.getvalue()

    from transformers import AutoModelForCausalLM

    from keel.models.loading import load_tokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(out), load_tokenizer(str(out))
    ids = tok("3+4=", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] > ids.shape[1]
