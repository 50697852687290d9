"""Shared test helpers: real data from ../shared/data, tiny models saved to local folders, and
running the real `engine` CLI in subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ENGINE_SHARED_DATA", REPO.parent / "shared" / "data"))
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
MRPC = SHARED_DATA / "glue" / "MRPC"
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"
ENGINE = [sys.executable, "-m", "launch.cli"]
HOOKS = REPO / "tests" / "hooks"  # test-only fault injection (sitecustomize.py there says how)


def with_hooks(env: dict) -> dict:
    """`env` for a launched job whose processes take the test hooks (ENGINE_TEST_* variables)."""
    path = os.pathsep.join(p for p in (str(HOOKS), env.get("PYTHONPATH") or os.environ.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path}


def tiny_gpt2_dir(root: Path, *, n_layer: int = 2, n_embd: int = 32, n_head: int = 2, n_positions: int = 128,
                  dropout: float = 0.0) -> Path:
    """A tiny GPT-2 (random init) + the real GPT-2 tokenizer saved as an HF folder, so runs use
    the real from_pretrained path. Dropout 0 by default: parity tests compare exact losses."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
    from transformers.utils import logging as hf_logging
    import torch

    hf_logging.disable_progress_bar()  # "Writing model shards" is noise in the test log
    path = root / f"tiny-gpt2-{n_layer}x{n_embd}"
    if (path / "config.json").exists():
        return path
    tok = GPT2Tokenizer.from_pretrained(str(GPT2_TOKENIZER))
    conf = GPT2Config(vocab_size=len(tok), n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(conf).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_engine(args: list[str], *, cwd: Path | None = None, timeout: int = 600, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(ENGINE + [str(a) for a in args], cwd=cwd or REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"engine {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path, event: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]


def assert_one_error_line(output: str, prefix: str) -> str:
    """The one-line error promise for a real `engine` process: no traceback anywhere, exactly one
    `error:` line and it is the last (log lines such as `new run in ...` may come before it), and
    it starts with `prefix`. Returns the line."""
    lines = output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in output, output[-4000:]
    assert len(errors) == 1 and lines[-1] == errors[0], output[-4000:]
    assert errors[0].startswith(prefix), errors[0]
    return errors[0]


def small_data(root: Path, *, shakespeare_lines: int, mrpc_rows: tuple[int, int]) -> dict:
    """Excerpts of the shared data (the first lines of tiny Shakespeare, the first (train, dev) rows
    of MRPC's TSVs), so suites with many scenarios tokenize little: {"clm": file, "cls": GLUE folder}."""
    root.mkdir(parents=True, exist_ok=True)
    clm = root / "shakespeare-excerpt.txt"
    clm.write_text("".join(SHAKESPEARE.read_text().splitlines(keepends=True)[:shakespeare_lines]))
    mrpc = root / "MRPC"
    mrpc.mkdir(exist_ok=True)
    for name, n in zip(("train.tsv", "dev.tsv"), mrpc_rows):
        lines = (MRPC / name).read_bytes().splitlines(keepends=True)[:n + 1]  # + header (with its BOM)
        (mrpc / name).write_bytes(b"".join(lines))
    return {"clm": clm, "cls": mrpc}


def parity_config(task: str, model: Path | None, out: Path, max_grad_norm: float, grad_accum: int, data: dict,
                  steps: int = 4) -> dict:
    """The backends' parity scenarios (tests/test_deepspeed.py, tests/test_fsdp.py): a short fp32 run
    on `data` ({"clm": text file, "cls": GLUE MRPC folder}), block 32 (64 for MRPC), 64 samples."""
    train = {"max_steps": steps, "micro_batch_size": 2, "grad_accum": grad_accum, "lr": 2e-3,
             "warmup_ratio": 0.25, "scheduler": "linear", "weight_decay": 0.01, "max_grad_norm": max_grad_norm,
             "log_every": 1, "seed": 7, "precision": "fp32",
             "adamw_impl": "for_loop",  # the per-parameter update: the same order however ZeRO/FSDP flatten
             "eval_batch_size": 3}  # 7 eval examples: 4 on rank 0 (2 batches), 3 on rank 1 (1 batch)
    if task == "clm":
        return {"task": "causal_lm", "model": {"name_or_path": str(model)},
                "data": {"train": str(data["clm"]), "block_size": 32, "validation_split": 0.02,
                         "max_train_samples": 64, "max_eval_samples": 7},
                "train": train, "output_dir": str(out)}
    return {"task": "classification", "model": {"name_or_path": str(model)},
            "data": {"train": str(data["cls"]), "glue_task": "mrpc", "block_size": 64, "max_train_samples": 64,
                     "max_eval_samples": 7},
            "train": train, "output_dir": str(out)}


def with_backend(cfg: dict, name: str, options: dict, **train) -> dict:
    """A copy of a resolved config on another backend (its options in backend.<name>), train.* updated."""
    cfg = json.loads(json.dumps(cfg))
    cfg["backend"] = {"name": name, **({name: options} if options else {})}
    cfg["train"].update(train)
    return cfg


def run_many(scenarios: list[dict], workdir: Path, timeout: int = 1800, nproc: int = 2) -> subprocess.CompletedProcess:
    """Every scenario (a resolved config dict) in ONE torchrun job of `nproc` processes
    (tests/drivers/run_many.py): each process pays the torch/transformers/library imports once. Its
    output is kept in workdir/job.log."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "scenarios.json"
    spec.write_text(json.dumps(scenarios, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache/engine/torch_extensions"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "tests/drivers/run_many.py"), str(spec)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    (workdir / "job.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise AssertionError(f"run_many failed ({proc.returncode}); log in {workdir / 'job.log'}:\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return proc
