"""`engine eval`: score a model, a run or a checkpoint on an eval set without training.

What is evaluated (SOURCE):
- an HF model folder (e.g. RUN/model, RUN/model-step-N, or any save_pretrained folder) or a hub id;
  when the folder sits in a run directory, that run's config.yaml gives the defaults;
- a run directory: its model/ export, with its config.yaml for task, data and batch defaults;
- a checkpoint RUN/checkpoints/step-N of any backend: the run's model config built as in training,
  plus the checkpoint's full weights as the backend that wrote them reads them (as `engine export`).

Scoring is the training loop's own eval (engine.loop.evaluate_examples): every example on exactly
one rank, reduced through the task, so 1 and N processes give the same metrics, and the same as
the run's logged eval on the same eval set. The ranks run the ddp backend; one process runs
in-process, several go through the torchrun launcher like `engine launch`.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from engine.errors import EngineError

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json")


@dataclass
class Source:
    kind: str                      # model | run | checkpoint | hub | adapter
    model: str | None              # HF folder or hub id to from_pretrained (None for a checkpoint)
    run_dir: Path | None = None    # the run whose config.yaml gives defaults
    checkpoint: Path | None = None
    step: int | None = None        # the checkpoint's / finished run's step when known
    adapter: str | None = None     # a PEFT LoRA adapter folder, loaded over `model` (its base)
    task: str | None = None        # what the adapter was trained for, when it says


def _adapter(folder: Path) -> tuple[str, str | None] | None:
    """(base model, task) of a PEFT adapter folder; None when `folder` is not one."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"adapter {folder}: adapter_config.json is unreadable ({type(e).__name__})") from None
    base = conf.get("base_model_name_or_path")
    if not base:
        raise EngineError(f"adapter {folder} does not name its base model (adapter_config.json "
                          "base_model_name_or_path); evaluate it from its run or checkpoint instead")
    return base, {"SEQ_CLS": "classification", "CAUSAL_LM": "causal_lm"}.get(conf.get("task_type"))


def _run_config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise EngineError(f"cannot read the run config {run_dir / 'config.yaml'}: {e}") from None


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "run.json").is_file() or (path / "checkpoints").is_dir())


def resolve_source(arg: str) -> Source:
    from engine.checkpoint import STATE_FILE, checkpoint_problem, finished_step
    p = Path(arg).expanduser()
    if p.is_dir():
        if (p / STATE_FILE).is_file() and p.parent.name == "checkpoints":
            run_dir = p.parent.parent
            if not _is_run(run_dir):
                raise EngineError(f"checkpoint {p}: its run directory {run_dir} has no config.yaml")
            problem = checkpoint_problem(p)
            if problem is not None:
                raise EngineError(f"checkpoint {p} cannot be read: {problem}")
            step = json.loads((p / STATE_FILE).read_text()).get("step")
            return Source("checkpoint", None, run_dir, p, step)
        if _is_run(p):
            adapter = _adapter(p / "model")
            if adapter:  # a LoRA run: its adapters over its base model
                return Source("run", adapter[0], p, None, finished_step(p), adapter=str(p / "model"), task=adapter[1])
            if not (p / "model" / "config.json").is_file():
                raise EngineError(f"run {p} has no model/ export (not finished, or train.save_final=false); "
                                  f"evaluate one of its checkpoints: engine eval {p / 'checkpoints' / 'step-N'}")
            return Source("run", str(p / "model"), p, None, finished_step(p))
        adapter = _adapter(p)
        if adapter:
            run_dir = p.parent if _is_run(p.parent) else None
            return Source("adapter", adapter[0], run_dir, adapter=str(p), task=adapter[1])
        if (p / "config.json").is_file():
            run_dir = p.parent if _is_run(p.parent) else None
            return Source("model", str(p), run_dir)
        raise EngineError(f"{p} is not an HF model folder (no config.json), a run directory (no config.yaml) "
                          "or a checkpoint directory (checkpoints/step-N)")
    from engine.hub import check_hub_name, looks_like_hub_id
    if not looks_like_hub_id(arg):
        raise EngineError(f"model, run or checkpoint not found: {arg}")
    check_hub_name(arg, "engine eval")
    return Source("hub", arg)


def _architectures(model: str) -> list[str]:
    from transformers import AutoConfig
    try:
        return list(AutoConfig.from_pretrained(model).architectures or [])
    except (OSError, ValueError) as e:
        raise EngineError(f"model {model!r} could not be configured: {str(e).splitlines()[0]}") from None


def build_config(source: Source, *, data: str | None, glue_task: str | None, task: str | None,
                 batch_size: int | None, overrides: list[str]):
    """The run config an eval runs under: the run's own (when there is one) with the model, data
    and task settled from SOURCE and the options; KEY=VALUE overrides last."""
    from engine.config import apply_override, config_from_dict, validate

    raw = _run_config(source.run_dir) if source.run_dir else {}
    raw.pop("output_dir", None)
    raw["backend"] = {"name": "ddp"}
    archs = _architectures(source.model) if source.model else []
    if task is None and source.task:  # an adapter says what it was trained for (its base may be a causal LM)
        task, archs = source.task, []
    if task is None:
        if glue_task or any(a.endswith("ForSequenceClassification") for a in archs):
            task = "classification"
        elif archs:
            task = "causal_lm"
        else:
            task = raw.get("task", "causal_lm")
    raw["task"] = task
    if source.model is not None:
        model_dir = Path(source.adapter or source.model)  # a run saves its tokenizer beside its adapters
        has_tokenizer = any((model_dir / f).is_file() for f in TOKENIZER_FILES) or source.kind == "hub"
        old_tokenizer = raw.get("tokenizer") or (raw.get("model") or {}).get("name_or_path")
        raw["model"] = {**{k: v for k, v in (raw.get("model") or {}).items() if k in ("trust_remote_code",
                                                                                        "attn_implementation")},
                        "name_or_path": source.model}
        raw["tokenizer"] = str(model_dir) if has_tokenizer or not old_tokenizer else old_tokenizer
    d = dict(raw.get("data") or {})
    if data is not None:
        from engine.data import looks_local
        if looks_local(data) and not Path(data).expanduser().exists():  # named as the user gave it
            raise EngineError(f"--data {data}: no such file or folder (from {Path.cwd()})")
        for key in ("validation_split", "max_train_samples", "max_eval_samples", "hub_config"):
            d.pop(key, None)
        d["train"] = d["validation"] = data
    elif source.run_dir is None:
        raise EngineError("--data is required: there is no run config to take the eval set from "
                          "(a .txt/.csv/.jsonl/.tsv file, a GLUE folder or a hub dataset name)")
    if glue_task is not None:
        d["glue_task"] = glue_task
    if task != "classification":
        d.pop("glue_task", None)
    raw["data"] = d
    t = dict(raw.get("train") or {})
    t.update(compile=False, gradient_checkpointing=False)
    if batch_size is not None:
        t["eval_batch_size"] = batch_size
    raw["train"] = t
    for item in overrides:
        apply_override(raw, item)
    cfg = config_from_dict(raw)
    validate(cfg)
    if cfg.task == "classification" and archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise EngineError(f"{source.model} is a {archs[0]} with no classification head: evaluating it for "
                          "classification would score a randomly initialised head (drop --glue-task/--task, "
                          "or pass a *ForSequenceClassification model)")
    if cfg.task == "causal_lm" and any(a.endswith("ForSequenceClassification") for a in archs):
        raise EngineError(f"{source.model} is a {archs[0]}, not a causal LM; evaluate it with --task classification")
    return cfg


def preflight(cfg, source: Source) -> int:
    """Data, tokenizer and model config checked before any process starts; returns the eval set size."""
    from engine.worker import prepare_run
    _, _, data, conf = prepare_run(cfg)
    if data.eval is None or len(data.eval) == 0:
        raise EngineError("there is no eval set: the run had no validation data; pass --data FILE")
    if source.model is not None and source.adapter is None and cfg.task == "classification":
        from transformers import AutoConfig
        saved = AutoConfig.from_pretrained(source.model, trust_remote_code=cfg.model.trust_remote_code).num_labels
        if saved != data.num_labels:
            raise EngineError(f"{source.model} has {saved} labels but the eval data has {data.num_labels}")
    return len(data.eval)


def check_new_file(path: str | None, option: str) -> None:
    if path is None:
        return
    p = Path(path)
    if p.exists():
        raise EngineError(f"{option} {p} already exists; pass another path or delete it (it is never overwritten)")
    if not p.parent.is_dir():
        raise EngineError(f"{option} {p}: folder {p.parent} does not exist")


def _builder(cfg, conf, auto_class, source: Source):
    def build() -> torch.nn.Module:
        model = _load(cfg, conf, auto_class, source)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False  # as in training: no KV cache (packed batches need it off)
        return model
    return build


def _load(cfg, conf, auto_class, source: Source) -> torch.nn.Module:
    """The model SOURCE names: a checkpoint of any backend, an adapter over its base, or a model folder."""
    extra = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    if source.checkpoint is not None:  # any backend's: the one that wrote it reads its full weights
        from engine.export import checkpoint_model, load_checkpoint_weights
        model = checkpoint_model(cfg, conf, auto_class, **extra)
        load_checkpoint_weights(model, source.checkpoint, "the run's model config")
        return model
    if source.adapter is not None:
        from peft import PeftModel
        base = auto_class.from_pretrained(cfg.model.name_or_path, config=conf, dtype=torch.float32,
                                          trust_remote_code=cfg.model.trust_remote_code, **extra)
        # trainable: the backend builds its (unused) optimizer over the parameters that train
        return PeftModel.from_pretrained(base, source.adapter, is_trainable=True)
    model, info = auto_class.from_pretrained(cfg.model.name_or_path, config=conf, dtype=torch.float32,
                                             trust_remote_code=cfg.model.trust_remote_code,
                                             output_loading_info=True, **extra)
    if info.get("missing_keys"):
        raise EngineError(f"{cfg.model.name_or_path} lacks weights for {len(info['missing_keys'])} parameters "
                          f"(e.g. {sorted(info['missing_keys'])[0]}): they would be scored randomly initialised")
    return model


def run(job: dict) -> dict:
    """One rank of an eval job (also the whole job on one process)."""
    from backends.base import SchedulerSpec, backend_class
    from engine.config import config_from_dict, validate
    from engine.loop import dp_collective, evaluate_examples
    from engine.metrics import format_metrics, log
    from engine.worker import RankSession, prepare_run

    cfg = config_from_dict(job["config"])
    validate(cfg)
    source = Source(**{**job["source"], "run_dir": None,
                       "checkpoint": Path(job["source"]["checkpoint"]) if job["source"]["checkpoint"] else None})
    with RankSession(backend_class("ddp"), "out of GPU memory; pass a smaller --batch-size") as session:
        task, _, data, conf = prepare_run(cfg)
        backend = session.start(cfg.training_spec(), cfg.backend_options("ddp"))
        torch.manual_seed(cfg.train.seed)
        backend.setup(_builder(cfg, conf, task.auto_model_class(), source), SchedulerSpec("constant", 0, 1))
        records: list[dict] = []
        on_batch = ((lambda logits, batch, idx: records.extend(task.example_records(logits, batch, idx)))
                    if job["predictions"] else None)
        collective = dp_collective(backend)
        size = cfg.train.eval_batch_size or cfg.train.micro_batch_size
        results = evaluate_examples(backend, task, data.eval, size, collective, on_batch)
        if job["predictions"]:
            records = sorted((r for part in collective.all_gather_object(records) for r in part),
                             key=lambda r: r["index"])
        if backend.is_main:
            report = {"metrics": results, "task": cfg.task,
                      "evaluated": job["source"]["adapter"] or job["source"]["model"] or str(source.checkpoint),
                      "source": source.kind, "step": source.step, "data": cfg.data.validation or cfg.data.train,
                      "glue_task": cfg.data.glue_task, "eval_examples": len(data.eval),
                      "processes": backend.dp_size, "predictions": job["predictions"]}
            if job["predictions"]:
                with open(job["predictions"], "x") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
            Path(job["output"]).parent.mkdir(parents=True, exist_ok=True)  # runs/eval/ on a first eval
            with open(job["output"], "x") as f:
                f.write(json.dumps(report, indent=1) + "\n")
            log("eval: " + format_metrics(results))
            log(f"written to {job['output']}" + (f" and {job['predictions']}" if job["predictions"] else ""))
            print(json.dumps(report, indent=1), flush=True)
        return results


def run_and_exit(job: dict) -> None:
    """Entry for launched eval processes: a bad-input error is one line on stderr and exit code 2."""
    from engine.worker import exit_with_one_line
    try:
        run(job)
    except EngineError as e:
        exit_with_one_line(e)


def default_output(source: Source) -> str:
    """Beside what was evaluated: in its run directory when it has one (a run, its model/, one of its
    checkpoints), else under runs/eval/; never in whatever folder the user happens to stand in."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if source.run_dir is not None:
        if source.kind == "run":
            what = ""
        elif source.kind == "checkpoint":
            what = f"step-{source.step}-"
        else:  # the run's model/ (or adapter folder) named by its folder
            what = f"{Path(source.adapter or source.model).name}-"
        return str(source.run_dir / f"eval-{what}{stamp}.json")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source.adapter or source.model).name or "model")
    return str(Path("runs") / "eval" / f"{name}-{stamp}.json")


def make_job(source: Source, cfg, output: str, predictions: str | None) -> dict:
    return {"config": cfg.to_dict(), "output": output, "predictions": predictions,
            "source": {"kind": source.kind, "model": source.model, "step": source.step, "adapter": source.adapter,
                       "task": source.task, "checkpoint": str(source.checkpoint) if source.checkpoint else None}}
