"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow.

metrics.jsonl stays the source of truth and is always written; MetricsLog (engine/metrics.py)
fans every `train` and `eval` event out to the trackers configured here, on rank 0 only. Each
tracker is one small class behind the `Tracker` protocol; the libraries are imported only when a
run asks for them.

Names follow the ecosystem: values go in as `train/loss`, `train/accuracy`, `eval/loss`,
`eval/f1` (an event's own prefix, `eval_` or `train_`, is dropped), at the optimizer step. Where
they go, unless the libraries' own environment variables say otherwise:
- tensorboard: OUTPUT_DIR/tensorboard/ (`tensorboard --logdir OUTPUT_DIR/tensorboard`)
- wandb: OUTPUT_DIR/wandb/, project $WANDB_PROJECT or "engine"; offline when no login is found
  (WANDB_API_KEY or `wandb login`) and WANDB_MODE is unset; `wandb sync` uploads it later
- mlflow: $MLFLOW_TRACKING_URI, else sqlite:///OUTPUT_DIR/mlflow.db (MLflow's supported local
  store; its plain-file store is in maintenance mode and refuses to start without an opt-out),
  experiment $MLFLOW_EXPERIMENT_NAME or "engine"
A resumed run continues the same wandb and MLflow runs (their ids are kept in
OUTPUT_DIR/trackers.json), and TensorBoard drops the events past the resumed step, as
metrics.jsonl does. When the previous session logged steps past its last checkpoint (it crashed
or had no final save), W&B and MLflow cannot take those points back: they start new runs.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Protocol

from engine.errors import EngineError

# name -> (modules that must be importable, what to pip install)
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow-skinny sqlalchemy alembic (or mlflow)"),
}
STATE_FILE = "trackers.json"


class Tracker(Protocol):
    def log_config(self, config: dict) -> None: ...
    def log(self, step: int, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def require_trackers(names: list[str]) -> None:
    """One-line error for a tracker that is named but not installed (called before any process starts)."""
    for name in names:
        modules, package = TRACKERS[name]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise EngineError(f"train.report_to includes {name}, but {missing[0]} is not installed: "
                              f"pip install {package}")


def _import_mlflow() -> None:
    """Import mlflow in this thread before any tracker starts (wandb starts threads and import hooks
    of its own). A failed earlier import of mlflow in this process leaves its submodules in
    sys.modules without the package, and the retry then dies on "partially initialized module
    'mlflow'" (seen once in a full test session): drop such leftovers first."""
    import sys
    if "mlflow" not in sys.modules:
        for name in [m for m in sys.modules if m.startswith("mlflow.")]:
            del sys.modules[name]
    import mlflow  # noqa: F401


def open_trackers(names: list[str], output_dir: Path, config: dict, resume_step: int) -> list[Tracker]:
    """Start the named trackers for this run (rank 0 only) and log the resolved config to each."""
    output_dir = Path(output_dir)
    state_path = output_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    run_name = output_dir.resolve().name
    if state.get("logged_step", 0) > resume_step and ("wandb" in state or "mlflow" in state):
        # a session ended after its last checkpoint: W&B and MLflow cannot take back the points it
        # logged past the step resumed from, so they start new runs (TensorBoard purges them)
        from engine.metrics import log
        log(f"trackers: steps {resume_step + 1}-{state['logged_step']} were logged after the last checkpoint; "
            "W&B and MLflow start new runs from here")
        state.pop("wandb", None)
        state.pop("mlflow", None)
    state["logged_step"] = resume_step
    if "mlflow" in names:
        _import_mlflow()
    trackers: list[Tracker] = []
    for name in dict.fromkeys(names):  # in order, once each
        tracker = _OPENERS[name](output_dir, run_name, state, resume_step)
        tracker.log_config(config)
        trackers.append(tracker)
    recorder = _StateRecorder(state_path, state)
    recorder.write()
    return trackers + [recorder]


class _StateRecorder:
    """Keeps OUTPUT_DIR/trackers.json: the wandb/MLflow run ids and the last step sent to them."""

    def __init__(self, path: Path, state: dict) -> None:
        self.path, self.state = path, state

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1) + "\n")
        tmp.replace(self.path)

    def log_config(self, config: dict) -> None:
        pass

    def log(self, step: int, values: dict[str, float]) -> None:
        if step > self.state["logged_step"]:
            self.state["logged_step"] = step
            self.write()

    def close(self) -> None:
        pass


class TensorBoardTracker:
    def __init__(self, output_dir: Path, run_name: str, state: dict, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        log_dir = output_dir / "tensorboard"
        # resuming at step N: events after N in earlier event files are purged when read back
        purge = resume_step + 1 if log_dir.exists() else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log_config(self, config: dict) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker:
    def __init__(self, output_dir: Path, run_name: str, state: dict, resume_step: int) -> None:
        import wandb

        from engine.metrics import log
        mode = None  # WANDB_MODE, or wandb's default (online)
        if not os.environ.get("WANDB_MODE") and not _wandb_logged_in():
            mode = "offline"
            log(f"wandb: no login found (WANDB_API_KEY or `wandb login`): logging offline to {output_dir / 'wandb'}; "
                "upload later with `wandb sync`")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "engine"), name=run_name, dir=str(output_dir),
                              id=state.get("wandb"), resume="allow", mode=mode)
        state["wandb"] = self.run.id

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, output_dir: Path, run_name: str, state: dict, resume_step: int) -> None:
        from mlflow.tracking import MlflowClient
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:
            uri = f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
            artifacts = (output_dir / "mlartifacts").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "engine")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment
                         else self.client.create_experiment(name, artifact_location=artifacts))
        self.resumed = bool(state.get("mlflow"))
        if self.resumed:
            self.run_id = state["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        state["mlflow"] = self.run_id
        self.uri = uri

    def log_config(self, config: dict) -> None:
        if self.resumed:  # MLflow params are immutable; the resumed run has them
            return
        from mlflow.entities import Param
        params = [Param(k, str(v)[:6000]) for k, v in _flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_OPENERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
