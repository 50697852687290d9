"""`engine eval` (score a model, run or checkpoint without training) and `engine launch --continue`
(train a finished run further), through the real CLI on real data (CPU, gloo).

Runs are module-scoped and shared: a 6-step causal-LM run (trained in this process) continued to
10 steps through `engine train --continue` (the per-rank entry point a launch starts, in this
process; the launcher's own --continue refusals are checked in-process below), and a short MRPC run. Single-process evals
run in-process (CliRunner); one eval uses 2 processes through the torchrun launcher."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from launch.cli import main
from helpers import MRPC, SHAKESPEARE, metrics, run_engine

LR = 3e-3


def clm_args(model, out, steps):
    return ["task=causal_lm", f"model.name_or_path={model}", f"data.train={SHAKESPEARE}", "data.block_size=64",
            "data.validation_split=0.02", "data.max_eval_samples=24", "train.micro_batch_size=4",
            f"train.max_steps={steps}", f"train.lr={LR}", "train.log_every=1", "train.scheduler=linear",
            f"output_dir={out}"]


def train(overrides: list[str]) -> None:
    from engine.config import load_config
    from engine.worker import run
    run(load_config(None, overrides).to_dict())


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
    train(clm_args(tiny_gpt2, run, 6))  # in this process, as a launched rank runs it
    before = {"metrics": (run / "metrics.jsonl").read_text(),
              "export": (run / "model" / "model.safetensors").read_bytes()}
    # the per-rank entry point, in this process too (a launch would add a process start-up, ~10 s
    # here, for what the launcher's own --continue checks add: those are tested in test_cli_errors)
    code, log = cli("train", "--continue", *clm_args(tiny_gpt2, run, 10))
    assert code == 0, log
    return {"dir": run, "before": before, "log": log}


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
    # epoch-based: refused before any process starts too (at most 1 step at 0.0001 epochs)
    code, out = cli("launch", "--gpus", "0", "--continue", *clm_args(tiny_gpt2, run, 0), "train.epochs=0.0001")
    assert_one_line_error(code, out, "train.epochs=0.0001 must be larger", "finished at step 10", "at most 1 step)")
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


# ---------------------------------------------------------------------------------------------
# engine eval
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mrpc(tiny_gpt2, tmp_path_factory):
    root = tmp_path_factory.mktemp("mrpc")
    run = root / "run"
    train(["task=classification", f"model.name_or_path={tiny_gpt2}", f"data.train={MRPC}", "data.glue_task=mrpc",
           "data.max_train_samples=64", "train.micro_batch_size=8", "train.max_steps=4", "train.lr=1e-3",
           f"output_dir={run}"])
    # the export on one process (in-process) and on two (through the torchrun launcher)
    code, out = cli("eval", run / "model", "--data", MRPC, "--glue-task", "mrpc", "--gpus", "0",
                    "--output", root / "one.json", "--predictions", root / "one.jsonl")
    assert code == 0, out
    run_engine(["eval", run / "model", "--data", MRPC / "dev.tsv", "--glue-task", "mrpc", "--gpus", "0",
                "--nproc", "2", "--output", root / "two.json", "--predictions", root / "two.jsonl"], cwd=root)
    return {"run": run, "root": root}


def read_eval(path):
    report = json.loads(path.read_text())
    preds = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()] \
        if path.with_suffix(".jsonl").exists() else None
    return report, preds


def test_mrpc_eval_one_and_two_processes_equal_the_runs_final_eval(mrpc):
    one, preds1 = read_eval(mrpc["root"] / "one.json")
    two, preds2 = read_eval(mrpc["root"] / "two.json")
    logged = metrics(mrpc["run"], "eval")[-1]
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["metrics"]["eval_samples"] == two["metrics"]["eval_samples"] == logged["eval_samples"] == 408
    for key in ("accuracy", "f1"):
        assert one["metrics"][key] == two["metrics"][key] == logged[key]
    assert one["metrics"]["eval_loss"] == pytest.approx(two["metrics"]["eval_loss"], abs=1e-6)
    assert one["metrics"]["eval_loss"] == pytest.approx(logged["eval_loss"], abs=1e-6)
    # every example once, in order, the same predictions on 1 and 2 processes
    assert [p["index"] for p in preds1] == [p["index"] for p in preds2] == list(range(408))
    assert [p["prediction"] for p in preds1] == [p["prediction"] for p in preds2]
    np.testing.assert_allclose([p["logits"] for p in preds1], [p["logits"] for p in preds2], atol=1e-5)


def test_mrpc_predictions_file_agrees_with_sklearn(mrpc):
    from sklearn.metrics import accuracy_score, f1_score, log_loss
    report, preds = read_eval(mrpc["root"] / "two.json")
    y = [p["label"] for p in preds]
    yhat = [p["prediction"] for p in preds]
    # labels are the dev.tsv Quality column, in file order
    rows = (MRPC / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()[1:]
    assert y == [int(r.split("\t")[0]) for r in rows]
    assert report["metrics"]["accuracy"] == pytest.approx(accuracy_score(y, yhat), abs=1e-12)
    assert report["metrics"]["f1"] == pytest.approx(f1_score(y, yhat), abs=1e-12)
    probs = np.array([p["probabilities"] for p in preds])
    assert yhat == probs.argmax(1).tolist()
    assert report["metrics"]["eval_loss"] == pytest.approx(log_loss(y, probs, labels=[0, 1]), abs=1e-5)


def test_eval_of_a_run_dir_and_its_ddp_checkpoint(mrpc, tmp_path):
    """A run directory (its model/, task and eval set from config.yaml) and the run's final ddp
    checkpoint (run's model config + the checkpoint's state dict) score as the export does."""
    one, _ = read_eval(mrpc["root"] / "one.json")
    in_cwd = set(Path.cwd().glob("eval-*.json"))
    for pattern, source in (("eval-2*.json", mrpc["run"]), ("eval-step-4-*.json", mrpc["run"] / "checkpoints" / "step-4")):
        code, out = cli("eval", source, "--gpus", "0")  # the report lands in the run directory by default
        assert code == 0, out
        [written] = mrpc["run"].glob(pattern)
        assert f"written to {written}" in out
        report = json.loads(written.read_text())
        assert report["task"] == "classification" and report["step"] == 4, report
        assert report["metrics"]["accuracy"] == one["metrics"]["accuracy"]
        assert report["metrics"]["eval_loss"] == pytest.approx(one["metrics"]["eval_loss"], abs=1e-6)
    assert set(Path.cwd().glob("eval-*.json")) == in_cwd  # nothing in the folder the user stands in


def test_clm_eval_of_a_continued_run(clm_run, tmp_path):
    out_file = tmp_path / "clm.json"
    code, out = cli("eval", clm_run["dir"], "--gpus", "0", "--output", out_file, "--predictions",
                    tmp_path / "clm.jsonl")
    assert code == 0, out
    report, _ = read_eval(out_file)
    preds = [json.loads(line) for line in (tmp_path / "clm.jsonl").read_text().splitlines()]
    m = report["metrics"]
    assert report["task"] == "causal_lm" and report["step"] == 10
    assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-12)
    logged = metrics(clm_run["dir"], "eval")[-1]
    assert logged["step"] == 10 and m["eval_tokens"] == logged["eval_tokens"]
    assert m["eval_loss"] == pytest.approx(logged["eval_loss"], abs=1e-6)
    assert m["perplexity"] == pytest.approx(logged["perplexity"], rel=1e-5)
    # per-example losses, token-weighted, give the eval loss
    assert [p["index"] for p in preds] == list(range(24))
    weighted = sum(p["loss"] * p["tokens"] for p in preds) / sum(p["tokens"] for p in preds)
    assert weighted == pytest.approx(m["eval_loss"], abs=1e-6)
    # the export kept by --continue is a model folder too, and scores worse than the step-10 model
    code, out = cli("eval", clm_run["dir"] / "model-step-6", "--gpus", "0", "--output", tmp_path / "old.json")
    assert code == 0, out
    assert json.loads((tmp_path / "old.json").read_text())["metrics"]["eval_loss"] != m["eval_loss"]


def test_eval_refusals_are_one_line_and_write_nothing(clm_run, mrpc, tiny_gpt2, tmp_path):
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    code, out = cli("eval", clm_run["dir"], "--gpus", "0", "--output", existing)
    assert_one_line_error(code, out, "--output", "already exists")
    assert existing.read_text() == "{}"
    out_file = tmp_path / "never.json"
    code, out = cli("eval", tiny_gpt2, "--data", MRPC, "--glue-task", "mrpc", "--gpus", "0", "--output", out_file)
    assert_one_line_error(code, out, "no classification head")
    code, out = cli("eval", mrpc["run"] / "model", "--task", "causal_lm", "--data", SHAKESPEARE, "--gpus", "0",
                    "--output", out_file)
    assert_one_line_error(code, out, "not a causal LM")
    code, out = cli("eval", tiny_gpt2, "--gpus", "0", "--output", out_file)
    assert_one_line_error(code, out, "--data is required")
    code, out = cli("eval", mrpc["run"], "--data", "../glue/MRPC", "--gpus", "0", "--output", out_file)
    assert_one_line_error(code, out, "--data ../glue/MRPC: no such file or folder")  # the option given, not data.train
    code, out = cli("eval", tmp_path / "nope", "--gpus", "0", "--output", out_file)
    assert_one_line_error(code, out, "not found")
    # a checkpoint that does not say which backend wrote it (no layout.json), or a damaged one
    import shutil
    run = tmp_path / "run"
    shutil.copytree(mrpc["run"], run, ignore=lambda folder, names: ["model"] if Path(folder) == mrpc["run"] else [])
    step = run / "checkpoints" / "step-4"
    (step / "layout.json").unlink()
    code, out = cli("eval", step, "--gpus", "0", "--output", out_file)
    assert_one_line_error(code, out, f"checkpoint {step} cannot be read", "no layout.json")
    (step / "layout.json").write_text('{"backend": "ddp"}')
    (step / "model.safetensors").write_bytes((step / "model.safetensors").read_bytes()[:100])
    code, out = cli("eval", step, "--gpus", "0", "--output", out_file)
    assert_one_line_error(code, out, f"checkpoint {step} cannot be read", "is corrupt")
    assert not out_file.exists()


@pytest.mark.fast
def test_each_config_change_keeps_its_predecessor(tmp_path):
    """A relaunch with a changed config keeps the old one; a second change must not overwrite the
    first one's copy."""
    import yaml

    from engine.config import load_config
    from engine.worker import _write_config
    for lr in ("1e-3", "2e-3", "3e-3"):
        _write_config(load_config(None, ["task=causal_lm", f"train.lr={lr}", f"output_dir={tmp_path}"]), tmp_path)
    kept = ["config.prev.yaml", "config.prev.2.yaml", "config.yaml"]
    assert [yaml.safe_load((tmp_path / name).read_text())["train"]["lr"] for name in kept] == [1e-3, 2e-3, 3e-3]
