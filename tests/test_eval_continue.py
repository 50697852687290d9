"""`engine eval` (score a model, run or checkpoint without training) and `engine launch --continue`
(train a finished run further), through the real CLI on real data (CPU, gloo).

Launches are module-scoped and shared: a 6-step causal-LM run continued to 10 steps, and a short
MRPC run. Single-process evals run in-process (CliRunner); one eval uses 2 processes."""
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli import main
from helpers import MRPC, SHAKESPEARE, metrics, run_engine

LR = 3e-3


def clm_args(model, out, steps):
    return ["task=causal_lm", f"model.name_or_path={model}", f"data.train={SHAKESPEARE}", "data.block_size=64",
            "data.validation_split=0.02", "data.max_eval_samples=24", "train.micro_batch_size=4",
            f"train.max_steps={steps}", f"train.lr={LR}", "train.log_every=1", "train.scheduler=linear",
            f"output_dir={out}"]


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output.strip()


def assert_one_line_error(code, out, *fragments):
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    for f in fragments:
        assert f in errors[0], errors[0]


@pytest.fixture(scope="module")
def clm_run(tiny_gpt2, tmp_path_factory):
    run = tmp_path_factory.mktemp("clm") / "run"
    run_engine(["launch", "--gpus", "0", "--nproc", "1", *clm_args(tiny_gpt2, run, 6)])
    before = {"metrics": (run / "metrics.jsonl").read_text(),
              "export": (run / "model" / "model.safetensors").read_bytes()}
    cont = run_engine(["launch", "--gpus", "0", "--nproc", "1", "--continue", *clm_args(tiny_gpt2, run, 10)])
    return {"dir": run, "before": before, "log": cont.stderr}


# ---------------------------------------------------------------------------------------------
# --continue
# ---------------------------------------------------------------------------------------------
def test_continue_trains_steps_7_to_10_and_keeps_the_old_export(clm_run):
    run = clm_run["dir"]
    steps = [r["step"] for r in metrics(run)]
    assert steps == list(range(1, 11)), steps
    # metrics.jsonl was appended to: the finished run's events are still there, byte for byte
    assert (run / "metrics.jsonl").read_text().startswith(clm_run["before"]["metrics"])
    assert [e["step"] for e in metrics(run, "eval")] == [6, 10]
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert json.loads((run / "run.json").read_text())["step"] == 10
    # the old export kept as model-step-6/ unchanged; a new model/ written at step 10
    assert (run / "model-step-6" / "model.safetensors").read_bytes() == clm_run["before"]["export"]
    assert (run / "model" / "model.safetensors").read_bytes() != clm_run["before"]["export"]
    assert (run / "checkpoints" / "step-10").is_dir()
    assert "continuing a finished run from step 6 to 10" in clm_run["log"]


def test_continue_rebuilds_the_schedule_for_the_new_total(clm_run):
    """Linear decay to 0 at step 6; continued to 10, step 7 runs at the new schedule's lr at
    step 6 (0.4 x lr), not at 0, and decays to the new end."""
    lrs = [r["lr"] for r in metrics(clm_run["dir"])]
    assert lrs[5] == pytest.approx(LR / 6)  # the last step of the finished 6-step run
    assert lrs[6:] == pytest.approx([LR * (10 - s) / 10 for s in range(6, 10)])
    assert "resumes at step 6 (lr 0.0012)" in clm_run["log"]


def test_plain_relaunch_of_a_finished_run_still_refuses(clm_run, tiny_gpt2):
    run = clm_run["dir"]
    before = sorted(p.name for p in run.iterdir())
    code, out = cli("launch", "--gpus", "0", *clm_args(tiny_gpt2, run, 10))
    assert_one_line_error(code, out, "already holds a finished run", "--continue")
    code, out = cli("launch", "--gpus", "0", "--continue", *clm_args(tiny_gpt2, run, 10))
    assert_one_line_error(code, out, "train.max_steps=10 must be larger", "finished at step 10")
    assert sorted(p.name for p in run.iterdir()) == before


def test_continue_refusals(tiny_gpt2, tmp_path):
    code, out = cli("launch", "--gpus", "0", "--continue", *clm_args(tiny_gpt2, tmp_path / "none", 10))
    assert_one_line_error(code, out, "--continue is for a finished run", "does not hold a run")
    assert not (tmp_path / "none").exists()
    # a finished run without a final checkpoint (train.save_final=false)
    fake = tmp_path / "nosave"
    fake.mkdir()
    (fake / "run.json").write_text(json.dumps({"status": "finished", "step": 6}))
    code, out = cli("launch", "--gpus", "0", "--continue", *clm_args(tiny_gpt2, fake, 10))
    assert_one_line_error(code, out, "has no final checkpoint checkpoints/step-6")
