"""Test-only fault injection for real launched jobs, kept out of the production modules.

A test that needs it puts this folder on PYTHONPATH (tests/helpers.py: HOOKS_ENV), so every Python
process of the job (the launcher, torchrun's workers, Ray's actors) imports this file at start-up
(site imports `sitecustomize`). It then wraps engine functions the moment their modules are
imported, before anything else can bind them:

ENGINE_TEST_PID_DIR=DIR
    every rank writes DIR/rank{RANK}.pid ("<pid> <restart count>") when its worker starts
    (engine.worker.run), so a test can SIGKILL one by PID whatever the launcher.
ENGINE_TEST_PAUSE=WHERE:STEP:SECONDS
    every rank sleeps SECONDS at step STEP, only in the first attempt of a job (restart count 0),
    and with ENGINE_TEST_PID_DIR set first writes DIR/rank{RANK}.paused:
      `saving`  inside checkpoint STEP's write, after this rank's files (engine.checkpoint.write_rank_files),
                before the rename: they are in checkpoints/.tmp-step-STEP;
      `saved`   right after checkpoints/step-STEP became complete (engine.checkpoint.save_checkpoint);
                (in these two a SIGTERM ends the paused rank at once: see _pause_at)
      `step`    right after optimizer step STEP (engine.loop._train_step), before its bookkeeping,
                until the job is asked to stop (SIGTERM, or the Ray driver's stop file) or SECONDS pass.

Without these variables nothing is wrapped.
"""
import functools
import importlib.abc
import os
import signal
import sys
import time
from pathlib import Path


def _restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def _pause_at(where: str, step: int, stop_file: Path | None = None) -> None:
    at, at_step, seconds = os.environ["ENGINE_TEST_PAUSE"].split(":")
    if at != where or int(at_step) != step or _restart_count() != 0:
        return
    if os.environ.get("ENGINE_TEST_PID_DIR"):  # says that this rank is in the pause now
        (Path(os.environ["ENGINE_TEST_PID_DIR"]) / f"rank{os.environ.get('RANK', 0)}.paused").write_text(where)
    if where in ("saving", "saved"):
        # a kill test holds every rank here and SIGKILLs one; the launcher then stops the others
        # with SIGTERM, which the engine would take as preemption (finish the step, checkpoint)
        # and torchrun would wait out its 30 s grace: a paused rank ends at once instead
        previous = _on_sigterm(lambda signum, frame: os._exit(128 + signum))
        time.sleep(float(seconds))
    else:
        # `step`: until the job is asked to stop (SIGTERM, which the engine's own handler still
        # takes, or the Ray driver's stop file), at most SECONDS
        asked = []

        def note_and_chain(signum, frame):
            asked.append(signum)
            if callable(previous):
                previous(signum, frame)
        previous = _on_sigterm(note_and_chain)
        end = time.time() + float(seconds)
        while time.time() < end and not asked and not (stop_file is not None and stop_file.exists()):
            time.sleep(0.05)
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _on_sigterm(handler):
    """Install `handler` for SIGTERM; the one it replaced, or None where none can be set."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a Ray actor): Ray stops actors with SIGKILL anyway
        return None


def _write_pid() -> None:
    path = Path(os.environ["ENGINE_TEST_PID_DIR"]) / f"rank{os.environ.get('RANK', 0)}.pid"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()} {_restart_count()}\n")
    os.replace(tmp, path)


def _patch_worker(module) -> None:
    run = module.run

    @functools.wraps(run)
    def run_writing_pid(*args, **kwargs):
        _write_pid()
        return run(*args, **kwargs)
    module.run = run_writing_pid


def _patch_checkpoint(module) -> None:
    write, save = module.write_rank_files, module.save_checkpoint

    @functools.wraps(write)
    def write_then_pause(backend, directory):
        write(backend, directory)
        _pause_at("saving", int(Path(directory).name.rpartition("-")[2]))  # .tmp-step-N

    @functools.wraps(save)
    def save_then_pause(backend, output_dir, state, *args, **kwargs):
        final = save(backend, output_dir, state, *args, **kwargs)
        _pause_at("saved", state.step)
        return final
    module.write_rank_files, module.save_checkpoint = write_then_pause, save_then_pause


def _patch_loop(module) -> None:
    step = module._train_step

    @functools.wraps(step)
    def step_then_pause(run, window):
        info = step(run, window)
        # the loop counts the step once this returns; .engine-stop: the Ray driver's stop request
        _pause_at("step", run.state.step + 1, Path(run.output_dir) / ".engine-stop")
        return info
    module._train_step = step_then_pause


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, patches: dict) -> None:
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                execute, patch = spec.loader.exec_module, self.patches[name]

                def exec_module(module, execute=execute, patch=patch):
                    execute(module)
                    patch(module)
                spec.loader.exec_module = exec_module
                return spec
        return None


_patches = {}
if os.environ.get("ENGINE_TEST_PID_DIR"):
    _patches["engine.worker"] = _patch_worker
if os.environ.get("ENGINE_TEST_PAUSE"):
    _patches["engine.checkpoint"] = _patch_checkpoint
    _patches["engine.loop"] = _patch_loop
if _patches:
    sys.meta_path.insert(0, _PatchOnImport(_patches))
