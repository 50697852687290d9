"""Real multi-process runs of the DDP backend (CPU, gloo).

The 2-process runs are scenarios of the session's shared torchrun job (conftest.py); the 1-process
runs train in this process (worker.run, as every launched rank does); the resume goes through the
per-rank entry point `engine train` under an external torchrun. Runs are module-scoped and shared
by several assertions."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.config import load_config
from engine.worker import run
from helpers import MRPC, REPO, SHAKESPEARE, losses, metrics
from launch.cli import main

CLM_STEPS = 24
# 9 eval blocks over 2 ranks in batches of 4: rank 0 scores 4 + 1, rank 1 scores 4 and runs its second
# batch as a placeholder forward (collective backends need every rank to), which must not count
EVAL_BLOCKS = 9


def clm_args(model, out, *extra):
    return ["task=causal_lm", f"model.name_or_path={model}", f"data.train={SHAKESPEARE}",
            "data.block_size=64", "data.validation_split=0.02", f"data.max_eval_samples={EVAL_BLOCKS}",
            "train.micro_batch_size=4", f"train.max_steps={CLM_STEPS}", "train.lr=3e-3", "train.warmup_ratio=0.1",
            "train.weight_decay=0.1", "train.log_every=1", "train.eval_every=12", f"output_dir={out}", *extra]


def mrpc_args(model, out):
    return ["task=classification", f"model.name_or_path={model}", f"data.train={MRPC}", "data.glue_task=mrpc",
            "data.block_size=128", "train.micro_batch_size=8", "train.max_steps=30", "train.lr=1e-3",
            "train.log_every=5", f"output_dir={out}"]


def shared_scenarios(root: Path, model: Path) -> list[dict]:
    """The 2-process runs, in the session's shared job."""
    return [load_config(None, clm_args(model, root / "two-procs")).to_dict(),
            load_config(None, mrpc_args(model, root / "mrpc")).to_dict()]


def cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def runs(tiny_gpt2, tmp_path_factory, shared_job):
    root = tmp_path_factory.mktemp("ddp")
    out = {"two_procs": shared_job.root(__name__) / "two-procs"}
    out["accum"] = root / "one-proc-accum2"
    run(load_config(None, clm_args(tiny_gpt2, out["accum"], "train.grad_accum=2")).to_dict())
    # the same job stopped at step 10 (checkpoints at 5 and 10), then relaunched to the end
    out["resumed"] = root / "resumed"
    args = clm_args(tiny_gpt2, out["resumed"], "train.grad_accum=2", "train.save_every=5")
    run(load_config(None, [*args, "train.stop_at_step=10"]).to_dict())
    out["stopped_losses"] = losses(out["resumed"])
    out["stopped_checkpoints"] = sorted(p.name for p in (out["resumed"] / "checkpoints").iterdir())
    out["stopped_status"] = json.loads((out["resumed"] / "run.json").read_text())
    # relaunched under an external torchrun through the per-rank entry point `engine train`
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                              "-m", "launch.cli", "train", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    out["resume_log"] = resumed.stderr
    return out


def test_clm_two_processes_loss_falls(runs):
    run = runs["two_procs"]
    values = losses(run)
    assert len(values) == CLM_STEPS
    assert np.mean(values[-4:]) < values[0] - 1.0, values
    evals = metrics(run, "eval")
    assert [e["step"] for e in evals] == [12, 24]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["perplexity"] == pytest.approx(np.exp(evals[1]["eval_loss"]))
    last = metrics(run)[-1]
    for key in ("lr", "grad_norm", "tokens_per_s", "samples_per_s", "host_rss_mb"):
        assert key in last
    assert (run / "config.yaml").exists() and json.loads((run / "run.json").read_text())["status"] == "finished"
    (memory,) = metrics(run, "memory")  # full fine-tuning: every parameter trains, nothing frozen to count
    assert memory["params"]["trainable"] == memory["params"]["total"] > 0 and "frozen_states_saved_mb" not in memory
    assert len(memory["per_rank"]) == 2 and all(r["host_rss_mb"] > 0 for r in memory["per_rank"])


def test_two_procs_equal_one_proc_with_grad_accum(runs):
    """2 ranks x micro-batch b == 1 rank x grad_accum 2 x b, step for step (fp32)."""
    np.testing.assert_allclose(losses(runs["two_procs"]), losses(runs["accum"]), rtol=0, atol=2e-6)
    e2, e1 = metrics(runs["two_procs"], "eval"), metrics(runs["accum"], "eval")
    # every eval token scored once across ranks: 9 full blocks of 64 tokens, 63 predicted in each
    assert e2[-1]["eval_tokens"] == e1[-1]["eval_tokens"] == EVAL_BLOCKS * 63
    assert e2[-1]["eval_loss"] == pytest.approx(e1[-1]["eval_loss"], abs=1e-5)


def test_resume_is_exact(runs):
    assert len(runs["stopped_losses"]) == 10
    assert runs["stopped_checkpoints"] == ["step-10", "step-5"]
    status = runs["stopped_status"]  # says it stopped, where and why (not "running")
    assert (status["status"], status["step"], status["reason"]) == ("stopped", 10, "train.stop_at_step"), status
    assert "resumed from step-10" in runs["resume_log"]
    assert losses(runs["resumed"]) == losses(runs["accum"])  # bit-identical, no repeated steps
    # and ends with the weights of the uninterrupted run (the two ran in different processes,
    # pytest's and torchrun's: a launch once leaked OMP_NUM_THREADS=1 into pytest's environment, and
    # 1 thread against 2 sums in another order, which the losses above catch). Equal bit for bit in
    # every run but one full-suite run (2026-11-27), where the final weights, after bit-identical
    # losses, differed by up to 1.1e-6; not reproduced alone or since: 1e-5 here, still far below a
    # missed or repeated step (1e-3 and more at lr 1e-3)
    from safetensors.torch import load_file
    resumed, whole = (load_file(runs[k] / "model" / "model.safetensors") for k in ("resumed", "accum"))
    assert resumed.keys() == whole.keys()
    assert max((resumed[k] - whole[k]).abs().max().item() for k in whole) <= 1e-5


def test_checkpoints_keep_last_and_are_safe_to_load(runs):
    ckpts = sorted((runs["resumed"] / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-20", "step-24"]  # keep_last=2
    for f in ("optimizer.pt", "scheduler.pt", "rng-rank0.pt"):
        torch.load(ckpts[-1] / f, weights_only=True)  # no arbitrary unpickling needed


def test_exported_model_generates_in_a_pipeline(runs, tiny_gpt2):
    from transformers import pipeline
    model_dir = runs["two_procs"] / "model"
    assert (model_dir / "model.safetensors").exists()
    generator = pipeline("text-generation", model=str(model_dir))
    text = generator("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    # the CLI shows base and fine-tuned side by side for the same prompt
    out = cli("generate", tiny_gpt2, model_dir, "--prompt", "ROMEO:", "--max-new-tokens", "5")
    assert out.count("--- ") == 2 and str(model_dir) in out and "=== prompt: 'ROMEO:'" in out


def test_plot(runs, tmp_path):
    png = tmp_path / "m.png"
    cli("plot", runs["two_procs"], "-o", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.fixture(scope="module")
def mrpc_run(shared_job):
    return shared_job.root(__name__) / "mrpc"


def test_mrpc_metrics_match_sklearn_on_exported_model(mrpc_run):
    """The engine's distributed eval (sharded over 2 ranks, gathered, deduplicated) gives the
    same accuracy/F1 as sklearn on predictions of the exported model over the whole dev set."""
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from engine.data import read_rows

    final = metrics(mrpc_run, "eval")[-1]
    assert final["eval_samples"] == 408
    tok = AutoTokenizer.from_pretrained(mrpc_run / "model")
    model = AutoModelForSequenceClassification.from_pretrained(mrpc_run / "model").eval()
    rows = read_rows(str(MRPC), "dev", split="validation")
    preds = []
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            chunk = rows[i:i + 32]
            enc = tok([r["#1 String"] for r in chunk], [r["#2 String"] for r in chunk], truncation=True,
                      max_length=128, padding=True, return_tensors="pt")
            preds += model(**enc).logits.argmax(-1).tolist()
    labels = [int(r["Quality"]) for r in rows]
    assert final["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-9)
    assert final["f1"] == pytest.approx(f1_score(labels, preds), abs=1e-9)
