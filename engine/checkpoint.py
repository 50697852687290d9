"""Run state around the backend's own state: where a run stands, RNG, atomic checkpoint dirs.

Layout: OUTPUT_DIR/checkpoints/step-N/ holds the backend's files plus trainer_state.json,
layout.json (the Backend.layout() that wrote them: engine/universal.py) and rng-rank{R}.pt. A checkpoint is written into .tmp-step-N and renamed only when every rank has
finished, so an interrupted write never becomes the one a run resumes from.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import stat
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from backends.base import backend_class
from engine.errors import EngineError

STATE_FILE = "trainer_state.json"
LAYOUT_FILE = "layout.json"  # Backend.layout() of the run that wrote a checkpoint (engine/universal.py)
RUN_FILE = "run.json"  # OUTPUT_DIR/run.json: {"status": "running" | "stopped" | "failed" | "finished", ...}
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class RunState:
    step: int = 0             # optimizer steps done
    samples_seen: int = 0
    tokens_seen: int = 0
    dp_size: int = 1
    global_batch: int = 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def completed_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = completed_checkpoints(output_dir)
    return found[-1][1] if found else None


def read_run_state(output_dir: Path) -> dict:
    """run.json (status, step, reason, ...); {} when there is none or it cannot be read."""
    try:
        state = json.loads((Path(output_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def run_status(output_dir: Path) -> str | None:
    return read_run_state(output_dir).get("status")


def write_run_status(output_dir: Path, status: str, **extra) -> None:
    atomic_write(Path(output_dir) / RUN_FILE, json.dumps({"status": status, **extra}, indent=2))


def check_output_dir(output_dir: Path, continue_run: bool = False, max_steps: int = 0) -> str:
    """'new', 'resume', 'continue' or raise: an existing finished run is never overwritten, and the
    directory must be creatable and writable (probed, leaving nothing behind).

    continue_run (`--continue`): train a finished run further from its final checkpoint;
    max_steps (when set) must exceed the step it finished at."""
    output_dir = Path(output_dir)
    if _is_non_directory(output_dir):
        raise EngineError(f"output_dir {output_dir} is an existing file, not a directory; choose another output_dir")
    if continue_run:
        return _check_continue(output_dir, max_steps)
    if run_status(output_dir) == "finished":
        raise EngineError(f"output_dir {output_dir} already holds a finished run; choose a new output_dir "
                          "(or delete that one), or train it further with --continue and a larger "
                          "train.max_steps / train.epochs")
    mode = "resume" if latest_checkpoint(output_dir) is not None else "new"
    if mode == "new" and (output_dir / "model").exists():
        raise EngineError(f"output_dir {output_dir} already holds a model/ folder; choose a new output_dir")
    _probe_writable(output_dir)
    return mode


def _is_non_directory(path: Path) -> bool:
    """One stat, not exists() then is_dir(): another node's launcher may remove the directory between the two."""
    try:
        return not stat.S_ISDIR(path.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _probe_writable(output_dir: Path) -> None:
    """Create output_dir (and missing parents) and a file in it, then remove all of it again: a
    directory that cannot be made or written is one line now, not a traceback in every worker.
    The launchers of a multi-node job on one shared disk probe the same directory at the same
    moment, making and removing it under each other: a failure is believed only when it repeats."""
    for attempt in range(4):
        try:
            return _make_and_probe(output_dir)
        except (OSError, EngineError):
            if attempt == 3:
                raise
            time.sleep(0.1 * (attempt + 1))


def _make_and_probe(output_dir: Path) -> None:
    missing, p = [], output_dir.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise EngineError(f"output_dir {output_dir} cannot be created: {p} is a file, not a directory")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
                created.append(d)
            except FileExistsError:
                if not d.is_dir():
                    raise
        probe = output_dir / f".engine-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise EngineError(f"output_dir {output_dir} cannot be created or written: {e.strerror or e}{where}") from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


def stop_summary(output_dir: Path) -> str:
    """What the workers of a signalled run did, from run.json: `finished step 3 and wrote checkpoint
    step-3` (the launcher says it whether or not the workers' own lines reached it: Ray's log
    forwarding may drop the last ones at shutdown)."""
    state = read_run_state(output_dir)
    if state.get("status") == "stopped" and isinstance(state.get("step"), int):
        return f"finished step {state['step']} and wrote checkpoint step-{state['step']}"
    return "finished their step and wrote a checkpoint"


def finished_step(output_dir: Path) -> int | None:
    """The step a finished run ended at (run.json), None if it is not finished."""
    state = read_run_state(output_dir)
    return state.get("step") if state.get("status") == "finished" else None


def kept_export_dir(output_dir: Path, step: int) -> Path:
    """Where `--continue` keeps the finished run's model/ export before training further."""
    return Path(output_dir) / f"model-step-{step}"


def _check_continue(output_dir: Path, max_steps: int) -> str:
    status = run_status(output_dir)
    if status != "finished":
        what = "does not hold a run" if status is None else f"holds a run that is {status}, not finished"
        raise EngineError(f"--continue is for a finished run, but output_dir {output_dir} {what}"
                          + ("; relaunch without --continue to resume it" if status else ""))
    step = finished_step(output_dir)
    final = latest_checkpoint(output_dir)
    if step is None or final is None or final.name != f"step-{step}":
        raise EngineError(f"--continue: the finished run in {output_dir} has no final checkpoint "
                          f"checkpoints/step-{step} (train.save_final was false?); start a new run from its export "
                          f"instead: model.name_or_path={output_dir / 'model'}")
    if max_steps:
        check_continue_steps(output_dir, max_steps, f"train.max_steps={max_steps}")
    kept = kept_export_dir(output_dir, step)
    if kept.exists():
        raise EngineError(f"--continue: {kept} already exists, and the model/ export of step {step} would be "
                          "kept there; move it away first")
    return "continue"


def check_continue_steps(output_dir: Path, total_steps: int, what: str, why: str = "") -> None:
    """--continue: the new total (`what` gives it; `why` says how, if not plain) must exceed the
    step the run finished at."""
    step = finished_step(output_dir)
    if step is not None and total_steps <= step:
        raise EngineError(f"--continue: the run finished at step {step}; {what} must be larger{why}")


def atomic_write(path: Path, text: str) -> None:
    """Never read half-written: written beside, then renamed over; a failed write (a full disk)
    leaves the old file as it was and nothing beside it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def mark_run_ended(output_dir: Path, reason: str) -> None:
    """The launcher, once its job has ended: a run.json still saying `running` (the workers died
    before they could say otherwise) says `failed` and why. Best effort (the disk may be full)."""
    state = read_run_state(output_dir)
    if state.get("status") != "running":
        return
    try:
        write_run_status(output_dir, "failed", **{k: v for k, v in state.items() if k != "status"}, reason=reason)
    except OSError:
        pass


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(backend, output_dir: Path, state: RunState, keep_last: int) -> Path:
    """Every rank writes its files into .tmp-step-N; rank 0 then adds the run state and renames it
    step-N. A full disk (on any rank, at any point) ends the run on every rank with one line, the
    partial checkpoint removed and the earlier ones intact."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}"
    if backend.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    full = _agree(_disk_full_on(lambda: write_rank_files(backend, tmp)), gather=True)
    if not full and backend.is_main:
        full = _disk_full_on(lambda: _publish(backend, output_dir, state, keep_last, tmp, final))
    full = _agree(full, gather=False)
    if full:
        raise EngineError(_disk_full_message(backend, output_dir, state, tmp))
    barrier()
    return final


def _publish(backend, output_dir: Path, state: RunState, keep_last: int, tmp: Path, final: Path) -> None:
    (tmp / LAYOUT_FILE).write_text(json.dumps(backend.layout(), indent=1))
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic: the checkpoint exists only once complete
    for _, old in completed_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    root = final.parent
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".universal-step-*")]:  # left by a crash
        shutil.rmtree(stale, ignore_errors=True)


def _disk_full_on(write) -> bool:
    """Run `write`; True when it failed because the disk is full (torch.save's zip writer reports
    that as a RuntimeError about an `unexpected pos`, not as ENOSPC)."""
    try:
        write()
        return False
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        raise
    except RuntimeError as e:
        if "unexpected pos" in str(e) or "No space left" in str(e) or "file write failed" in str(e):
            return True
        raise


def _agree(flag: bool, gather: bool) -> bool:
    """Every rank learns one answer: whether any rank's flag is set (gather), or rank 0's."""
    if not dist.is_initialized():
        return flag
    if gather:
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, flag)
        return any(flags)
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _disk_full_message(backend, output_dir: Path, state: RunState, tmp: Path) -> str:
    """Rank 0 removes the partial checkpoint (which frees its space) and records the run as failed;
    every rank gets the same line: how much a checkpoint needs, how much is free, what is kept."""
    root = tmp.parent
    if backend.is_main:
        partial = _folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    done = completed_checkpoints(output_dir)
    if done:
        need = f"about {_folder_bytes(done[-1][1]) / 2**20:.1f} MiB (the size of {done[-1][1].name})"
        kept = f"the earlier checkpoints are intact (newest: {done[-1][1].name})"
    else:
        need = f"more than the {partial / 2**20:.1f} MiB written" if backend.is_main else "more than was free"
        kept = "no earlier checkpoint exists"
    free = shutil.disk_usage(root).free / 2**20
    if backend.is_main:
        try:
            write_run_status(output_dir, "failed", step=state.step, reason="disk full while writing a checkpoint")
        except OSError:
            pass
    return (f"disk full: checkpoint step-{state.step} did not fit in {root} (it needs {need}; "
            f"{free:.1f} MiB free now that its partial files are removed); {kept}: free space there "
            "and relaunch the same command to resume")


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def write_rank_files(backend, directory: Path) -> None:
    """This rank's part of a checkpoint: the backend's own files and this rank's RNG state."""
    backend.save_state(directory)
    torch.save(_rng_state(), directory / f"rng-rank{backend.rank}.pt")


def saved_layout(directory: Path) -> dict:
    """The Backend.layout() a checkpoint was written in (layout.json), or one line."""
    path = Path(directory) / LAYOUT_FILE
    if not path.is_file():
        raise EngineError(f"checkpoint {directory}: it has no {LAYOUT_FILE} (it names the backend that wrote "
                          "the files; checkpoints from before it are not read)")
    try:
        layout = json.loads(path.read_text())
        if not isinstance(layout, dict) or not isinstance(layout.get("backend"), str):
            raise ValueError("not a JSON object naming its backend")
    except (OSError, ValueError) as e:
        raise EngineError(f"checkpoint {directory}: {LAYOUT_FILE} is unreadable ({type(e).__name__})") from None
    return layout


def checkpoint_reader(directory: Path) -> tuple[type, dict]:
    """The backend class that wrote a checkpoint (layout.json's name) and the layout: every question
    about the checkpoint's own files (complete? names and shapes? full weights? moments?) goes to it."""
    layout = saved_layout(directory)
    try:
        return backend_class(layout["backend"]), layout
    except EngineError as e:
        raise EngineError(f"checkpoint {directory} was written by the {layout['backend']!r} backend, "
                          f"which this engine does not have ({e})") from None


def checkpoint_problem(directory: Path) -> str | None:
    """Why a complete-looking checkpoint cannot be resumed from (trainer_state.json or layout.json
    unparseable, an RNG file or one of the backend's files damaged), or None. Reads headers and zip
    directories only, the same on every rank."""
    from backends.files import check_torch_file
    directory = Path(directory)
    try:
        RunState(**json.loads((directory / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        return f"{STATE_FILE} is unreadable ({type(e).__name__})"
    try:
        reader, layout = checkpoint_reader(directory)
    except EngineError as e:
        return str(e).removeprefix(f"checkpoint {directory}: ")
    where = f"checkpoint {directory.name}"
    try:
        if not (directory / "rng-rank0.pt").is_file():
            return "it has no rng-rank0.pt"
        for f in sorted(directory.glob("rng-rank*.pt")):
            check_torch_file(f, where)
    except EngineError as e:
        return str(e).removeprefix(where + ": ")
    return reader.checkpoint_problem(directory, layout)


def resumable_checkpoint(output_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that is intact, and one note per newer one passed over as unusable.
    When checkpoints exist but none is intact: one-line error (a fresh start would silently throw
    the run away)."""
    skipped = []
    for _, directory in reversed(completed_checkpoints(output_dir)):
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory, skipped
        skipped.append(f"{directory.name} ({problem})")
    if skipped:
        raise EngineError(f"no usable checkpoint to resume from in {Path(output_dir) / 'checkpoints'}: "
                          + "; ".join(skipped))
    return None, []
