"""The per-rank entry point: what torchrun, Ray and `engine train` run in every process."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from engine.errors import EngineError


def prepare_run(cfg):
    """Everything that depends only on config and data (tokenizer, task data, model config).
    Shared by the launcher's preflight and by every rank, so bad input fails before spawning."""
    import dataclasses

    from engine.modeling import (check_attn_implementation, check_block_size, check_weights, head_mismatch,
                                 load_model_config, load_tokenizer)
    from engine.tasks import get_task

    task = get_task(cfg.task)
    tokenizer = load_tokenizer(cfg)
    data = task.prepare(cfg, tokenizer)
    conf = load_model_config(cfg, tokenizer, data.num_labels)
    check_block_size(cfg, conf)
    check_attn_implementation(cfg, conf, task.auto_model_class())
    check_weights(cfg)  # a corrupt weights file: one line here, not a traceback in every worker
    note = head_mismatch(cfg, conf)
    if note:
        data = dataclasses.replace(data, notes=(*data.notes, note))
    return task, tokenizer, data, conf


def oom_advice(cfg) -> str:
    t = cfg.train
    hints = []
    if t.micro_batch_size > 1:
        hints.append(f"train.micro_batch_size={max(1, t.micro_batch_size // 2)} "
                     f"train.grad_accum={t.grad_accum * 2} (same global batch)")
    if not t.gradient_checkpointing:
        hints.append("train.gradient_checkpointing=true")
    if t.precision == "fp32":
        hints.append("train.precision=bf16")
    hints.append("--backend deepspeed backend.deepspeed.zero_stage=3 (shards parameters, gradients and optimizer state)")
    hints.append("backend.deepspeed.offload_optimizer=cpu (optimizer state in host memory)")
    return "out of GPU memory; what would fit instead: " + "; or ".join(hints)


CONTINUE_KEY = "_continue"  # set in the config dict by `--continue`; not a config key


class RankSession:
    """One rank's life around a backend, shared by training (run) and `engine eval`: join the
    process group, make the backend (`start`), and on the way out turn running out of GPU memory
    into the one-line `out_of_memory` advice, close the backend and leave the process group (when
    this session joined it: a caller that set the group up keeps it, as the test drivers do)."""

    def __init__(self, backend_cls, out_of_memory: str) -> None:
        self.backend_cls, self.out_of_memory = backend_cls, out_of_memory
        self.backend = None

    def __enter__(self) -> "RankSession":
        if not torch.cuda.is_available():  # transformers imports an installed DeepSpeed, which warns otherwise
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.owns_process_group = not dist.is_initialized()
        self.backend_cls.init_distributed()
        return self

    def start(self, spec, options):
        self.backend = self.backend_cls(spec, options)
        return self.backend

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if isinstance(exc, torch.OutOfMemoryError):
                raise EngineError(self.out_of_memory) from None
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise EngineError(f"disk full: could not write {exc.filename or 'to the run directory'}; free space "
                                  "there and relaunch the same command (the run resumes from its last complete "
                                  "checkpoint)") from None
        finally:
            if self.backend is not None:
                self.backend.close()
            if self.owns_process_group and dist.is_initialized():
                dist.destroy_process_group()


def run(cfg_dict: dict) -> dict:
    """Run one rank of a training job described by a resolved config dict (plus CONTINUE_KEY:
    train a finished run further, `engine launch --continue`)."""
    from backends.base import backend_class
    from engine import warn_once
    from engine.checkpoint import resumable_checkpoint
    from engine.config import config_from_dict, validate
    from engine.export import check_checkpoint_fits
    from engine.loop import train
    from engine.metrics import log
    from engine.modeling import model_builder
    from engine.universal import ModelNames

    warn_once.install()  # library warnings once per process, not once per step
    cfg_dict = dict(cfg_dict)
    continue_run = bool(cfg_dict.pop(CONTINUE_KEY, False))
    cfg = config_from_dict(cfg_dict)
    validate(cfg)
    with RankSession(backend_class(cfg.backend.name), oom_advice(cfg)) as session:
        task, tokenizer, data, conf = prepare_run(cfg)
        output_dir = Path(cfg.output_dir)
        # a relaunch: the newest intact checkpoint, which must be of this model (checked before
        # config.yaml is rewritten); the loop resumes from it
        resume = resumable_checkpoint(output_dir)
        model_names = None
        if resume[0] is not None:
            meta = check_checkpoint_fits(resume[0], conf, task.auto_model_class(), cfg)
            model_names = ModelNames.of(meta)  # built before any backend: ZeRO-3's zero.Init is not live yet
        backend = session.start(cfg.training_spec(), cfg.backend_options())
        if backend.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            new_run = not (output_dir / "config.yaml").exists()
            _write_config(cfg, output_dir)
            if new_run:  # said once the directory really holds the run (a launch refused before leaves nothing)
                log(f"new run in {output_dir}")
            for note in data.notes:
                log(note)
        if dist.is_initialized():
            dist.barrier()
        result = train(cfg, backend, task, data, model_builder(cfg, conf, task.auto_model_class()),
                       tokenizer, output_dir, resume, continue_run=continue_run, model_names=model_names)
        lora = cfg.model.lora
        if lora is not None and lora.merge and result["finished"] and cfg.train.save_final and backend.is_main:
            from engine.export import write_merged_lora
            write_merged_lora(cfg, conf, task.auto_model_class(), output_dir / "model", output_dir / "model-merged")
            log(f"LoRA adapters merged into the base model: {output_dir / 'model-merged'}")
        return result


def _write_config(cfg, output_dir: Path) -> None:
    from engine.metrics import log
    from engine.checkpoint import atomic_write
    path = output_dir / "config.yaml"
    new = cfg.to_dict()
    if path.exists():
        old = yaml.safe_load(path.read_text()) or {}
        if old == new:
            return  # nothing to write (a relaunch on a full disk must not lose the file)
        changed = sorted(_diff_keys(old, new))
        kept = _free_name(output_dir, "config.prev", ".yaml")  # an earlier change's copy is kept too
        log(f"warning: config differs from the one this run started with ({', '.join(changed)}); "
            f"previous kept as {kept.name}")
        path.rename(kept)
    atomic_write(path, yaml.safe_dump(new, sort_keys=False))


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    """stem.suffix, or stem.2.suffix, stem.3.suffix, ... : the first that does not exist."""
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}.{n}{suffix}"
    return path


def _diff_keys(a, b, prefix="") -> list[str]:
    keys = []
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def run_and_exit(cfg_dict: dict) -> None:
    """Entry for launched processes: a bad-input error is one line on stderr and exit code 2; a run
    stopped by SIGTERM/SIGINT (checkpoint written) exits 128 + the signal number, as shells do."""
    try:
        result = run(cfg_dict)
        if result.get("interrupted_by"):
            sys.exit(128 + result["interrupted_by"])
    except EngineError as e:
        exit_with_one_line(e)


REPORTS_TO_LAUNCHER = "ENGINE_LAUNCHER"  # set by launch/torchrun.py for the workers it starts


def exit_with_one_line(e: EngineError) -> None:
    """A launched process's bad-input end, exit code 2. Under the engine's own launcher the message
    goes into the reply file torchelastic gives each worker (TORCHELASTIC_ERROR_FILE, its own format)
    and the launcher prints it once, whichever rank failed; elsewhere (an external torchrun) rank 0
    prints `error: <message>`."""
    reply = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get(REPORTS_TO_LAUNCHER) and reply:
        import json
        import time
        Path(reply).write_text(json.dumps({"message": str(e), "timestamp": int(time.time())}))
    elif int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
