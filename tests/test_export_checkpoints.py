"""`engine export` (issue 12): a consolidated HF folder from a mid-run checkpoint of every backend,
and the resume path's refusal of a checkpoint of another model / fallback past a corrupted one.

All training runs are scenarios of the session's shared torchrun job (conftest.py shared_job:
tests/drivers/run_many.py, 2 processes, fp32, tiny GPT-2, dropout 0, constant lr). Each backend runs 4 steps with save_every=2; the step-2 checkpoint (not the
run's final model/) is exported and compared with the final model/ of a DDP run of max_steps=2
(same seed, data, global batch): the per-step losses of these backends equal DDP's (their parity
tests), so the step-2 weights must too. The step-4 export must equal the backend's own final model/
export. The export itself runs in-process (one CPU process, no launch), as `engine export` does.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import assert_one_error_line, losses, run_engine, small_data, tiny_gpt2_dir

TOL = 1e-5  # max |logit difference| against the reference (fp32; TP reorders sums: ~6e-6 measured)
# these backends' step-2 weights equal DDP's bit for bit (the same torch AdamW update order);
# DeepSpeedCPUAdam (offload) and tensor parallelism differ in the last bits
EXACT = {"ddp", "zero0", "zero1", "zero3", "col-torch_ddp", "col-zero2", "cls-ddp", "cls-zero3", "fsdp", "cls-fsdp"}

STEPS = 4

# label -> (task, backend name, backend options)
RUNS = {
    "ddp": ("clm", "ddp", {}),
    "zero0": ("clm", "deepspeed", {"zero_stage": 0}),
    "zero1": ("clm", "deepspeed", {"zero_stage": 1}),
    "zero3": ("clm", "deepspeed", {"zero_stage": 3}),
    "zero2-offload": ("clm", "deepspeed", {"zero_stage": 2, "offload_optimizer": "cpu"}),
    "col-torch_ddp": ("clm", "colossal", {"plugin": "torch_ddp"}),
    "col-zero2": ("clm", "colossal", {"plugin": "low_level_zero", "zero_stage": 2}),
    "col-tp2": ("clm", "colossal", {"plugin": "hybrid", "tp_size": 2}),
    "col-pp2": ("clm", "colossal", {"plugin": "hybrid", "pp_size": 2, "microbatches": 2}),
    "cls-ddp": ("cls", "ddp", {}),
    "cls-zero3": ("cls", "deepspeed", {"zero_stage": 3}),
    "cls-col-tp2": ("cls", "colossal", {"plugin": "hybrid", "tp_size": 2}),
    "fsdp": ("clm", "fsdp", {}),
    "cls-fsdp": ("cls", "fsdp", {"reshard_after_forward": False, "offload": True}),
}
# bf16: the export must be DeepSpeed's fp32 master weights, not the 16-bit module copy
BF16_RUNS = {"zero0-bf16": {"zero_stage": 0}, "zero1-bf16": {"zero_stage": 1}}


def _have(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def config(task: str, model: Path, data: dict, out: Path, backend: str, options: dict, *, steps: int = STEPS,
           save_every: int = 2, **train) -> dict:
    dp = 1 if options.get("tp_size") or options.get("pp_size") else 2
    t = {"max_steps": steps, "micro_batch_size": 8 // dp, "grad_accum": 1, "lr": 2e-3, "scheduler": "constant",
         "warmup_ratio": 0.0, "weight_decay": 0.01, "max_grad_norm": 0.0, "log_every": 1, "seed": 7,
         "precision": "fp32", "adamw_impl": "for_loop", "save_every": save_every, "keep_last": 10,
         "eval_every": 0, "eval_batch_size": 8, **train}
    if task == "clm":
        cfg = {"task": "causal_lm", "model": {"name_or_path": str(model)},
               "data": {"train": str(data["clm"]), "block_size": 32, "validation_split": 0.05,
                        "max_train_samples": 64, "max_eval_samples": 8}}
    else:
        cfg = {"task": "classification", "model": {"name_or_path": str(model)},
               "data": {"train": str(data["cls"]), "glue_task": "mrpc", "block_size": 64,
                        "max_train_samples": 64, "max_eval_samples": 8}}
    return {**cfg, "train": t, "output_dir": str(out),
            "backend": {"name": backend, **({backend: options} if options else {})}}


def scenarios(model: Path, data: dict, root: Path) -> list[dict]:
    out = []
    for label, (task, backend, options) in RUNS.items():
        if backend == "colossal" and not _have("colossalai"):
            continue
        out.append(config(task, model, data, root / label, backend, options))
    for label, options in BF16_RUNS.items():
        out.append(config("clm", model, data, root / label, "deepspeed", options, precision="bf16"))
    # references: DDP stopped by max_steps at 2 (its final model/ = the step-2 weights)
    out.append(config("clm", model, data, root / "ref-clm-2", "ddp", {}, steps=2, save_every=0))
    out.append(config("cls", model, data, root / "ref-cls-2", "ddp", {}, steps=2, save_every=0))
    # resume: an uninterrupted 6-step run, and one stopped at step 4 (checkpoints 2 and 4) that the
    # test corrupts and relaunches
    out.append(config("clm", model, data, root / "full-6", "ddp", {}, steps=6))
    out.append(config("clm", model, data, root / "stopped", "ddp", {}, steps=6, stop_at_step=4))
    out.append(config("clm", model, data, root / "ds-stopped", "deepspeed", {"zero_stage": 3}, steps=6,
                      stop_at_step=2))
    return out


def shared_scenarios(root: Path, model: Path) -> list[dict]:
    """Run in the session's shared 2-process job (conftest.py), with this file's own tiny model."""
    model = tiny_gpt2_dir(root / "models")
    return scenarios(model, small_data(root / "data", shakespeare_lines=2000, mrpc_rows=(100, 16)), root)


@pytest.fixture(scope="module")
def job(shared_job):
    return shared_job.root(__name__)


def _labels() -> list[str]:
    return [label for label, (_, backend, _) in RUNS.items() if backend != "colossal" or _have("colossalai")]


def _load(folder: Path, task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    cls = AutoModelForCausalLM if task == "clm" else AutoModelForSequenceClassification
    return cls.from_pretrained(str(folder)).eval()


def _logits(model):
    import torch
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("label", _labels())
def test_export_of_a_mid_run_checkpoint_holds_that_steps_weights(job, label, tmp_path):
    """step-2 of a 4-step run, exported offline, equals the final model/ of a DDP run of 2 steps;
    step-4 equals the run's own final model/ export."""
    from engine.export import export_checkpoint
    import torch

    task = RUNS[label][0]
    run = job / label
    assert json.loads((run / "run.json").read_text())["step"] == STEPS  # model/ is step 4, not 2
    report = export_checkpoint(run / "checkpoints" / "step-2", tmp_path / "step-2")
    assert report["step"] == 2 and report["backend"] == RUNS[label][1]
    assert report["trimmed"] == []  # the Booster unpads a TP vocabulary (50257 -> 50304) itself when it saves
    out = tmp_path / "step-2"
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    ref = job / f"ref-{task}-2" / "model"
    got, want = _logits(_load(out, task)), _logits(_load(ref, task))
    assert (got - want).abs().max().item() <= TOL, (label, (got - want).abs().max().item())
    if label in EXACT:
        a, b = _weights(out), _weights(ref)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in b), label
    # and it is not the run's final weights
    final = _logits(_load(run / "model", task))
    assert (got - final).abs().max().item() > 1e-3
    export_checkpoint(run / "checkpoints" / "step-4", tmp_path / "step-4")
    a, b = _weights(tmp_path / "step-4"), _weights(run / "model")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in b)
    assert worst == 0.0, (label, worst)


@pytest.mark.parametrize("label", list(BF16_RUNS))
def test_bf16_export_takes_the_fp32_master_weights(job, label, tmp_path):
    """The run's own model/ export is the bf16 compute copy; the checkpoint export is fp32 masters:
    values bf16 cannot hold, which round exactly to that copy."""
    import torch
    from engine.export import export_checkpoint

    report = export_checkpoint(job / label / "checkpoints" / "step-4", tmp_path / "out")
    assert "fp32 master weights" in report["weights"], report
    got, low = _weights(tmp_path / "out"), _weights(job / label / "model")
    assert got.keys() == low.keys()
    assert {t.dtype for t in got.values()} == {torch.float32} and {t.dtype for t in low.values()} == {torch.bfloat16}
    assert all(torch.equal(got[k].to(torch.bfloat16), low[k]) for k in low)
    assert sum(int((t != t.to(torch.bfloat16).float()).sum()) for t in got.values()) > 1000


@pytest.mark.parametrize("label", ["zero3", "cls-zero3", "cls-col-tp2", "fsdp", "cls-fsdp"])
def test_eval_of_any_backends_checkpoint_scores_as_its_export(job, label, tmp_path):
    """`engine eval RUN/checkpoints/step-4` of a DeepSpeed, ColossalAI or FSDP2 run (the backend that wrote
    the files reads their full weights, as for `engine export`) scores the run's eval set as the
    run's own step-4 model/ export does; in-process, one CPU process."""
    if "col" in label and not _have("colossalai"):
        pytest.skip("colossalai is not installed")
    from click.testing import CliRunner
    from launch.cli import main
    reports = {}
    for name, source in (("ckpt", job / label / "checkpoints" / f"step-{STEPS}"), ("export", job / label / "model")):
        result = CliRunner().invoke(main, ["eval", str(source), "--gpus", "0", "--output", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((tmp_path / name).read_text())
    assert reports["ckpt"]["source"] == "checkpoint" and reports["ckpt"]["step"] == STEPS
    got, want = reports["ckpt"]["metrics"], reports["export"]["metrics"]
    assert got.keys() == want.keys() and got["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-6)
    assert {k: v for k, v in got.items() if k != "eval_loss"} == pytest.approx(
        {k: v for k, v in want.items() if k != "eval_loss"}, abs=1e-6)


def test_engine_export_command_and_pipeline(job, tmp_path):
    """The CLI's export (one process, no launch: here in this one), then transformers.pipeline on its output."""
    from click.testing import CliRunner
    from launch.cli import main
    out = tmp_path / "zero3-step-2"
    result = CliRunner().invoke(main, ["export", str(job / "zero3" / "checkpoints" / "step-2"), str(out)])
    assert result.exit_code == 0 and "exported step 2" in result.output and "zero_to_fp32" in result.output
    from transformers import pipeline
    gen = pipeline("text-generation", model=str(out))
    text = gen("ROMEO:", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    # an existing, non-empty output is never overwritten: one line, exit 2
    before = (out / "model.safetensors").stat().st_mtime_ns
    result = CliRunner().invoke(main, ["export", str(job / "zero3" / "checkpoints" / "step-4"), str(out)])
    assert result.exit_code == 2
    assert_one_error_line(result.output, "error: output")
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_export_refuses_what_is_not_a_complete_checkpoint(job, tmp_path):
    import shutil

    from engine.errors import EngineError
    from engine.export import export_checkpoint

    def refused(src, match: str, out=None):
        out = out or tmp_path / "out"
        with pytest.raises(EngineError, match=match) as e:
            export_checkpoint(src, out)
        assert "\n" not in str(e.value)
        assert not out.exists() or not any(out.iterdir())

    refused(job / "ddp", "not a checkpoint: it has no trainer_state.json")
    refused(job / "ddp" / "checkpoints" / "step-99", "does not exist")
    half = job / "ddp" / "checkpoints" / ".tmp-step-2"
    shutil.copytree(job / "ddp" / "checkpoints" / "step-2", half)
    try:
        refused(half, "half-written checkpoint")
    finally:
        shutil.rmtree(half)
    # a run whose config now builds another model (n_embd 48): the first parameter that differs
    other = tmp_path / "other-run"
    shutil.copytree(job / "ddp", other, ignore=shutil.ignore_patterns("model"))
    wider = tiny_gpt2_dir(tmp_path / "models", n_embd=48)
    cfg = (other / "config.yaml").read_text().replace(str(job / "models" / "tiny-gpt2-2x32"), str(wider))
    (other / "config.yaml").write_text(cfg)
    refused(other / "checkpoints" / "step-2", r"parameter transformer\.wte\.weight has shape \[50257, 32\] in the checkpoint but \[50257, 48\] in the model")
    # a truncated weights file
    trunc = tmp_path / "trunc-run"
    shutil.copytree(job / "ddp", trunc, ignore=shutil.ignore_patterns("model"))
    f = trunc / "checkpoints" / "step-2" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    refused(trunc / "checkpoints" / "step-2", "is corrupt")


def _tree(run: Path) -> dict:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))}


@pytest.mark.parametrize("label,other", [("stopped", {"n_embd": 48}), ("ds-stopped", {"n_layer": 3})])
def test_resume_refuses_a_checkpoint_of_another_model(job, tmp_path, label, other):
    """Relaunching a run with a model config that differs from its checkpoint's: one line naming the
    first parameter that differs, exit 2, nothing in the run directory touched."""
    from click.testing import CliRunner
    from launch.cli import main
    run = job / label
    model = tiny_gpt2_dir(tmp_path, **other)
    before = _tree(run)
    # the per-rank entry point in this process: the check comes before any backend or process group
    result = CliRunner().invoke(main, ["train", str(run / "config.yaml"), f"model.name_or_path={model}"])
    assert result.exit_code == 2, result.output[-3000:]
    line = assert_one_error_line(result.output, "error: checkpoint ")
    want = ("parameter transformer.wte.weight (stored as lm_head.weight) has shape [50257, 32] in the checkpoint "
            "but [50257, 48] in the model" if "n_embd" in other else
            "parameter transformer.h.2.ln_1.weight [32] of the model is not in the checkpoint")
    assert want in line, line
    assert _tree(run) == before


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(job):
    """Stopped at step 4 (checkpoints 2 and 4); step-4's weights truncated; the relaunch resumes
    from step-2, says so in one line, and its losses equal the uninterrupted run's."""
    run = job / "stopped"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    f = run / "checkpoints" / "step-4" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = run_engine(["launch", run / "config.yaml", "--gpus", "0", "--nproc", "2", "train.stop_at_step=0"])
    notes = [line for line in proc.stderr.splitlines() if "is unusable" in line]
    assert len(notes) == 1, proc.stderr[-3000:]
    assert "step-4" in notes[0] and "resuming from step-2 instead" in notes[0]
    assert "resumed from step-2" in proc.stderr
    assert losses(run) == losses(job / "full-6") and len(losses(run)) == 6
