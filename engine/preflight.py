"""A job as the launcher settles it before any process starts: the config loaded and validated, the
backend's own checks, output_dir checked, the data and the model read. Bad input fails here, in
one line, with nothing written."""
from __future__ import annotations

import time
from pathlib import Path


def resolve_job(config: str | None, overrides: list[str], backend: str | None, world_size: int | None = None,
                continue_run: bool = False):
    """Load + validate config, settle output_dir, and check data and model before any process starts.
    world_size: the number of processes the launcher will start (all nodes), for the backend's checks.
    Returns the config and the lines to log once the run directory is the launcher's (its lock taken):
    a launch refused for a live directory says nothing else."""
    from engine import warn_once
    from engine.checkpoint import check_continue_steps, check_output_dir
    from engine.config import load_config
    from engine.worker import prepare_run

    from backends.base import backend_class

    warn_once.install()  # the launcher reads data and models too: library warnings once
    cfg = load_config(config, overrides, backend=backend)
    notes = backend_class(cfg.backend.name).preflight(cfg.training_spec(), cfg.backend_options(),
                                                      world_size)  # before spawning
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    mode = check_output_dir(Path(cfg.output_dir), continue_run, cfg.train.max_steps)
    data = prepare_run(cfg)[2]
    t = cfg.train
    if not t.max_steps:  # epoch-based: the most steps the run can have (one data-parallel rank) is known now
        import math
        most_steps = max(1, math.ceil(t.epochs * (len(data.train) // (t.micro_batch_size * t.grad_accum))))
        if t.warmup_steps:
            t.warmup_for(most_steps)
        if continue_run:  # no layout gives more: refuse here what the workers would refuse after spawning
            check_continue_steps(Path(cfg.output_dir), most_steps, f"train.epochs={t.epochs:g}",
                                 f" (it gives at most {most_steps} step{'s' if most_steps != 1 else ''})")
    said = {"resume": "resuming run in ", "continue": "continuing finished run in "}.get(mode, "new run in ")
    return cfg, [said + cfg.output_dir, *(notes or ())]
