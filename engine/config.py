"""Typed run configuration: YAML file + dotted KEY=VALUE overrides, validated at the edge.

Every key a user can write is a dataclass field here (or in a backend's own options
dataclass, registered in backends/base.py), so a typo is caught with a did-you-mean
instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import EngineError

TASKS = ("causal_lm", "classification")
PRECISIONS = ("fp32", "bf16", "fp16")
ADAMW_IMPLS = ("auto", "fused", "foreach", "for_loop")  # backends.optim
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile(mode=)
QUANTIZE_TYPES = ("nf4", "fp4")  # bitsandbytes 4-bit data types (QLoRA: nf4)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup", "inverse_sqrt")
BUILTIN_SAMPLE = "builtin:sample"  # the project's own generated corpus and tokenizer
# data.format: how local files are read; auto = by extension (and GLUE TSV for a GLUE task's text files)
DATA_FORMATS = ("auto", "text", "csv", "tsv", "jsonl", "json")
# data.layout: what a causal-LM record holds; auto = by its keys (engine/tasks/instruct.py)
DATA_LAYOUTS = ("auto", "text", "alpaca", "prompt_completion", "chat")
CHAT_TEMPLATES = ("auto", "engine")  # data.chat_template: the tokenizer's own if it has one, or always the engine's

# The HF Trainer's (TrainingArguments + run_clm/run_glue script) names users bring from their own
# recipes -> the engine key that means the same. Used only to explain an unknown key.
HF_TRAINER_NAMES = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.micro_batch_size",
    "per_gpu_train_batch_size": "train.micro_batch_size",
    "train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "weight_decay": "train.weight_decay",
    "adam_beta1": "train.adam_beta1",
    "adam_beta2": "train.adam_beta2",
    "adam_epsilon": "train.adam_eps",
    "max_grad_norm": "train.max_grad_norm",
    "warmup_ratio": "train.warmup_ratio",
    "warmup_steps": "train.warmup_steps",
    "lr_scheduler_type": "train.scheduler",
    "seed": "train.seed",
    "bf16": "train.precision=bf16",
    "fp16": "train.precision=fp16",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "torch_compile": "train.compile",
    "torch_compile_backend": "train.compile_backend",
    "torch_compile_mode": "train.compile_mode",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "save_total_limit": "train.keep_last",
    "logging_steps": "train.log_every",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "per_gpu_eval_batch_size": "train.eval_batch_size",
    "output_dir": "output_dir",
    "model_name_or_path": "model.name_or_path",
    "config_overrides": "model.config",
    "trust_remote_code": "model.trust_remote_code",
    "tokenizer_name": "tokenizer",
    "block_size": "data.block_size",
    "max_seq_length": "data.block_size",
    "train_file": "data.train",
    "validation_file": "data.validation",
    "dataset_name": "data.train",
    "dataset_config_name": "data.hub_config",
    "task_name": "data.glue_task",
    "max_train_samples": "data.max_train_samples",
    "max_eval_samples": "data.max_eval_samples",
    "validation_split_percentage": "data.validation_split (a fraction: 5 % is 0.05)",
}


@dataclass
class LoraConfig:
    """Low-rank adapters through PEFT (`model.lora.r=8`, or `model.lora=true` for these defaults):
    only the adapters (and `modules_to_save`) train; the base model is frozen."""
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: PEFT's default for the model family (GPT-2: c_attn; Llama: q_proj, v_proj)
    modules_to_save: list[str] | None = None  # trained fully besides the adapters; None: the classification head
    merge: bool = False               # also write OUTPUT_DIR/model-merged: base + adapters merged, a plain HF folder
    quantize: str | None = None       # QLoRA: "nf4" or "fp4", the frozen pretrained base in 4 bits (bitsandbytes)


@dataclass
class ModelConfig:
    name_or_path: str | None = None   # hub id or local HF folder; None = build from `config`
    config: dict = field(default_factory=dict)  # architecture overrides (model_type picks the family)
    trust_remote_code: bool = False
    num_labels: int | None = None     # classification; inferred from the GLUE task or the data
    attn_implementation: str | None = None  # None = the model's default (sdpa where supported), eager, flash_attention_2
    lora: LoraConfig | None = None    # train LoRA adapters instead of every weight


@dataclass
class DataConfig:
    train: str | None = None          # .txt file/folder, .csv, .jsonl/.json, .tsv/GLUE folder, or hub name
    validation: str | None = None
    hub_config: str | None = None     # dataset config name for hub datasets (e.g. wikitext-2-raw-v1)
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    glue_task: str | None = None      # mrpc, sst2, rte, cola, qqp, mnli, qnli, stsb
    format: str = "auto"              # auto (by extension) | text | csv | tsv (GLUE-style) | jsonl | json
    layout: str = "auto"              # causal LM: auto (by the records' keys) | text | alpaca | prompt_completion | chat
    chat_template: str = "auto"       # instruction layouts: auto (the tokenizer's, else the engine's) | engine
    block_size: int = 128
    packing: bool = True              # causal LM: text concatenated and cut into blocks (run_clm); instruction
                                      # examples packed whole into rows, no cross-talk; false: one example per row
    validation_split: float = 0.0     # hold out this fraction of train when no validation set is given
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class TrainConfig:
    max_steps: int = 0                # optimizer steps; 0 = derived from epochs
    epochs: float = 1.0
    micro_batch_size: int = 8         # per data-parallel rank
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    adamw_impl: str = "auto"          # auto (fused on CUDA, foreach on CPU) | fused | foreach | for_loop (deterministic)
    warmup_ratio: float = 0.0
    warmup_steps: int = 0             # absolute warm-up steps (HF's warmup_steps); 0 = use warmup_ratio
    scheduler: str = "linear"
    max_grad_norm: float = 1.0        # 0 = no clipping
    seed: int = 42
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    compile: bool = False             # torch.compile the model (ddp, deepspeed, fsdp)
    compile_backend: str | None = None  # torch.compile's backend (None: inductor); aot_eager, cudagraphs, ...
    compile_mode: str | None = None     # torch.compile's mode (None: default); see COMPILE_MODES
    eval_every: int = 0               # steps; 0 = only at the end
    eval_batch_size: int | None = None
    save_every: int = 0               # steps; 0 = only at the end
    keep_last: int = 2
    log_every: int = 10
    stop_at_step: int = 0             # end this session at step N leaving the run resumable (time slots, tests)
    profile_step: int = 0             # profile optimizer step N (torch.profiler): OUTPUT_DIR/profile/
    save_final: bool = True           # false: no final checkpoint and no model export (benchmarks)
    report_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, wandb, mlflow


    def warmup_for(self, total_steps: int) -> int:
        """Scheduler warm-up steps for a run of total_steps (warmup_steps if set, else the ratio)."""
        if self.warmup_steps:
            if self.warmup_steps > total_steps:
                raise EngineError(f"train.warmup_steps={self.warmup_steps} is more than the run's "
                                  f"{total_steps} steps")
            return self.warmup_steps
        return round(self.warmup_ratio * total_steps)


@dataclass
class BackendConfig:
    name: str = "ddp"
    # One section per backend (backend.deepspeed.zero_stage=3), validated by that backend's
    # options dataclass; sections of backends not in use are validated too, so typos surface.
    options: dict = field(default_factory=dict)


@dataclass
class Config:
    task: str = "causal_lm"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: str | None = None      # hub id or folder; None = model.name_or_path
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    output_dir: str | None = None

    # -- derived helpers -------------------------------------------------------------------
    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer or self.model.name_or_path

    def backend_options(self, name: str | None = None) -> Any:
        """The typed options dataclass of a backend (default: the one in use)."""
        from backends.base import backend_spec
        name = name or self.backend.name
        return _build(backend_spec(name).options_cls, self.backend.options.get(name, {}) or {},
                      f"backend.{name}")

    def training_spec(self):
        """What the backend is told about the run (backends never see the whole config)."""
        from backends.base import OptimizerSpec, TrainingSpec
        t = self.train
        return TrainingSpec(task=self.task, precision=t.precision, micro_batch_size=t.micro_batch_size,
                            grad_accum=t.grad_accum, max_grad_norm=t.max_grad_norm,
                            optimizer=OptimizerSpec(t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps,
                                                    t.adamw_impl),
                            scheduler_name=t.scheduler, compile=t.compile, compile_backend=t.compile_backend,
                            compile_mode=t.compile_mode, lora=self.model.lora is not None,
                            quantized_base=self.model.lora is not None and self.model.lora.quantize is not None)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        opts = out["backend"].pop("options")
        out["backend"].update(opts)
        return out


def default_sample_config() -> dict:
    """The embedded default job: a small GPT-2 trained on the project's own generated corpus.

    Sized to finish in about a minute on 2 CPU cores."""
    return {
        "task": "causal_lm",
        "model": {"config": {"model_type": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 128,
                             "n_positions": 256}},
        "tokenizer": BUILTIN_SAMPLE,
        "data": {"train": BUILTIN_SAMPLE, "block_size": 128, "validation_split": 0.05},
        "train": {"max_steps": 200, "micro_batch_size": 8, "lr": 2e-3, "warmup_ratio": 0.1,
                  "scheduler": "cosine", "weight_decay": 0.01, "eval_every": 50, "save_every": 100,
                  "log_every": 10},
    }


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_config(path: str | Path | None, overrides: list[str] = (), *, backend: str | None = None) -> Config:
    """Read YAML (or the embedded default when path is None), apply overrides, validate."""
    if path is None:
        raw = default_sample_config()
    else:
        p = Path(path)
        if p.is_dir():
            raise EngineError(f"config file {p} is a directory; give the YAML file in it (e.g. {p / 'config.yaml'})")
        if not p.is_file():
            raise EngineError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise EngineError(f"config file {p} is not valid YAML: {_yaml_problem(e)}") from None
        except UnicodeDecodeError:
            raise EngineError(f"config file {p} is not UTF-8 text") from None
        if not isinstance(raw, dict):
            raise EngineError(f"config file {p} must hold a mapping at the top level")
    if path is None and any(o.startswith("model.name_or_path=") or
                            (o.startswith("data.train=") and not o.partition("=")[2].startswith("builtin:"))
                            for o in overrides):
        raw = {}  # overrides name the user's own model/data: the sample job's settings do not apply
    if path is None and "data.train=builtin:instruct" in overrides and raw:
        raw["data"]["block_size"] = 256  # the sample's conversations: 4 of 1,200 longer (128: 546 cut short)
    if path is None and any(o.startswith("train.warmup_steps=") for o in overrides):
        raw.get("train", {}).pop("warmup_ratio", None)  # the user's warm-up replaces the sample job's
    if backend is not None:
        raw.setdefault("backend", {})
        raw["backend"] = {**(raw["backend"] or {}), "name": backend}
    for item in overrides:
        apply_override(raw, item)
    cfg = config_from_dict(raw)
    validate(cfg)
    _log_option_notes(cfg)
    return cfg


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The parser's problem with its line and column (1-based), and why a tab breaks YAML."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    tab = "; YAML indents with spaces, not tabs" if "\\t" in problem or "\t" in problem else ""
    return f"{where}{problem}{tab}"


def _log_option_notes(cfg: Config) -> None:
    """One-line notes a backend's options leave (deprecated aliases), once per job: rank 0 only."""
    import os
    from engine.metrics import log
    if os.environ.get("RANK", "0") != "0":
        return
    for name in cfg.backend.options:
        for note in getattr(cfg.backend_options(name), "notes", ()):
            log(note)


def apply_override(raw: dict, item: str) -> None:
    """`train.max_steps=20` -> raw['train']['max_steps'] = 20 (value parsed as YAML)."""
    if "=" not in item:
        raise EngineError(f"override {item!r} is not KEY=VALUE (e.g. train.max_steps=20)")
    key, _, text = item.partition("=")
    keys = key.strip().split(".")
    if not all(keys):
        raise EngineError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    node = raw
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def config_from_dict(raw: dict) -> Config:
    raw = dict(raw)
    backend_raw = dict(raw.pop("backend", None) or {})
    name = backend_raw.pop("name", "ddp")
    options = backend_raw.pop("options", {}) or {}
    options.update(backend_raw)  # backend.deepspeed: {...} written at the top of the section
    cfg = _build(Config, raw, "")
    cfg.backend = BackendConfig(name=name, options=options)
    return cfg


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    if not close:  # lr_rate -> lr, warmup -> warmup_ratio
        close = sorted((c for c in choices if word.startswith(c) or c.startswith(word)), key=len, reverse=True)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _hint(word: str, choices, prefix: str = "") -> str:
    """An HF Trainer name says which engine key means it; a top-level key that belongs to a section
    says which (epochs -> train.epochs); anything else gets a did-you-mean."""
    if word in HF_TRAINER_NAMES:
        return f": the HF Trainer's {word} is {HF_TRAINER_NAMES[word]} here"
    if not prefix:
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
        home = [f"{name}.{word}" for name, cls in sections.items() if word in {f.name for f in dataclasses.fields(cls)}]
        if home:
            return f" (did you mean {home[0]!r}?)"
    return _did_you_mean(word, choices)


def _build(cls, data: Any, prefix: str):
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types by dotted name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EngineError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise EngineError(f"unknown config key {dotted!r}{_hint(str(key), fields, prefix)}")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(tp, value, dotted: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, dotted)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if (value is None or value is False) and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is True and dataclasses.is_dataclass(inner[0]):  # `model.lora=true`: that section's defaults
            return _build(inner[0], {}, dotted)
        return _coerce(inner[0], value, dotted)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise EngineError(f"{dotted} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise EngineError(f"{dotted} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EngineError(f"{dotted} must be a number, got {value!r}")
        if not math.isfinite(value):  # .nan, .inf in YAML; "nan" on the command line
            raise EngineError(f"{dotted} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise EngineError(f"{dotted} must be a string, got {value!r}")
        return str(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise EngineError(f"{dotted} must be a mapping, got {value!r}")
        return value
    if tp is list or origin is list:
        if isinstance(value, str):  # HF habit: report_to: tensorboard, or "tensorboard,wandb"; "none" = []
            value = [] if value.strip().lower() == "none" else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise EngineError(f"{dotted} must be a list, got {value!r}")
        return value
    return value


# --------------------------------------------------------------------------------------------
# Validation (cheap checks only; data and model checks happen in engine.worker.prepare_run)
# --------------------------------------------------------------------------------------------
def _choice(value, choices, name):
    if value not in choices:
        raise EngineError(f"{name} must be one of {', '.join(choices)}; got {value!r}"
                          f"{_did_you_mean(str(value), choices)}")


def _check_compile(t) -> None:
    named = [f"train.{key}={value}" for key, value in
             (("compile_backend", t.compile_backend), ("compile_mode", t.compile_mode)) if value]
    if named and not t.compile:
        raise EngineError(f"{' and '.join(named)} only apply with train.compile=true (torch.compile is off)")
    if t.compile_mode is not None:
        _choice(t.compile_mode, COMPILE_MODES, "train.compile_mode")
    if t.compile_backend is not None:
        import torch._dynamo
        _choice(t.compile_backend, torch._dynamo.list_backends(exclude_tags=()), "train.compile_backend")


def validate(cfg: Config) -> None:
    from backends.base import backend_names
    from engine.tasks.glue import GLUE_TASKS

    _choice(cfg.task, TASKS, "task")
    _choice(cfg.backend.name, backend_names(), "backend.name")
    for name, section in cfg.backend.options.items():
        if name not in backend_names():
            raise EngineError(f"unknown config key 'backend.{name}'{_did_you_mean(name, backend_names())}")
        cfg.backend_options(name)  # raises on unknown keys / bad values in that section
    t, d = cfg.train, cfg.data
    _choice(t.precision, PRECISIONS, "train.precision")
    _choice(t.scheduler, SCHEDULERS, "train.scheduler")
    _choice(t.adamw_impl, ADAMW_IMPLS, "train.adamw_impl")
    if cfg.model.attn_implementation is not None:
        _choice(cfg.model.attn_implementation, ATTN_IMPLEMENTATIONS, "model.attn_implementation")
    _check_compile(t)
    lora = cfg.model.lora
    if lora is not None:
        if lora.r < 1 or lora.alpha <= 0:
            raise EngineError(f"model.lora.r must be at least 1 and model.lora.alpha positive; got r={lora.r}, "
                              f"alpha={lora.alpha}")
        if not 0 <= lora.dropout < 1:
            raise EngineError(f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
        if lora.quantize is not None:
            _choice(lora.quantize, QUANTIZE_TYPES, "model.lora.quantize")
            if not cfg.model.name_or_path:
                raise EngineError("model.lora.quantize (QLoRA) quantizes a pretrained base: set model.name_or_path "
                                  "(a model built from model.config has nothing worth freezing in 4 bits)")
    positive = {"train.micro_batch_size": t.micro_batch_size, "train.grad_accum": t.grad_accum,
                "data.block_size": d.block_size, "train.log_every": t.log_every,
                "train.keep_last": t.keep_last}
    for name, v in positive.items():
        if v < 1:
            raise EngineError(f"{name} must be at least 1, got {v}")
    for name, v in {"train.max_steps": t.max_steps, "train.eval_every": t.eval_every,
                    "train.save_every": t.save_every, "train.stop_at_step": t.stop_at_step,
                    "train.profile_step": t.profile_step,
                    "train.weight_decay": t.weight_decay, "train.max_grad_norm": t.max_grad_norm}.items():
        if v < 0:
            raise EngineError(f"{name} must not be negative, got {v}")
    if t.lr <= 0:
        raise EngineError(f"train.lr must be positive, got {t.lr}")
    for name, v in {"train.adam_beta1": t.adam_beta1, "train.adam_beta2": t.adam_beta2}.items():
        if not 0 <= v < 1:
            raise EngineError(f"{name} must be in [0, 1), got {v}")
    if t.adam_eps <= 0:
        raise EngineError(f"train.adam_eps must be positive, got {t.adam_eps}")
    if not 0 <= t.warmup_ratio < 1:
        raise EngineError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.warmup_steps < 0:
        raise EngineError(f"train.warmup_steps must not be negative, got {t.warmup_steps}")
    if t.warmup_steps and t.warmup_ratio:
        raise EngineError(f"set train.warmup_steps ({t.warmup_steps}) or train.warmup_ratio ({t.warmup_ratio}), "
                          "not both")
    if t.warmup_steps and t.max_steps:
        t.warmup_for(t.max_steps)  # more warm-up than steps: said now (epoch-based totals: when planned)
    if t.max_steps == 0 and t.epochs <= 0:
        raise EngineError("set train.max_steps or a positive train.epochs")
    if not 0 <= d.validation_split < 1:
        raise EngineError(f"data.validation_split must be in [0, 1), got {d.validation_split}")
    _choice(d.format, DATA_FORMATS, "data.format")
    _choice(d.layout, DATA_LAYOUTS, "data.layout")
    _choice(d.chat_template, CHAT_TEMPLATES, "data.chat_template")
    if d.layout not in ("auto", "text") and cfg.task != "causal_lm":
        raise EngineError(f"data.layout={d.layout} needs task: causal_lm (instruction data is learned by a causal LM)")
    from engine.trackers import TRACKERS, require_trackers
    for name in t.report_to:
        _choice(name, tuple(TRACKERS), "train.report_to")
    require_trackers(t.report_to)
    if d.glue_task is not None:
        _choice(d.glue_task, tuple(GLUE_TASKS), "data.glue_task")
        if cfg.task != "classification":
            raise EngineError("data.glue_task needs task: classification")
    if not d.train:
        raise EngineError("data.train is required (a file, folder or hub dataset name)")
    if cfg.model.name_or_path is None and not cfg.model.config:
        raise EngineError("set model.name_or_path (hub id or folder) or model.config (to build from scratch)")
    if cfg.tokenizer_path is None:
        raise EngineError("set tokenizer (hub id or folder) when the model is built from model.config")
