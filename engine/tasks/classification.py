"""GLUE-style sequence(-pair) classification (and STS-B style regression with num_labels=1)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.data import read_rows, require_column, resolve_glue_file
from engine.errors import EngineError
from engine.tasks.base import Collective, Task, TaskData, split_rows
from engine.tasks.glue import GLUE_TASKS, compute_metrics


class ClassificationTask(Task):
    name = "classification"

    def auto_model_class(self):
        from transformers import AutoModelForSequenceClassification
        return AutoModelForSequenceClassification

    def _columns(self, cfg):
        d = cfg.data
        glue = GLUE_TASKS.get(d.glue_task) if d.glue_task else None
        if glue:
            return glue.text_column, glue.text_pair_column, glue.label_column, glue
        return d.text_column, d.text_pair_column, d.label_column, None

    def _read(self, cfg, source, field, split):
        _, _, _, glue = self._columns(cfg)
        return read_rows(source, field, split=split, hub_config=cfg.data.hub_config,
                         tsv_header=glue.header if glue else None,
                         dev_file=glue.dev_file if glue else "dev.tsv", fmt=cfg.data.format,
                         glue=glue is not None)

    def prepare(self, cfg, tokenizer) -> TaskData:
        d = cfg.data
        text_col, pair_col, label_col, glue = self._columns(cfg)
        train_rows = self._read(cfg, d.train, "data.train", "train")
        validation = d.validation
        if validation is None and resolve_glue_file(d.train, "validation", glue.dev_file if glue else "dev.tsv"):
            validation = d.train  # a GLUE folder: its dev file is the validation set
        if validation:
            eval_rows = self._read(cfg, validation, "data.validation", "validation")
        elif d.validation_split > 0:
            train_rows, eval_rows = split_rows(train_rows, d.validation_split, cfg.train.seed)
        else:
            eval_rows = None
        num_labels = cfg.model.num_labels or (glue.num_labels if glue else None)
        train, all_labels = self._encode(train_rows, tokenizer, cfg, "data.train", d.train, glue, num_labels,
                                         d.max_train_samples)
        if num_labels is None:  # from every row's label, not only the first max_train_samples
            num_labels = max(2, int(max(all_labels)) + 1)
        evals = (self._encode(eval_rows, tokenizer, cfg, "data.validation", validation or d.train, glue, num_labels,
                              d.max_eval_samples)[0] if eval_rows else None)
        self.num_labels = num_labels
        self.pad_token_id = tokenizer.pad_token_id
        self.metric_names = glue.metrics if glue else (("accuracy",) if num_labels > 1 else ("pearson", "spearmanr"))
        if num_labels == 2 and not glue:
            self.metric_names = ("accuracy", "f1")
        notes = (f"train: {len(train)} examples, {num_labels} labels", )
        return TaskData(train, evals, num_labels, notes)

    def _encode(self, rows, tokenizer, cfg, field, source, glue, num_labels, limit: int = 0):
        """The first `limit` rows (all if 0) as examples, and every row's label: all are checked,
        only those used are tokenized."""
        text_col, pair_col, label_col, _ = self._columns(cfg)
        names = {"text": "data.text_column", "pair": "data.text_pair_column", "label": "data.label_column"}
        require_column(rows, text_col, names["text"], source)
        if pair_col:
            require_column(rows, pair_col, names["pair"], source)
        require_column(rows, label_col, names["label"], source)
        labels = [self._label(r[label_col], n, glue, num_labels, source, label_col)
                  for n, r in enumerate(rows, 1)]
        used = rows[:limit] if limit else rows
        first = [str(r[text_col] or "") for r in used]
        second = [str(r[pair_col] or "") for r in used] if pair_col else None
        enc = tokenizer(first, second, truncation=True, max_length=cfg.data.block_size)
        return [{"input_ids": ids, "label": lab} for ids, lab in zip(enc["input_ids"], labels)], labels

    @staticmethod
    def _label(value, row, glue, num_labels, source, column):
        text = str(value).strip() if value is not None else ""
        if glue and glue.labels:
            if text not in glue.labels:
                raise EngineError(f"data.label_column {column!r} row {row} of {source}: "
                                  f"{text!r} is not one of {', '.join(glue.labels)}")
            return glue.labels.index(text)
        try:
            number = float(text)
        except ValueError:
            raise EngineError(f"data.label_column {column!r} row {row} of {source}: "
                              f"non-numeric label {text!r}") from None
        if num_labels == 1:
            return number
        if not number.is_integer() or number < 0:
            raise EngineError(f"data.label_column {column!r} row {row} of {source}: "
                              f"label {text!r} is not a class id (0, 1, ...)")
        if num_labels is not None and number >= num_labels:
            raise EngineError(f"data.label_column {column!r} row {row} of {source}: "
                              f"label {int(number)} is out of range for {num_labels} labels")
        return int(number)

    def collate(self, examples) -> dict[str, torch.Tensor]:
        # right padding: transformers 5 pools the last non-pad token for GPT-style classifiers
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, e in enumerate(examples):
            input_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        dtype = torch.float if self.num_labels == 1 else torch.long
        labels = torch.tensor([e["label"] for e in examples], dtype=dtype)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    # training accuracy per log window (what the ColossalAI MRPC recipe reports): correct and
    # counted examples summed on the device; regression (num_labels=1) has none
    def train_metrics_init(self, device) -> torch.Tensor | None:
        if self.num_labels == 1:
            return None
        return torch.zeros(2, dtype=torch.float64, device=device)

    def train_metrics_update(self, sums, logits, batch) -> None:
        labels = batch["labels"]
        sums[0] += (logits.argmax(-1) == labels).sum()
        sums[1] += labels.numel()

    def train_metrics_finish(self, sums) -> dict[str, float]:
        correct, count = sums
        return {"train_accuracy": correct / count} if count else {}

    def eval_init(self) -> dict:
        return {"index": [], "pred": [], "label": [], "loss": []}

    def eval_update(self, state, logits, batch, indices) -> None:
        logits = logits.float()
        labels = batch["labels"]
        if self.num_labels == 1:
            preds = logits[:, 0]
            losses = (preds - labels.float()) ** 2
        else:
            preds = logits.argmax(-1)
            losses = F.cross_entropy(logits, labels, reduction="none")
        state["index"].extend(indices)
        state["pred"].extend(preds.cpu().tolist())
        state["label"].extend(labels.cpu().tolist())
        state["loss"].extend(losses.cpu().tolist())

    def example_records(self, logits, batch, indices) -> list[dict]:
        logits = logits.float()
        labels = batch["labels"].cpu().tolist()
        if self.num_labels == 1:  # regression: the prediction is the score
            preds = logits[:, 0].cpu().tolist()
            return [{"index": i, "prediction": p, "label": lab} for i, p, lab in zip(indices, preds, labels)]
        preds = logits.argmax(-1).cpu().tolist()
        probs = torch.softmax(logits.double(), -1).cpu().tolist()  # sums to 1 in the file
        return [{"index": i, "prediction": p, "label": lab, "logits": lg, "probabilities": pr}
                for i, p, lab, lg, pr in zip(indices, preds, labels, logits.cpu().tolist(), probs)]

    def eval_finish(self, state, collective: Collective, device) -> dict[str, float]:
        # each example scored once: gather (index, pred, label, loss) and dedupe by index
        merged = {}
        for part in collective.all_gather_object(state):
            for i, p, lab, loss in zip(part["index"], part["pred"], part["label"], part["loss"]):
                merged[i] = (p, lab, loss)
        order = sorted(merged)
        preds = np.array([merged[i][0] for i in order])
        labels = np.array([merged[i][1] for i in order])
        out = {"eval_loss": float(np.mean([merged[i][2] for i in order])), "eval_samples": len(order)}
        out.update(compute_metrics(self.metric_names, preds, labels))
        return out
