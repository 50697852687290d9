"""`engine export CHECKPOINT_DIR OUT_DIR`: a consolidated HF folder (safetensors + tokenizer) from a
checkpoint of any backend, offline: one CPU process, no launch of the layout that wrote it.

What each backend leaves in RUN/checkpoints/step-N/ and how it is read here:
- ddp: model.safetensors, the plain state dict.
- deepspeed: DeepSpeed's native checkpoint under deepspeed/ (tag "deepspeed"). With ZeRO 1-3 the
  fp32 master weights are in the per-rank optimizer files: DeepSpeed's own offline consolidation
  (deepspeed.utils.zero_to_fp32) merges them (also the fp32 masters of a bf16/fp16 run). Stage 0
  in fp32 keeps no such files: the module state dict in mp_rank_00_model_states.pt is the weights.
- colossal: model/, the Booster's sharded torch .bin files (full tensors: the Booster gathers TP
  and ZeRO shards when it saves); rows a TP vocabulary was padded with are cut back to the model
  config's vocab_size.

The model is rebuilt from the run's config.yaml the way the run built it (engine.modeling: tokenizer,
model config; the training data is not needed), the weights are loaded strictly (a missing or
unexpected parameter, or a shape that differs, is one line) and the folder is written with
save_pretrained(safe_serialization=True) next to the tokenizer. OUT_DIR is never overwritten.

Also here: `checkpoint_param_shapes`, the parameter names and shapes a checkpoint holds, read
cheaply (headers, index files, DeepSpeed's recorded shapes), for the resume path's check that a
checkpoint belongs to the model being trained.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from engine.checkpoint import DEEPSPEED_DIR, STATE_FILE, checkpoint_layout
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


# -- reading each backend's weights ------------------------------------------------------------
def read_state_dict(step_dir: Path) -> tuple[dict, str]:
    """The full (consolidated) fp32-or-as-saved state dict of a checkpoint and a word on its source."""
    layout = checkpoint_layout(step_dir)
    if layout == "ddp":
        from engine.modeling import check_safetensors
        from safetensors.torch import load_file
        check_safetensors(step_dir / "model.safetensors", f"checkpoint {step_dir}")
        return load_file(str(step_dir / "model.safetensors"), device="cpu"), "model.safetensors"
    if layout == "deepspeed":
        return _read_deepspeed(step_dir)
    if layout == "colossal":
        return _read_colossal(step_dir / "model"), "model/ (Booster shards)"
    raise EngineError(f"checkpoint {step_dir} holds no weights this engine wrote (model.safetensors, "
                      f"{DEEPSPEED_DIR}/ or model/)")


def _ds_model_states(ds_dir: Path) -> dict:
    files = sorted(ds_dir.glob("*model_states.pt"))
    if not files:
        raise EngineError(f"DeepSpeed checkpoint {ds_dir} has no *_model_states.pt file")
    try:
        return torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)  # shapes: no full read
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt pickle raises many kinds
        raise EngineError(f"DeepSpeed checkpoint file {files[0]} is unreadable ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _read_deepspeed(step_dir: Path) -> tuple[dict, str]:
    ds_dir = step_dir / DEEPSPEED_DIR
    if os.environ.get("DS_ACCELERATOR") is None and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    if list(ds_dir.glob("*optim_states.pt")):
        import contextlib
        import io
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        try:
            # it prints its progress (stdout) and progress bars (stderr); errors still raise
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DEEPSPEED_DIR)
            return dict(state), "DeepSpeed ZeRO fp32 master weights (zero_to_fp32)"
        except ValueError as e:
            if "is not a zero checkpoint" not in str(e):
                raise EngineError(f"DeepSpeed checkpoint {ds_dir} could not be consolidated: "
                                  f"{str(e).splitlines()[0]}") from None
        except (FileNotFoundError, RuntimeError, KeyError) as e:
            raise EngineError(f"DeepSpeed checkpoint {ds_dir} could not be consolidated "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    states = _ds_model_states(ds_dir)  # ZeRO stage 0: the whole module state dict
    module = states.get("module")
    if not module:
        raise EngineError(f"DeepSpeed checkpoint {ds_dir} holds neither ZeRO optimizer partitions nor a module state dict")
    if any(v.is_floating_point() and v.dtype != torch.float32 for v in module.values()):
        masters = (states.get("optimizer") or {}).get("fp32_groups")
        if masters:  # stage 0 under bf16/fp16: the fp32 masters, matched to names by the model (below)
            return {**module, _FP32_GROUPS: masters}, "DeepSpeed stage-0 fp32 master weights"
        return module, "DeepSpeed module state dict (16-bit: no fp32 master copy in the checkpoint)"
    return module, "DeepSpeed module state dict"


_FP32_GROUPS = "__deepspeed_fp32_groups__"


def _apply_fp32_groups(state: dict, model: torch.nn.Module, weight_decay: float) -> bool:
    """DeepSpeed stage 0 with bf16/fp16 keeps the fp32 master weights as lists per optimizer param
    group, in the order the engine built the groups (backends.optim.param_groups: matrices, then
    the rest, each in named_parameters order). Map them back to names; every shape must agree and
    the 16-bit module weights must be the masters rounded, else the masters are not used."""
    from backends.optim import param_groups
    groups = state.pop(_FP32_GROUPS, None)
    if groups is None:
        return False
    names = {id(p): n for n, p in model.named_parameters()}
    ordered = [names[id(p)] for g in param_groups(model, weight_decay) for p in g["params"]]
    flat = [t for g in groups for t in g]
    if len(flat) != len(ordered):
        return False
    masters = {}
    for name, tensor in zip(ordered, flat):
        low = state.get(name)
        if low is None or tuple(low.shape) != tuple(tensor.shape) or not torch.equal(tensor.to(low.dtype), low):
            return False
        masters[name] = tensor.float()
    ptr = {n: t.data_ptr() for n, t in model.state_dict(keep_vars=True).items()}
    by_ptr = {ptr[n]: t for n, t in masters.items()}
    for name in list(state):  # tied aliases (lm_head.weight) take their master too
        if name in ptr and ptr[name] in by_ptr:
            state[name] = by_ptr[ptr[name]]
    return True


def _read_colossal(folder: Path, mmap: bool = False) -> dict:
    from engine.modeling import bin_shards
    files = bin_shards(folder, f"checkpoint {folder}")
    if not files:
        raise EngineError(f"checkpoint folder {folder} holds no .bin shards")
    state = {}
    for f in files:
        try:
            state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=mmap))
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"checkpoint shard {f} is unreadable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return state


# -- shapes only (the resume check) ------------------------------------------------------------
def checkpoint_param_shapes(step_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """Parameter name -> shape as the checkpoint recorded it, without reading tensor data (headers,
    DeepSpeed's recorded shapes, memory-mapped shards); None when nothing is recorded."""
    layout = checkpoint_layout(step_dir)
    if layout == "ddp":
        from safetensors import safe_open
        from engine.modeling import check_safetensors
        check_safetensors(step_dir / "model.safetensors", f"checkpoint {step_dir}")
        with safe_open(str(step_dir / "model.safetensors"), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if layout == "deepspeed":
        states = _ds_model_states(step_dir / DEEPSPEED_DIR)
        shapes: dict[str, tuple[int, ...]] = {}
        for group in states.get("param_shapes") or []:
            shapes.update({k: tuple(v) for k, v in group.items()})
        if not shapes:  # stage 0: the module state dict itself
            shapes = {k: tuple(v.shape) for k, v in (states.get("module") or {}).items()}
        return shapes or None
    if layout == "colossal":  # the Booster's shards hold full (gathered, unpadded) tensors: memory-mapped
        return {k: tuple(v.shape) for k, v in _read_colossal(step_dir / "model", mmap=True).items()}
    return None


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
    checkpoint lacks, or that only the checkpoint has; None when they agree."""
    alias = {name: group for group in tied for name in group}
    for name, shape in model.items():
        if name in ckpt:
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
        if name not in model and not name.endswith(_BUFFERS):
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


def _num_labels(cfg, state: dict) -> int | None:
    if cfg.task != "classification":
        return None
    if cfg.model.num_labels:
        return cfg.model.num_labels
    if cfg.data.glue_task:
        from engine.tasks.glue import GLUE_TASKS
        return GLUE_TASKS[cfg.data.glue_task].num_labels
    for key in ("score.weight", "classifier.weight"):
        if key in state:
            return int(state[key].shape[0])
    raise EngineError("classification checkpoint: cannot tell the number of labels (no model.num_labels, "
                      "glue_task or score weight)")


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> dict:
    """Write OUT_DIR; returns a short report (step, source, layout, trimmed rows)."""
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
    state, source = read_state_dict(step_dir)
    task = get_task(cfg.task)
    tokenizer = load_tokenizer(cfg)
    conf = load_model_config(cfg, tokenizer, _num_labels(cfg, state))
    if hasattr(conf, "use_cache"):
        conf.use_cache = True  # training turned the KV cache off; generation wants it
    torch.manual_seed(0)
    model = task.auto_model_class().from_config(conf, dtype=torch.float32,
                                                trust_remote_code=cfg.model.trust_remote_code)
    if _FP32_GROUPS in state and not _apply_fp32_groups(state, model, cfg.train.weight_decay):
        source = "DeepSpeed module state dict (16-bit: its fp32 master copy did not match the model's parameters)"
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    trimmed = _trim_vocab_padding(state, model)
    _fill_tied(state, model)
    diff = first_difference({k: tuple(v.shape) for k, v in state.items()}, *model_param_shapes(model))
    if diff:
        raise EngineError(f"checkpoint {step_dir} does not fit the run's model ({run_dir / 'config.yaml'}): {diff}")
    state = {k: v for k, v in state.items() if not k.endswith(_BUFFERS)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise EngineError(f"checkpoint {step_dir} does not fit the run's model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    if "lm_head.weight" not in state and hasattr(model, "tie_weights"):
        model.tie_weights()
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
            "backend": checkpoint_layout(step_dir), "weights": source, "trimmed": trimmed}


def check_checkpoint_fits(directory: Path, conf, auto_class, trust_remote_code: bool = False) -> torch.nn.Module:
    """Before anything in the run directory is touched: the checkpoint a relaunch will resume from
    must hold the parameters (names and shapes) of the model the config builds now. The model is
    built on the meta device (no memory, full shapes under any partitioning); the checkpoint's
    shapes are read from headers/recorded shapes. One line naming the first difference. Returns
    the meta model (engine.universal.ModelNames reads its parameter names)."""
    with torch.device("meta"):
        model = auto_class.from_config(conf, trust_remote_code=trust_remote_code)
    ckpt = checkpoint_param_shapes(directory)
    if ckpt is None:
        return model
    diff = first_difference(ckpt, *model_param_shapes(model))
    if diff:
        raise EngineError(f"checkpoint {directory} was written for a different model than this config builds: "
                          f"{diff}; resume with the run's own model config, or start a new output_dir")
    return model
