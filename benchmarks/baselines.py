"""The reference points of `engine bench`, started by torchrun with the engine's process count:

  hf-trainer  transformers.Trainer, the tool the seed projects use (TrainingArguments: same micro-batch,
              precision, steps, learning rate, grad clipping 1.0, no saving/eval). The optimizer is the
              Trainer's own default (transformers 5 with torch >= 2.8: adamw_torch_fused, the fused
              AdamW kernel), not forced, so the baseline is what a Trainer user gets; the result
              JSON records which one it was (`optimizer`, from TrainingArguments.optim).
  hand-loop   the shortest correct PyTorch loop: DDP when >1 process, torch.optim.AdamW with its
              defaults (recorded as `optimizer`), autocast for bf16/fp16, clip_grad_norm_(1.0),
              DistributedSampler.

Both train the same architecture (random init from config, fp32 weights) on the same blocks of the
same tokenized text as the engine's bench runs (the project's sample corpus and tokenizer, cut into
`seq`-token blocks), and time each optimizer step between device synchronisations, as the engine's
loop does. Only the engine's data/model helpers that define *what* is trained are shared
(corpus, tokenizer, architecture table) and the memory readers (backends.host), none of its
training code.

    torchrun --standalone --nproc-per-node N -m benchmarks.baselines SPEC.json RESULT.json
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from backends.host import current_rss_mb, peak_memory_mb


def blocks(seq: int) -> torch.Tensor:
    """The sample corpus, tokenized, concatenated with EOS between paragraphs, cut into seq-token rows."""
    from engine.sample import sample_corpus, sample_tokenizer
    tok = sample_tokenizer()
    ids: list[int] = []
    for row in tok(list(sample_corpus()))["input_ids"]:
        ids.extend(row + [tok.eos_token_id])
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)


def build_model(spec: dict):
    from transformers import AutoModelForCausalLM
    from engine.flops import hf_config, parse_model
    torch.manual_seed(spec["seed"])
    config = hf_config(parse_model(spec["model"]))
    for key, value in spec.get("model_config", {}).items():  # the bench's model.config.* overrides
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def memory_stats(device: torch.device, rss_before: float | None) -> dict:
    stats = {k: round(v, 1) for k, v in peak_memory_mb(device).items()}  # the engine's own reader
    if rss_before is not None:
        stats["host_rss_before_setup_mb"] = round(rss_before, 1)
    return stats


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepLog:
    """Per-step seconds and end times, written by rank 0 as the bench's steps.jsonl (progress)."""

    def __init__(self, path: Path, tokens_per_step: int, samples_per_step: int, enabled: bool) -> None:
        self.steps: list[dict] = []
        self.tokens, self.samples = tokens_per_step, samples_per_step
        self.file = path.open("w") if enabled else None

    def add(self, seconds: float, loss: float | None = None) -> None:
        rec = {"step": len(self.steps) + 1, "tokens_per_s": self.tokens / seconds,
               "samples_per_s": self.samples / seconds, "end": round(time.time(), 3), "loss": loss}
        self.steps.append(rec)
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()


def hand_loop(spec: dict, device: torch.device, data: torch.Tensor, steps: StepLog, world: int) -> str:
    """Train; return the optimizer's name."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    model = build_model(spec).to(device)
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from transformers import get_linear_schedule_with_warmup
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)  # the engine's and Trainer's 0.0
    schedule = get_linear_schedule_with_warmup(opt, spec.get("warmup_steps", 0), spec["steps"])  # as theirs
    sampler = DistributedSampler(data, shuffle=True, seed=spec["seed"], drop_last=True) if world > 1 else None
    loader = DataLoader(data, batch_size=spec["micro_batch"], sampler=sampler, shuffle=sampler is None,
                        drop_last=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["precision"])
    scaler = torch.amp.GradScaler(device.type) if spec["precision"] == "fp16" else None
    model.train()
    epoch, it = 0, None
    while len(steps.steps) < spec["steps"]:
        if it is None:
            if sampler:
                sampler.set_epoch(epoch)
            it = iter(loader)
        try:
            x = next(it)
        except StopIteration:
            epoch, it = epoch + 1, None
            continue
        sync(device)
        t0 = time.perf_counter()
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=x, labels=x).loss
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["max_grad_norm"])
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()  # a sync, like the engine's loop
        sync(device)
        steps.add(time.perf_counter() - t0, value)
    return "torch.optim.AdamW"


def hf_trainer(spec: dict, device: torch.device, data: torch.Tensor, steps: StepLog, work_dir: Path) -> str:
    """Train; return the optimizer the Trainer chose (TrainingArguments.optim, its default)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data[i], "labels": data[i]}

    class Timer(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            Timer.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            steps.add(time.perf_counter() - Timer.t0)

    args = TrainingArguments(
        output_dir=str(work_dir), per_device_train_batch_size=spec["micro_batch"], max_steps=spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=spec.get("warmup_steps", 0),
        max_grad_norm=spec["max_grad_norm"],
        bf16=spec["precision"] == "bf16", fp16=spec["precision"] == "fp16", seed=spec["seed"],
        gradient_checkpointing=spec["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False} if spec["gradient_checkpointing"] else None,
        logging_steps=spec["steps"], save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, use_cpu=device.type == "cpu",
        ddp_backend="gloo" if device.type == "cpu" and dist.is_available() else None)
    model = build_model({**spec, "gradient_checkpointing": False})  # Trainer enables it from args
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Timer()]).train()
    return str(getattr(args.optim, "value", args.optim))  # an OptimizerNames member


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized() and spec["kind"] == "hand-loop":
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    data = blocks(spec["seq"])
    rss_before = current_rss_mb()
    log = StepLog(Path(result_path).parent / "steps.jsonl", spec["micro_batch"] * spec["seq"] * world,
                  spec["micro_batch"] * world, enabled=rank == 0)
    if spec["kind"] == "hand-loop":
        optimizer = hand_loop(spec, device, data, log, world)
    else:
        optimizer = hf_trainer(spec, device, data, log, Path(result_path).parent / "trainer")
    mine = memory_stats(device, rss_before)
    per_rank = [mine]
    if dist.is_initialized():
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, mine)
    if rank == 0:
        Path(result_path).write_text(json.dumps({"steps": log.steps, "memory_per_rank": per_rank,
                                                 "optimizer": optimizer}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: torchrun ... -m benchmarks.baselines SPEC.json RESULT.json")
    main(sys.argv[1], sys.argv[2])
