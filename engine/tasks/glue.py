"""GLUE task definitions (columns of the official TSVs, labels) and their official metrics."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GlueTask:
    text_column: str
    text_pair_column: str | None
    label_column: str
    labels: tuple[str, ...] | None   # string labels in the TSV, in id order; None = numeric
    num_labels: int                  # 1 = regression
    metrics: tuple[str, ...]
    dev_file: str = "dev.tsv"
    header: tuple[str, ...] | None = None  # for files without a header row (CoLA)


GLUE_TASKS: dict[str, GlueTask] = {
    "mrpc": GlueTask("#1 String", "#2 String", "Quality", None, 2, ("accuracy", "f1")),
    "sst2": GlueTask("sentence", None, "label", None, 2, ("accuracy",)),
    "rte": GlueTask("sentence1", "sentence2", "label", ("entailment", "not_entailment"), 2, ("accuracy",)),
    "cola": GlueTask("sentence", None, "label", None, 2, ("matthews_correlation",),
                     header=("source", "label", "original_label", "sentence")),
    "qqp": GlueTask("question1", "question2", "is_duplicate", None, 2, ("accuracy", "f1")),
    "mnli": GlueTask("sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"), 3,
                     ("accuracy",), dev_file="dev_matched.tsv"),
    "qnli": GlueTask("question", "sentence", "label", ("entailment", "not_entailment"), 2, ("accuracy",)),
    "stsb": GlueTask("sentence1", "sentence2", "score", None, 1, ("pearson", "spearmanr")),
}


def compute_metrics(names, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Official GLUE metrics over the whole eval set (binary F1 on the positive class 1)."""
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out["accuracy"] = float((preds == labels).mean())
        elif name == "f1":
            tp = float(((preds == 1) & (labels == 1)).sum())
            fp = float(((preds == 1) & (labels != 1)).sum())
            fn = float(((preds != 1) & (labels == 1)).sum())
            out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        elif name == "matthews_correlation":
            tp = float(((preds == 1) & (labels == 1)).sum()); tn = float(((preds == 0) & (labels == 0)).sum())
            fp = float(((preds == 1) & (labels == 0)).sum()); fn = float(((preds == 0) & (labels == 1)).sum())
            denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            out["matthews_correlation"] = float((tp * tn - fp * fn) / denom) if denom else 0.0
        elif name == "pearson":
            from scipy.stats import pearsonr
            out["pearson"] = float(pearsonr(preds, labels)[0])
        elif name == "spearmanr":
            from scipy.stats import spearmanr
            out["spearmanr"] = float(spearmanr(preds, labels)[0])
        else:
            raise ValueError(name)
    return out
