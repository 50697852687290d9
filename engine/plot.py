"""`engine plot RUN_DIR`: loss, learning rate and eval metrics over steps from metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

from engine.errors import EngineError
from engine.metrics import METRICS_FILE

_SKIP = {"event", "step", "time", "eval_samples", "eval_tokens"}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise EngineError(f"{path} not found: is {run_dir} a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path, output: Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    if not train:
        raise EngineError(f"{run_dir}/{METRICS_FILE} has no training steps yet")
    eval_keys = sorted({k for r in evals for k, v in r.items() if k not in _SKIP and k != "eval_loss"
                        and isinstance(v, (int, float)) and k != "perplexity"})
    panels = 2 + (1 if eval_keys else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step"); ax.set_title("loss"); ax.legend(); ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set_xlabel("step"); ax.set_title("learning rate"); ax.grid(alpha=0.3)
    if eval_keys:
        ax = axes[2]
        for k in eval_keys:
            pts = [(r["step"], r[k]) for r in evals if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k)
        ax.set_xlabel("step"); ax.set_title("eval metrics"); ax.legend(); ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    output = output or Path(run_dir) / "metrics.png"
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
