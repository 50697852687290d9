"""Faults on one run directory, with real `engine launch` processes (2 CPU workers): a disk that
fills up while a checkpoint is written, a relaunch while it is still full, a relaunch whose model
does not fit the checkpoint (refused before any process starts, and by the worker itself when a run
is started without the launcher), and the relaunch that resumes exactly.

The full disk is real: a small tmpfs mounted for the test (it needs root, as the project's CI and
development machines have; elsewhere the test is skipped and says so).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from engine.config import load_config
from helpers import ENGINE, REPO, assert_one_error_line, losses, tiny_gpt2_dir

STEPS, SAVE_EVERY = 12, 4
# a GPT-2 built from config on the project's own corpus and tokenizer: ~440 KB per checkpoint
JOB = ["model.config.n_layer=1", "model.config.n_embd=32", "model.config.n_head=2", "model.config.n_positions=64",
       "data.block_size=32", f"train.max_steps={STEPS}", f"train.save_every={SAVE_EVERY}", "train.keep_last=10",
       "train.eval_every=0", "train.micro_batch_size=4", "train.log_every=1", "train.adamw_impl=for_loop"]
SMALL_DISK = "1200k"  # step-4 and step-8 fit, step-12 does not


def shared_scenarios(root: Path, model: Path) -> list[dict]:
    """The uninterrupted run, in the session's shared 2-process job (conftest.py)."""
    return [load_config(None, [*JOB, f"output_dir={root / 'reference'}"]).to_dict()]


def launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    import os
    return subprocess.run([*ENGINE, "launch", "--gpus", "0", "--nproc", "2", *JOB, f"output_dir={out}", *extra],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _tree(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and p.name != ".engine.lock"}


def _fill(folder: Path) -> Path:
    """Write until the filesystem is full."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_fails_cleanly_and_the_run_resumes_exactly_once_space_is_free(small_disk, shared_job, tmp_path):
    out = small_disk / "run"
    # 1. the disk fills up while checkpoint step-12 is written: one line, the partial files gone,
    #    the earlier checkpoints and the run's files intact, the run recorded as failed
    first = launch(out)
    assert first.returncode == 2, first.stderr[-4000:]
    line = assert_one_error_line(first.stderr, "error: disk full: checkpoint step-12 did not fit")
    assert "MiB free" in line and "newest: step-8" in line and "relaunch the same command" in line, line
    assert "E1127" not in first.stderr and "exitcode" not in first.stderr  # no torchelastic dump
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-8"]
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed" and "disk full" in status["reason"], status
    assert len(losses(out)) == STEPS  # the steps ran; only the save failed
    # 2. relaunched while the disk is still full: warned in preflight, refused in one line,
    #    nothing in the run directory changed (no truncated run.json, no *.tmp files)
    filler = _fill(small_disk)
    before = _tree(out)
    full = launch(out)
    assert full.returncode == 2, full.stderr[-4000:]
    assert_one_error_line(full.stderr, "error: cannot write the run lock")
    assert "MiB free on the filesystem" in full.stderr and "checkpoints will not fit" in full.stderr
    assert _tree(out) == before
    # 3. space freed, but relaunched with a model the checkpoint does not belong to: refused before
    #    any process starts, in one line, nothing else; a worker started without the launcher (the
    #    per-rank entry `engine train` under the user's torchrun) refuses it too, before touching the run
    filler.unlink()
    other = tiny_gpt2_dir(tmp_path / "models")
    wrong_model = [f"model.name_or_path={other}", "tokenizer=builtin:sample", "data.train=builtin:sample"]
    wrong = launch(out, *wrong_model)
    assert wrong.returncode == 2, wrong.stderr[-4000:]
    line = assert_one_error_line(wrong.stderr, "error: checkpoint ")
    assert "was written for a different model than this config builds" in line, line
    assert "Traceback" not in wrong.stderr and "E1127" not in wrong.stderr and "[rank" not in wrong.stderr
    from engine.errors import EngineError
    from engine.worker import run
    with pytest.raises(EngineError, match="was written for a different model than this config builds"):
        run(load_config(None, [*JOB, f"output_dir={out}", *wrong_model]).to_dict())
    assert _tree(out) == before
    # 4. the user frees space (here: the oldest checkpoint) and relaunches the same command: it
    #    resumes from step-8 with the losses of the uninterrupted run
    import shutil
    shutil.rmtree(out / "checkpoints" / "step-4")
    ok = launch(out)
    assert ok.returncode == 0, ok.stderr[-4000:]
    assert "resumed from step-8" in ok.stderr
    assert losses(out) == losses(shared_job.root(__name__) / "reference")
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
