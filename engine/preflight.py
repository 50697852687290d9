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
    from engine.checkpoint import check_continue_steps, check_output_dir, resumable_checkpoint
    from engine.config import load_config
    from engine.export import check_checkpoint_fits
    from engine.worker import prepare_run

    from backends.base import backend_class

    warn_once.install()  # the launcher reads data and models too: library warnings once
    cfg = load_config(config, overrides, backend=backend)
    check_quantized_base(cfg)
    notes = backend_class(cfg.backend.name).preflight(cfg.training_spec(), cfg.backend_options(),
                                                      world_size)  # before spawning
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    mode = check_output_dir(Path(cfg.output_dir), continue_run, cfg.train.max_steps)
    task, _, data, conf = prepare_run(cfg)
    backend_class(cfg.backend.name).check_model_config(conf, cfg.training_spec(), cfg.backend_options(), world_size)
    if mode in ("resume", "continue"):  # the checkpoint the workers would resume from is of this model
        newest = resumable_checkpoint(Path(cfg.output_dir))[0]
        if newest is not None:
            check_checkpoint_fits(newest, conf, task.auto_model_class(), cfg)
    space = _checkpoint_space_warning(cfg, conf, task)
    if space:  # about the machine, true whoever holds the run directory: said at once
        from engine.metrics import log
        log(space)
    t = cfg.train
    if not t.max_steps:  # epoch-based: the most steps the run can have (one data-parallel rank) is known now
        import math
        most_steps = max(1, math.ceil(t.epochs * (len(data.train) // (t.micro_batch_size * t.grad_accum))))
        if t.warmup_steps:
            t.warmup_for(most_steps)
        if continue_run:  # no layout gives more: refuse here what the workers would refuse after spawning
            check_continue_steps(Path(cfg.output_dir), most_steps, f"train.epochs={t.epochs:g}",
                                 f" (it gives at most {most_steps} step{'s' if most_steps != 1 else ''})")
    # a new run is announced by the worker that writes its config.yaml: the directory exists from then on
    said = {"resume": ["resuming run in " + cfg.output_dir],
            "continue": ["continuing finished run in " + cfg.output_dir]}.get(mode, [])
    return cfg, [*said, *(notes or ())]


def check_quantized_base(cfg) -> None:
    """QLoRA (model.lora.quantize) only where the backend keeps bitsandbytes' 4-bit layers (the
    backend says: Backend.quantized_base), and only with bitsandbytes installed."""
    import importlib.util

    from backends.base import backend_class, backend_names
    from engine.errors import EngineError
    if not cfg.training_spec().quantized_base:
        return
    if not backend_class(cfg.backend.name).quantized_base:
        able = [n for n in backend_names() if backend_class(n).quantized_base]
        raise EngineError(f"model.lora.quantize={cfg.model.lora.quantize} (QLoRA) is not supported by the "
                          f"{cfg.backend.name} backend: its sharded parameters do not keep bitsandbytes' 4-bit "
                          f"layers; use --backend {' or '.join(able)}, or LoRA without model.lora.quantize")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise EngineError("model.lora.quantize (QLoRA) needs bitsandbytes: pip install bitsandbytes")


def _checkpoint_space_warning(cfg, conf, task) -> str | None:
    """A warning when the filesystem of output_dir has less free space than one checkpoint needs:
    about 12 bytes per parameter (fp32 weights and AdamW's two moments), whatever the layout."""
    import shutil

    import torch
    with torch.device("meta"):  # no memory: only the parameter count
        model = task.auto_model_class().from_config(conf, trust_remote_code=cfg.model.trust_remote_code)
    need = 12 * sum(p.numel() for p in model.parameters())
    where = Path(cfg.output_dir).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free >= need:
        return None
    return (f"warning: {free / 2**20:.1f} MiB free on the filesystem of {cfg.output_dir}, and one checkpoint needs "
            f"about {need / 2**20:.1f} MiB (fp32 weights + AdamW moments): checkpoints will not fit")
