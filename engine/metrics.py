"""metrics.jsonl (one JSON object per event, the source of truth), the experiment trackers it
feeds (engine/trackers.py), the rank-0 progress bar, and log lines."""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def format_metrics(values: dict) -> str:
    """`eval_loss=1.2345, accuracy=0.8100, eval_samples=408`: floats to 4 decimals, the rest as is."""
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def log(message: str) -> None:
    print(f"[engine] {message}", file=sys.stderr, flush=True)


class MetricsLog:
    """Appends events; on resume drops events past the resumed step so plots have no repeats.
    Every `train` and `eval` event also goes to the trackers (train.report_to) after it is written."""

    TRACKED_EVENTS = ("train", "eval")

    def __init__(self, output_dir: Path, resume_step: int, enabled: bool, trackers: list = ()) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self.trackers = list(trackers) if enabled else []
        if not enabled:
            return
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line).get("step", 0) <= resume_step]
            if kept != lines:  # rewritten only when events past the resumed step go (never truncated in place)
                from engine.checkpoint import atomic_write
                atomic_write(self.path, "".join(line + "\n" for line in kept))
        self._file = self.path.open("a")

    def write(self, event: str, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.trackers and event in self.TRACKED_EVENTS:
            values = tracker_values(event, values)
            for tracker in self.trackers:
                tracker.log(step, values)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            for tracker in self.trackers:
                tracker.close()
            self.trackers = []


def tracker_values(event: str, values: dict) -> dict[str, float]:
    """An event's numbers under tracker names: train + {loss, train_accuracy} -> train/loss, train/accuracy."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        short = key[len(event) + 1:] if key.startswith(f"{event}_") else key
        out[f"{event}/{short}"] = float(value)
    return out


class Progress:
    """tqdm bar whose time-left comes from measured train-step times only: the first steps
    (warm-up, compilation) and time spent in eval or checkpointing are left out."""

    WARMUP_STEPS = 2

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.enabled = enabled
        self.step_times: list[float] = []
        self.total = total
        self.done = initial
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                            file=sys.stderr)

    def eta_seconds(self) -> float | None:
        measured = self.step_times[self.WARMUP_STEPS:]
        if not measured:
            return None
        return statistics.median(measured[-50:]) * (self.total - self.done)

    def update(self, step_seconds: float, **postfix) -> None:
        self.step_times.append(step_seconds)
        self.done += 1
        if not self.enabled:
            return
        eta = self.eta_seconds()
        if eta is not None:
            postfix["left"] = time.strftime("%H:%M:%S", time.gmtime(eta))
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
