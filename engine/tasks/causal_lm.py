"""Causal-LM fine-tuning: text packed into block_size blocks (run_clm style) or one row per example; or
instruction data (Alpaca, prompt/completion, chat records: engine/tasks/instruct.py) learned on the
answers only, packed without cross-talk or one example per row."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.data import read_rows, require_column
from engine.errors import EngineError
import engine.tasks.instruct as instruct
from engine.tasks.base import Collective, Task, TaskData, split_rows


TOKENIZE_CHUNK_ROWS = 1024


class CausalLMTask(Task):
    name = "causal_lm"

    def auto_model_class(self):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM

    def _rows(self, cfg, source: str, field: str, split: str) -> list[dict]:
        return read_rows(source, field, split=split, hub_config=cfg.data.hub_config, fmt=cfg.data.format)

    def _texts(self, cfg, rows: list[dict], source: str) -> list[str]:
        column = "text" if "text" in rows[0] and cfg.data.text_column not in rows[0] else cfg.data.text_column
        require_column(rows, column, "data.text_column", source)
        return [str(r[column]) for r in rows if r[column] is not None and str(r[column]).strip()]

    def prepare(self, cfg, tokenizer) -> TaskData:
        d = cfg.data
        train_rows = self._rows(cfg, d.train, "data.train", "train")
        eval_rows = self._rows(cfg, d.validation, "data.validation", "validation") if d.validation else None
        layout, why = instruct.choose_layout(train_rows, d.layout, d.text_column, d.train)
        if layout != "text":
            return self._prepare_instructions(cfg, tokenizer, layout, why, train_rows, eval_rows)
        train_texts = self._texts(cfg, train_rows, d.train)
        if eval_rows is not None:
            eval_texts = self._texts(cfg, eval_rows, d.validation)
        elif d.validation_split > 0:
            train_texts, eval_texts = split_rows(train_texts, d.validation_split, cfg.train.seed)
        else:
            eval_texts = None
        self.packing = d.packing
        train = self._tokenize(train_texts, tokenizer, d.block_size, "data.train", d.max_train_samples)
        evals = (self._tokenize(eval_texts, tokenizer, d.block_size, "data.validation", d.max_eval_samples)
                 if eval_texts else None)
        unit = "blocks" if d.packing else "rows"
        notes = (f"train: {len(train_texts)} rows -> {len(train)} {unit} of <= {d.block_size} tokens",)
        return TaskData(train, evals, None, notes)

    def _prepare_instructions(self, cfg, tokenizer, layout: str, why: str, train_rows, eval_rows) -> TaskData:
        """Records -> examples learned on their answers (max_*_samples count records), packed or not."""
        d = cfg.data
        if d.packing:
            instruct.check_packing(cfg)
        if eval_rows is None and d.validation_split > 0:
            train_rows, eval_rows = split_rows(train_rows, d.validation_split, cfg.train.seed)
        train_rows = train_rows[: d.max_train_samples] if d.max_train_samples else train_rows
        if eval_rows is not None and d.max_eval_samples:
            eval_rows = eval_rows[: d.max_eval_samples]
        template, which = instruct.template_for(tokenizer, d.chat_template)
        if template is not None:  # the model/ export's tokenizer then renders prompts as the model learned them
            tokenizer.chat_template = template
        train = instruct.prepare_split(train_rows, cfg, tokenizer, layout, template, "data.train", d.train)
        evals = (instruct.prepare_split(eval_rows, cfg, tokenizer, layout, template, "data.validation",
                                        d.validation or d.train) if eval_rows else None)
        notes = [f"data: {layout} layout ({why}); chat template: {which}; loss on the answers only"]
        notes += [instruct.describe(split, p, layout, d.block_size) for split, p in (("train", train), ("eval", evals))
                  if p is not None]
        return TaskData(train.items, evals.items if evals is not None else None, None, tuple(notes))

    def _tokenize(self, texts: list[str], tokenizer, block_size: int, field: str, limit: int = 0):
        """The first `limit` blocks (rows when not packing; all if 0). Rows are tokenized one at a
        time, so only as many chunks of them as the limit needs are: the same blocks as tokenizing
        the whole corpus and cutting, without its cost (a second for tiny Shakespeare, per process)."""
        eos = tokenizer.eos_token_id
        flat: list[int] = []   # packing: the corpus as one token stream
        rows: list[list[int]] = []
        for start in range(0, len(texts), TOKENIZE_CHUNK_ROWS):
            chunk = texts[start: start + TOKENIZE_CHUNK_ROWS]
            # lines of a .txt keep their line breaks; separate documents (rows) end with EOS
            for ids, text in zip(tokenizer(chunk, add_special_tokens=False)["input_ids"], chunk):
                if self.packing:
                    flat.extend(ids)
                    if eos is not None and not text.endswith("\n"):
                        flat.append(eos)
                elif ids:
                    rows.append(ids[:block_size])
            if limit and (len(flat) // block_size if self.packing else len(rows)) >= limit:
                break
        if not self.packing:
            return rows[:limit] if limit else rows
        n_blocks = len(flat) // block_size  # the tail shorter than a block is dropped (run_clm)
        if n_blocks == 0:
            raise EngineError(f"{field}: only {len(flat)} tokens, fewer than one block of "
                              f"data.block_size={block_size}")
        n_blocks = min(n_blocks, limit) if limit else n_blocks
        return torch.tensor(flat[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)

    def collate(self, examples) -> dict[str, torch.Tensor]:
        if isinstance(examples[0], instruct.PackedRow):
            return instruct.collate_packed(examples)
        if isinstance(examples[0], instruct.Example):
            return instruct.collate_examples(examples)
        if isinstance(examples, torch.Tensor) or isinstance(examples[0], torch.Tensor):
            input_ids = torch.stack(list(examples))
            return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                    "labels": input_ids.clone()}
        width = max(len(e) for e in examples)
        input_ids = torch.zeros(len(examples), width, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, e in enumerate(examples):
            input_ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    @staticmethod
    def tokens_in(batch: dict) -> int:
        """Real (non-padding) input tokens: prompts and answers alike."""
        if "position_ids" in batch:  # packed instruction rows carry no attention mask
            return instruct.packed_tokens(batch)
        return Task.tokens_in(batch)

    def eval_init(self) -> dict:
        return {"loss_sum": 0.0, "tokens": 0}

    def eval_update(self, state, logits, batch, indices) -> None:
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                               ignore_index=-100, reduction="sum")
        state["loss_sum"] += float(loss)
        state["tokens"] += int((shift_labels != -100).sum())

    def example_records(self, logits, batch, indices) -> list[dict]:
        # per-example mean token loss; sum(loss x tokens) / sum(tokens) is the eval_loss
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        losses = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
        mask = shift_labels != -100
        sums, counts = (losses * mask).sum(1).cpu().tolist(), mask.sum(1).cpu().tolist()
        return [{"index": i, "loss": s / max(n, 1), "tokens": n} for i, s, n in zip(indices, sums, counts)]

    def eval_finish(self, state, collective: Collective, device) -> dict[str, float]:
        t = collective.all_reduce_sum(torch.tensor([state["loss_sum"], float(state["tokens"])],
                                                   dtype=torch.float64, device=device))
        loss = float(t[0] / max(t[1], 1.0))
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(t[1])}
