"""`engine export CHECKPOINT_DIR OUT_DIR`: a consolidated HF folder (safetensors + tokenizer) from a
checkpoint of any backend, offline: one CPU process, no launch of the layout that wrote it.

The engine never reads a backend's files itself: layout.json names the backend that wrote the
checkpoint, and that backend's class answers (engine.checkpoint.checkpoint_reader):
`checkpoint_shapes` (names and shapes, cheaply) and `read_weights` (the full weights: DDP's
model.safetensors, DeepSpeed's zero_to_fp32 over its fp32 masters, the Booster's gathered shards).

The model is rebuilt from the run's config.yaml the way the run built it (engine.modeling: tokenizer,
model config; the training data is not needed), the weights are loaded strictly (a missing or
unexpected parameter, or a shape that differs, is one line; rows a TP vocabulary was padded with
are cut back to the model config's vocab_size) and the folder is written with
save_pretrained(safe_serialization=True) next to the tokenizer. OUT_DIR is never overwritten.
`engine eval` loads a checkpoint the same way (load_checkpoint_weights).

Also here: the resume path's check that a checkpoint belongs to the model being trained
(check_checkpoint_fits).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from backends.files import QUANT_STATE
from engine.checkpoint import STATE_FILE, checkpoint_reader
from engine.errors import EngineError


def check_checkpoint_dir(step_dir: Path) -> dict:
    """A complete checkpoint directory (its trainer_state.json parses), else one line."""
    if not step_dir.exists():
        raise EngineError(f"checkpoint {step_dir} does not exist")
    if not step_dir.is_dir():
        raise EngineError(f"checkpoint {step_dir} is a file, not a checkpoint directory (RUN/checkpoints/step-N)")
    if step_dir.name.startswith(".tmp-step-"):
        raise EngineError(f"{step_dir} is a half-written checkpoint (its save never completed); "
                          f"export a complete checkpoints/step-N instead")
    if not (step_dir / STATE_FILE).is_file():
        raise EngineError(f"{step_dir} is not a checkpoint: it has no {STATE_FILE} "
                          "(expected RUN/checkpoints/step-N)")
    try:
        state = json.loads((step_dir / STATE_FILE).read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise EngineError(f"checkpoint {step_dir}: {STATE_FILE} is unreadable ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return state


# -- names and shapes (the resume check) ----------------------------------------------------------
def model_param_shapes(module: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], list[set[str]]]:
    """The full (unpartitioned: ZeRO-3 keeps it in ds_shape) shape of every parameter name, tied
    aliases included (GPT-2's lm_head.weight is transformer.wte.weight), and the groups of names
    that are one tensor (a checkpoint stores such a group under any one of its names)."""
    shapes: dict[str, tuple[int, ...]] = {}
    groups: dict[int, set[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        shapes[name] = tuple(getattr(p, "ds_shape", None) or p.shape)
        groups.setdefault(id(p), set()).add(name)
    return shapes, [g for g in groups.values() if len(g) > 1]


_BUFFERS = (".attn.bias", ".attn.masked_bias")  # old GPT-2 checkpoints carry these causal-mask buffers


def first_difference(ckpt: dict[str, tuple], model: dict[str, tuple], tied: list[set[str]] = ()) -> str | None:
    """One phrase naming the first parameter (in the model's order) whose shape differs, that the
    checkpoint lacks, or that only the checkpoint has; None when they agree. A 4-bit weight (its
    quantization state beside it) holds the model's element count in half as many bytes."""
    alias = {name: group for group in tied for name in group}
    packed = {QUANT_STATE.sub("", k) for k in ckpt if QUANT_STATE.search(k)}
    for name, shape in model.items():
        if name in packed:
            if 2 * math.prod(ckpt[name]) != math.prod(shape):
                return (f"parameter {name} has {2 * math.prod(ckpt[name])} 4-bit values in the checkpoint but "
                        f"{list(shape)} in the model")
        elif name in ckpt:
            if tuple(ckpt[name]) != tuple(shape):
                return (f"parameter {name} has shape {list(ckpt[name])} in the checkpoint but "
                        f"{list(shape)} in the model")
        else:
            stored = next((n for n in sorted(alias.get(name, ())) if n in ckpt), None)
            if stored is None:
                return f"parameter {name} {list(shape)} of the model is not in the checkpoint"
            if tuple(ckpt[stored]) != tuple(shape):
                return (f"parameter {name} (stored as {stored}) has shape {list(ckpt[stored])} in the checkpoint "
                        f"but {list(shape)} in the model")
    for name in ckpt:
        if name not in model and not name.endswith(_BUFFERS) and not QUANT_STATE.search(name):
            return f"the checkpoint has parameter {name} {list(ckpt[name])}, which the model does not"
    return None


# -- the export ---------------------------------------------------------------------------------
def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise EngineError(f"output {out_dir} is an existing file; choose a new folder")
        if any(out_dir.iterdir()):
            raise EngineError(f"output {out_dir} already exists and is not empty; choose a new folder "
                              "(an export never overwrites)")


def _trim_vocab_padding(state: dict, model: torch.nn.Module) -> list[str]:
    """Tensor-parallel vocabularies are padded (ColossalAI: to a multiple of 64 x tp_size): drop
    the padding rows of embedding/output-head tensors whose other dimensions match the model's."""
    trimmed = []
    want = {k: v.shape for k, v in model.state_dict().items()}
    for name, tensor in list(state.items()):
        shape = want.get(name)
        if (shape is not None and tensor.dim() == len(shape) and tensor.dim() >= 1 and tensor.shape[0] > shape[0]
                and tuple(tensor.shape[1:]) == tuple(shape[1:])
                and re.search(r"(wte|embed_tokens|word_embeddings|lm_head|embed_out)", name)):
            state[name] = tensor[:shape[0]].clone()
            trimmed.append(f"{name} {tensor.shape[0]}->{shape[0]}")
    return trimmed


def _fill_tied(state: dict, model: torch.nn.Module) -> None:
    """Tied parameters (GPT-2's wte / lm_head) are stored once (safetensors' save_model keeps one of
    the names): give every name of a tied group the stored tensor."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(tensor.data_ptr(), []).append(name)
    for names in groups.values():
        have = [n for n in names if n in state]
        if have and len(names) > 1:
            for n in names:
                state.setdefault(n, state[have[0]])


def _num_labels(cfg, shapes: dict | None) -> int | None:
    if cfg.task != "classification":
        return None
    if cfg.model.num_labels:
        return cfg.model.num_labels
    if cfg.data.glue_task:
        from engine.tasks.glue import GLUE_TASKS
        return GLUE_TASKS[cfg.data.glue_task].num_labels
    for key in ("score.weight", "classifier.weight"):
        if key in (shapes or {}):
            return int(shapes[key][0])
    raise EngineError("classification checkpoint: cannot tell the number of labels (no model.num_labels, "
                      "glue_task or score weight)")


def checkpoint_model(cfg, conf, auto_class, **extra) -> torch.nn.Module:
    """The whole fp32 model a run's checkpoint loads into (load_checkpoint_weights): built from the
    config, every weight then comes from the checkpoint; for LoRA, PEFT-wrapped as the run was. A
    QLoRA run's checkpoint holds its base in 4 bits: the adapters go onto the pretrained base they
    were trained over, loaded in full precision (as QLoRA merges them)."""
    torch.manual_seed(0)
    quantized = cfg.model.lora is not None and cfg.model.lora.quantize
    if quantized:
        model = auto_class.from_pretrained(cfg.model.name_or_path, config=conf, dtype=torch.float32,
                                           trust_remote_code=cfg.model.trust_remote_code, **extra)
    else:
        model = auto_class.from_config(conf, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code,
                                       **extra)
    if cfg.model.lora is not None:  # base and adapters by PEFT's names
        from engine.modeling import with_lora
        model = with_lora(model, cfg, quiet=True)
    return model


def load_checkpoint_weights(model: torch.nn.Module, step_dir: Path,
                            model_desc: str = "the run's model") -> tuple[str, list[str]]:
    """Load a checkpoint of any backend into a whole fp32 model, strictly: the backend that wrote it
    reads its full weights (by the model's parameter names), TP vocabulary padding is trimmed, tied
    names filled; one line naming the first parameter that does not fit. Returns the weights' source
    (a few words) and the trimmed rows."""
    from engine.universal import ModelNames
    reader, layout = checkpoint_reader(step_dir)
    names = ModelNames.of(model)
    state, source = reader.read_weights(step_dir, layout, names.order, names.aliases)
    # 4-bit weights (QLoRA's base, quantization state beside them) stay out: the model holds them
    # in full precision already (checkpoint_model); the shape check still sees their element count
    packed = {QUANT_STATE.sub("", k) for k in state if QUANT_STATE.search(k)}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()
             if k not in packed and not QUANT_STATE.search(k)}
    trimmed = _trim_vocab_padding(state, model)
    _fill_tied(state, model)
    diff = first_difference({**shapes, **{k: tuple(v.shape) for k, v in state.items()}}, *model_param_shapes(model))
    if diff:
        raise EngineError(f"checkpoint {step_dir} does not fit {model_desc}: {diff}")
    state = {k: v for k, v in state.items() if not k.endswith(_BUFFERS)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") and k not in packed]
    if missing or unexpected:
        raise EngineError(f"checkpoint {step_dir} does not fit {model_desc}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    if "lm_head.weight" not in state and hasattr(model, "tie_weights"):
        model.tie_weights()
    return source, trimmed


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, merged: bool = False) -> dict:
    """Write OUT_DIR; returns a short report (step, source, layout, trimmed rows). A LoRA run's
    checkpoint gives its adapter folder (PEFT's, over the run's base model), or with `merged` the
    adapters merged into the model: a plain HF folder."""
    import yaml

    from engine.config import config_from_dict
    from engine.modeling import load_model_config, load_tokenizer
    from engine.tasks import get_task

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    step_dir, out_dir = Path(checkpoint_dir).expanduser(), Path(out_dir).expanduser()
    trainer_state = check_checkpoint_dir(step_dir)
    _check_out_dir(out_dir)
    run_dir = step_dir.resolve().parent.parent
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        cfg = config_from_dict(raw)
    except (OSError, yaml.YAMLError) as e:
        raise EngineError(f"checkpoint {step_dir}: its run's config {run_dir / 'config.yaml'} is unreadable "
                          f"({type(e).__name__})") from None
    reader, layout = checkpoint_reader(step_dir)
    task = get_task(cfg.task)
    tokenizer = load_tokenizer(cfg)
    shapes = reader.checkpoint_shapes(step_dir, layout) if cfg.task == "classification" else None
    conf = load_model_config(cfg, tokenizer, _num_labels(cfg, shapes))
    if hasattr(conf, "use_cache"):
        conf.use_cache = True  # training turned the KV cache off; generation wants it
    model = checkpoint_model(cfg, conf, task.auto_model_class())
    source, trimmed = load_checkpoint_weights(model, step_dir, f"the run's model ({run_dir / 'config.yaml'})")
    if cfg.model.lora is not None and merged:
        model, source = model.merge_and_unload(), source + "; LoRA adapters merged"
    elif cfg.model.lora is not None:  # the adapter folder names the base it goes on
        model.peft_config["default"].base_model_name_or_path = cfg.model.name_or_path
        source += "; LoRA adapters"
    elif merged:
        raise EngineError(f"--merged is for LoRA runs; the run of {step_dir} trained every weight (export without it)")
    tmp = out_dir.parent / f".{out_dir.name}.export-tmp-{os.getpid()}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"step": trainer_state.get("step"), "checkpoint": str(step_dir), "output": str(out_dir),
            "backend": layout["backend"], "weights": source, "trimmed": trimmed}


def check_checkpoint_fits(directory: Path, conf, auto_class, cfg) -> torch.nn.Module:
    """Before anything in the run directory is touched: the checkpoint a relaunch will resume from
    must hold the parameters (names and shapes) of the model the run config `cfg` builds now. The
    model is built on the meta device (no memory, full shapes under any partitioning); the
    checkpoint's shapes come from the backend that wrote it (headers, recorded shapes). One line
    naming the first difference. Asked by the launcher's preflight and again by each worker (runs
    started without the launcher). Returns the meta model (engine.universal.ModelNames reads its
    parameter names)."""
    with torch.device("meta"):
        model = auto_class.from_config(conf, trust_remote_code=cfg.model.trust_remote_code)
        if cfg.model.lora is not None:  # the run's parameters are the PEFT-wrapped model's
            from engine.modeling import with_lora
            model = with_lora(model, cfg, quiet=True)
    reader, layout = checkpoint_reader(directory)
    ckpt = reader.checkpoint_shapes(directory, layout)
    if ckpt is None:
        return model
    diff = first_difference(ckpt, *model_param_shapes(model))
    if diff:
        raise EngineError(f"checkpoint {directory} was written for a different model than this config builds: "
                          f"{diff}; resume with the run's own model config, or start a new output_dir")
    return model


def write_merged_lora(cfg, conf, auto_class, adapter_dir: Path, out_dir: Path) -> None:
    """A LoRA run's adapters merged into its base model: a plain HF folder (safetensors + the
    tokenizer from adapter_dir) that loads without PEFT. The base is built as the run built it."""
    import dataclasses

    from peft import PeftModel

    from engine.modeling import model_builder
    base_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=None))
    base_cfg.train = dataclasses.replace(cfg.train, gradient_checkpointing=False)
    base = model_builder(base_cfg, conf, auto_class)()
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if hasattr(merged.config, "use_cache"):
        merged.config.use_cache = True  # training turned the KV cache off; generation wants it
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.merge-tmp-{os.getpid()}"
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        for f in Path(adapter_dir).iterdir():  # the tokenizer the run saved beside its adapters
            if f.is_file() and not f.name.startswith(("adapter_", "README")):
                shutil.copy2(f, tmp / f.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
