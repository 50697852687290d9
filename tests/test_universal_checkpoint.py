"""Universal checkpoints (issue 12): a run directory relaunched with another rank count, backend,
ZeRO stage, plugin or TP/PP layout continues from its checkpoint (weights, AdamW moments and
step, LR schedule, data position), with no flag, saying so in one log line.

Every move below (LoRA runs' and a Llama's too) stops a 6-step run at step 2 (its checkpoint),
relaunches the same output_dir under the other layout with the same global batch (grad_accum
adjusted to the rank count), and compares all 6 per-step losses with an uninterrupted 2-rank DDP
run. Step 3's loss checks the weights, steps 4-6 the AdamW moments and step count (a reset moment
changes the next update).
Tolerances as in tests/test_colossal.py: 1e-6 where the math is DDP's, 2e-6 where TP/PP reorder
sums. fp32, dropout 0, torch's for_loop AdamW.

Three rounds of real torchrun jobs (tests/drivers/run_many.py, many scenarios per job): the 2-rank
runs that are stopped (in the session's shared job, conftest.py), then the 1-rank runs (stopped,
and resumed from 2-rank checkpoints), then the 2-rank resumptions.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from drivers.run_many import scenario_log
from helpers import losses, metrics, run_many, small_data, tiny_gpt2_dir
from test_export_checkpoints import _have, config

STEPS, STOP = 6, 2
EXACT, REORDERED = 1e-6, 2e-6
ZERO2_OFFLOAD = {"zero_stage": 2, "offload_optimizer": "cpu"}
HYBRID_TP2 = {"plugin": "hybrid", "tp_size": 2}
HYBRID_PP2 = {"plugin": "hybrid", "pp_size": 2, "microbatches": 2}

# label -> task, (backend, options, ranks) that wrote the checkpoint, the same for the relaunch, tolerance
MOVES = {
    "zero3-to-ddp1": ("clm", ("deepspeed", {"zero_stage": 3}, 2), ("ddp", {}, 1), EXACT),
    "cls-zero3-to-ddp1": ("cls", ("deepspeed", {"zero_stage": 3}, 2), ("ddp", {}, 1), EXACT),
    # the classic one: the same ZeRO stage on fewer ranks (DeepSpeed's files are per rank)
    "zero2-to-zero2-1rank": ("clm", ("deepspeed", {"zero_stage": 2}, 2), ("deepspeed", {"zero_stage": 2}, 1), EXACT),
    "ddp1-to-zero2offload": ("clm", ("ddp", {}, 1), ("deepspeed", ZERO2_OFFLOAD, 2), EXACT),
    "zero1-to-col-zero1": ("clm", ("deepspeed", {"zero_stage": 1}, 2),
                           ("colossal", {"plugin": "low_level_zero", "zero_stage": 1}, 2), EXACT),
    "col-tp2-to-ddp2": ("clm", ("colossal", HYBRID_TP2, 2), ("ddp", {}, 2), REORDERED),
    "cls-col-tp2-to-zero3": ("cls", ("colossal", HYBRID_TP2, 2), ("deepspeed", {"zero_stage": 3}, 2), REORDERED),
    "ddp2-to-col-pp2": ("clm", ("ddp", {}, 2), ("colossal", HYBRID_PP2, 2), REORDERED),
    "cls-ddp2-to-col-tp2": ("cls", ("ddp", {}, 2), ("colossal", HYBRID_TP2, 2), REORDERED),
    # the same layout (DDP's checkpoint does not depend on the rank count): native, no layout line
    "ddp2-to-ddp1": ("clm", ("ddp", {}, 2), ("ddp", {}, 1), EXACT),
    # FSDP2 (DCP files by parameter name and global shape) both ways
    "fsdp2-to-ddp1": ("clm", ("fsdp", {}, 2), ("ddp", {}, 1), EXACT),
    "zero3-to-fsdp2": ("clm", ("deepspeed", {"zero_stage": 3}, 2), ("fsdp", {}, 2), EXACT),
    "ddp1-to-fsdp2offload": ("clm", ("ddp", {}, 1), ("fsdp", {"offload": True}, 2), EXACT),
    "cls-fsdp2-to-col-zero1": ("cls", ("fsdp", {"reshard_after_forward": False}, 2),
                               ("colossal", {"plugin": "low_level_zero", "zero_stage": 1}, 2), EXACT),
    # DCP reshards by itself: one layout whatever the rank count, native like DDP's
    "fsdp2-to-fsdp1": ("clm", ("fsdp", {}, 2), ("fsdp", {}, 1), EXACT),
    # LoRA (issue 21): the adapters and their moments move, the frozen base by its weights alone
    "lora-ddp2-to-zero3": ("lora", ("ddp", {}, 2), ("deepspeed", {"zero_stage": 3}, 2), EXACT),
    "lora-zero3-to-fsdp2": ("lora", ("deepspeed", {"zero_stage": 3}, 2), ("fsdp", {}, 2), EXACT),
    "lora-fsdp2-to-col-zero2": ("lora", ("fsdp", {}, 2), ("colossal", {"plugin": "low_level_zero", "zero_stage": 2}, 2),
                                EXACT),
    # out of two pipeline stages (each wrote its layers' share of the PEFT model and of the adapters' moments)
    "lora-col-pp2-to-ddp1": ("lora", ("colossal", HYBRID_PP2, 2), ("ddp", {}, 1), REORDERED),
    # today's families (issue 21): a Llama (grouped-query attention, untied head) into and out of TP/PP
    "llama-zero3-to-col-tp2": ("llama", ("deepspeed", {"zero_stage": 3}, 2), ("colossal", HYBRID_TP2, 2), REORDERED),
    "llama-col-pp2-to-ddp1": ("llama", ("colossal", HYBRID_PP2, 2), ("ddp", {}, 1), REORDERED),
}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}

NATIVE = {"ddp2-to-ddp1", "fsdp2-to-fsdp1"}  # the same layout: loaded from the native files, no layout line


def _moves() -> dict:
    return {label: m for label, m in MOVES.items()
            if _have("colossalai") or all(side[0] != "colossal" for side in m[1:3])}


def _config(task, model, data, out, backend, options, ranks, **train) -> dict:
    tp_pp = options.get("tp_size", 1) * options.get("pp_size", 1)
    dp = ranks // tp_pp
    # a linear schedule with warm-up: a schedule not set to the resumed step changes the losses
    cfg = config("cls" if task == "cls" else "clm", model, data, out, backend, options, steps=STEPS, save_every=STOP,
                 scheduler="linear", warmup_ratio=0.34, micro_batch_size=4, grad_accum=2 // dp, **train)
    if task == "lora":  # causal LM with LoRA adapters (a larger lr: the adapters start at zero)
        cfg["model"]["lora"] = dict(LORA)
        cfg["train"]["lr"] = 2e-2
    return cfg


def _ds_first(scenarios: list[dict]) -> list[dict]:
    return sorted(scenarios, key=lambda c: c["backend"]["name"] != "deepspeed")  # DeepSpeed owns the group


class _Scenarios:
    """The three rounds of scenarios, in the order they must run."""

    def __init__(self, root: Path) -> None:
        from test_families import family_dir
        self.root, self.moves = root, _moves()
        self.model = tiny_gpt2_dir(root / "models")
        self.llama = family_dir(root / "models", "llama")
        self.data = small_data(root / "data", shakespeare_lines=2000, mrpc_rows=(100, 16))

    def _config(self, task, label, *args, **train) -> dict:
        model = self.llama if task == "llama" else self.model
        return _config(task, model, self.data, self.root / label, *args, **train)

    def before(self, ranks: int) -> list[dict]:
        return [self._config(task, label, b, o, n, stop_at_step=STOP)
                for label, (task, (b, o, n), _, _) in self.moves.items() if n == ranks]

    def after(self, ranks: int) -> list[dict]:
        return [self._config(task, label, b, o, n) for label, (task, _, (b, o, n), _) in self.moves.items() if n == ranks]

    def round_1(self) -> list[dict]:
        """2 ranks: the runs that are stopped, the uninterrupted references, and bf16 (the GPU case:
        ZeRO-1 on 2 ranks -> ZeRO-2 on 1, against an uninterrupted ZeRO-1 bf16 run)."""
        refs = [self._config(task, f"ref-{task}", "ddp", {}, 2) for task in sorted({m[0] for m in self.moves.values()})]
        bf16 = [self._config("clm", "bf16-zero1-to-zero2-1rank", "deepspeed", {"zero_stage": 1}, 2, precision="bf16",
                             stop_at_step=STOP),
                self._config("clm", "ref-bf16-zero1", "deepspeed", {"zero_stage": 1}, 2, precision="bf16")]
        return self.before(2) + refs + bf16

    def round_2(self) -> list[dict]:
        """1 rank: stopped, and resumed from 2-rank checkpoints."""
        bf16 = [self._config("clm", "bf16-zero1-to-zero2-1rank", "deepspeed", {"zero_stage": 2}, 1, precision="bf16")]
        return _ds_first(bf16 + self.before(1) + self.after(1))

    def round_3(self) -> list[dict]:
        """2 ranks: resumed from 1-rank checkpoints."""
        return _ds_first(self.after(2))


def shared_scenarios(root: Path, model: Path) -> list[dict]:
    """Round 1 runs in the session's shared 2-process job (conftest.py); rounds 2 and 3 follow here."""
    return _Scenarios(root).round_1()


@pytest.fixture(scope="module")
def job(shared_job):
    root = shared_job.root(__name__)
    rounds = _Scenarios(root)
    logs = [shared_job.log,
            run_many(rounds.round_2(), root / "job-2", nproc=1).stderr,
            run_many(rounds.round_3(), root / "job-3").stderr]
    return root, "\n".join(logs)


@pytest.mark.parametrize("label", list(_moves()))
def test_a_run_moved_to_another_layout_continues_with_the_same_losses(job, label):
    root, stderr = job
    task, (b0, _, _), (b1, _, _), tol = MOVES[label]
    run = root / label
    got, want = losses(run), losses(root / f"ref-{task}")
    assert [r["step"] for r in metrics(run)] == list(range(1, STEPS + 1))  # each step logged once
    worst = max(abs(a - b) for a, b in zip(got, want))
    assert len(got) == STEPS and worst <= tol, f"{label}: max |loss - uninterrupted| = {worst:.3g}\n{got}\n{want}"
    # the relaunch's own log: resumed from step-2, and the layout line only when the layout changed
    resumed = scenario_log(stderr, run)[-1]
    assert any("resumed from step-2" in line for line in resumed), resumed
    changed = [line for line in resumed if "layout changed" in line]
    if label in NATIVE:
        assert changed == []
    else:
        assert len(changed) == 1 and f"written by {b0}" in changed[0] and f"this run is {b1}" in changed[0], changed
    assert json.loads((run / "checkpoints" / f"step-{STEPS - 2}" / "layout.json").read_text())["backend"] == b1
    assert not list((run / "checkpoints").glob(".universal-*"))  # the scratch folder is gone


def test_a_bf16_run_moves_with_its_fp32_master_weights(job):
    """DeepSpeed bf16 keeps bf16 compute weights and fp32 masters: the move must restore the masters
    (zero_to_fp32 + safe_set_full_fp32_param), not the rounded weights, or the losses would drift."""
    root, _ = job
    got, want = losses(root / "bf16-zero1-to-zero2-1rank"), losses(root / "ref-bf16-zero1")
    assert len(got) == STEPS and max(abs(a - b) for a, b in zip(got, want)) <= EXACT, (got, want)


def test_the_lr_schedule_continues_across_a_layout_change(job):
    """The logged lr after the move equals the uninterrupted run's (the schedule is set to the step)."""
    root, _ = job
    lrs = lambda run: [r["lr"] for r in metrics(run)]  # noqa: E731
    assert lrs(root / "zero3-to-ddp1") == pytest.approx(lrs(root / "ref-clm"), rel=1e-9)


@pytest.mark.fast
def test_the_universal_path_in_one_process_continues_exactly(tiny_gpt2, tmp_path, capfd):
    """DDP in this process: a checkpoint whose layout.json names another layout is read into the
    universal form (engine.universal.read_universal) and put back by DDPBackend.load_universal; the
    run continues as the uninterrupted one, losses and lr, and says so once."""
    from engine.config import load_config
    from engine.worker import run
    from helpers import SHAKESPEARE

    def cfg(out, *extra):
        return load_config(None, ["task=causal_lm", f"model.name_or_path={tiny_gpt2}", f"data.train={SHAKESPEARE}",
                                  "data.block_size=32", "data.max_train_samples=64", "train.micro_batch_size=4",
                                  "train.max_steps=6", "train.lr=1e-3", "train.scheduler=linear",
                                  "train.warmup_steps=2", "train.save_every=2", "train.adamw_impl=for_loop",
                                  "train.log_every=1", f"output_dir={out}", *extra]).to_dict()

    run(cfg(tmp_path / "full"))
    moved = tmp_path / "moved"
    run(cfg(moved, "train.stop_at_step=2"))
    layout = moved / "checkpoints" / "step-2" / "layout.json"
    assert json.loads(layout.read_text()) == {"backend": "ddp"}
    layout.write_text(json.dumps({"backend": "ddp", "written_by": "another layout"}))
    capfd.readouterr()
    run(cfg(moved))
    err = capfd.readouterr().err
    assert err.count("layout changed: checkpoint step-2 was written by ddp (written_by another layout)") == 1, err
    assert losses(moved) == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    lrs = lambda run: [r["lr"] for r in metrics(run)]  # noqa: E731
    assert lrs(moved) == pytest.approx(lrs(tmp_path / "full"), rel=1e-9)
    assert lrs(moved)[2] != lrs(moved)[1]  # the schedule really moves at the resumed step
    # a damaged layout.json makes the checkpoint unusable (the resume falls back past it), not a traceback
    from engine.checkpoint import checkpoint_problem
    step = moved / "checkpoints" / "step-4"
    assert checkpoint_problem(step) is None
    (step / "layout.json").write_text('{"backend": ')
    assert checkpoint_problem(step).startswith("layout.json is unreadable")
