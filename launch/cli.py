"""The `engine` command line, above everything it drives: launch, train, eval, export, generate,
plot, bench, estimate. Every import points down (into launch/, benchmarks/, engine/, backends/);
heavy modules are imported inside the command that needs them, so `engine --help` stays quick."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from engine.errors import EngineError, Interrupted


def _split_config_and_overrides(args: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] [KEY=VALUE ...]`: the first argument without '=' is the config file."""
    config, overrides = None, []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise EngineError(f"unexpected argument {a!r}: give one config file and KEY=VALUE overrides")
    return config, overrides


def _gpu_count() -> int:
    from backends.host import gpu_count
    return gpu_count()


def _processes(gpus: int | None, nproc: int | None, *, default_nproc: int = 1,
               gpus_here: bool = True) -> tuple[int, int]:
    """(GPUs, processes per node) from --gpus/--nproc: one process per GPU, or --nproc CPU processes
    when --gpus is 0 (default: every GPU present). gpus_here=False: the GPUs are elsewhere (Ray)."""
    present = _gpu_count()
    gpus = present if gpus is None else gpus
    if gpus < 0 or (nproc is not None and nproc < 1):
        raise EngineError("--gpus must be >= 0 and --nproc >= 1")
    if gpus > present and gpus_here:
        raise EngineError(f"--gpus {gpus} asked, but this machine has {present} GPU(s)"
                          + ("; use --gpus 0 --nproc N for CPU processes" if present == 0 else ""))
    if gpus > 0 and nproc is not None and nproc != gpus:
        raise EngineError("--nproc is for CPU runs; with GPUs one process starts per GPU (--gpus)")
    return gpus, gpus if gpus > 0 else (nproc or default_nproc)


def _threads_per_proc(gpus: int, procs: int) -> int | None:
    """CPU processes share this node's cores (as torchrun does); GPU ranks keep torch's default."""
    return max(1, (os.cpu_count() or 1) // procs) if gpus == 0 else None


class EngineGroup(click.Group):
    """Turns EngineError into `error: <message>` and exit code 2, with no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EngineError as e:
            click.echo(f"{'stopped' if isinstance(e, Interrupted) else 'error'}: {e}", err=True)
            sys.exit(getattr(e, "exit_code", 2))


class RegistryHelp(click.Option):
    """An option whose help lists what the backend registry holds, computed only when help is shown
    (the registry imports torch: `engine launch ...` itself should not wait for it here)."""

    def __init__(self, *args, help_from, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help_from = help_from

    def get_help_record(self, ctx):
        self.help = self.help_from()
        return super().get_help_record(ctx)


def _backend_help() -> str:
    from backends.base import backend_names
    return f"{' | '.join(backend_names())} (overrides backend.name)"


def _bench_help() -> str:
    from backends.base import backend_class, backend_names
    forms = [backend_class(n).bench_spec_help or n for n in backend_names()]
    return (f"comma list of {', '.join(forms)}; any +gc (gradient checkpointing) and @KEY=VALUE config "
            f"overrides (ddp@model.lora.r=8: a LoRA run); default: {','.join(_default_bench_specs())}")


def _models_help() -> str:
    from engine.flops import ARCHS
    return (f"comma list of {', '.join(ARCHS)}, gpt2:L=..,d=..,h=..,V=.. or a local HF folder "
            f"(random init from its config)")


def _default_bench_specs() -> list[str]:
    from backends.base import backend_class, backend_names
    return [spec for n in backend_names() for spec in backend_class(n).bench_defaults]


@click.group(cls=EngineGroup)
def main() -> None:
    """Fine-tune language models with one training loop over every backend (engine launch --help
    lists them)."""


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@click.option("--backend", default=None, cls=RegistryHelp, help_from=_backend_help)
@click.option("--gpus", type=int, default=None, help="GPUs per node (default: all; 0 = CPU processes with gloo)")
@click.option("--nproc", type=int, default=None, help="CPU processes per node when running without GPUs (default 1)")
@click.option("--nnodes", type=int, default=1, show_default=True)
@click.option("--node-rank", type=int, default=0, show_default=True)
@click.option("--master-addr", default="127.0.0.1", show_default=True)
@click.option("--master-port", type=int, default=None, help="default: a free port (single node) or 29500")
@click.option("--max-restarts", type=int, default=0, show_default=True,
              help="restart all workers this many times when one fails; they resume from the last checkpoint")
@click.option("--launcher", type=click.Choice(["torchrun", "ray"]), default="torchrun", show_default=True)
@click.option("--address", default=None, help="Ray cluster address (auto | HOST:PORT); default: a local Ray instance")
@click.option("--gpus-per-node", type=int, default=None, help="Ray: GPUs per node to pack workers by")
@click.option("--rdzv-timeout", type=int, default=300, show_default=True,
              help="seconds to wait for all nodes to join (torchrun) or for the cluster's resources (Ray)")
@click.option("--continue", "continue_run", is_flag=True,
              help="train a finished run (same output_dir) further, to a larger train.max_steps / train.epochs")
def launch(args, backend, gpus, nproc, nnodes, node_rank, master_addr, master_port, max_restarts, launcher,
           address, gpus_per_node, rdzv_timeout, continue_run):
    """Start a training job: engine launch [CONFIG.yaml] [KEY=VALUE ...].

    With no CONFIG it trains a small GPT-2 on the project's own sample corpus."""
    config, overrides = _split_config_and_overrides(args)
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise EngineError("--nnodes must be >= 1 and 0 <= --node-rank < --nnodes")
    gpus, procs = _processes(gpus, nproc, gpus_here=launcher == "torchrun")
    if max_restarts < 0 or rdzv_timeout < 1:
        raise EngineError("--max-restarts must be >= 0 and --rdzv-timeout >= 1")
    if launcher == "ray":
        if nnodes != 1:
            raise EngineError("--nnodes is for --launcher torchrun; Ray places workers across its cluster itself")
        from launch.ray_launcher import check_local_capacity, require_ray
        require_ray()  # before any data is read: a missing Ray is one line
        if address is None:
            check_local_capacity(procs, gpus > 0)
    if launcher == "torchrun":
        from backends.host import port_free
        if master_port is None:  # one node: port 0, the rendezvous store binds a free one itself (no race)
            master_port = 0 if nnodes == 1 else 29500
        if master_port and node_rank == 0 and not port_free(master_addr if nnodes > 1 else "127.0.0.1", master_port):
            raise EngineError(f"--master-port {master_port} is already in use on {master_addr}; pick another port")
    from engine.preflight import resolve_job
    cfg, lines = resolve_job(config, overrides, backend, world_size=procs * nnodes, continue_run=continue_run)
    cfg_dict = _with_continue(cfg.to_dict(), continue_run)
    from contextlib import nullcontext

    from engine.metrics import log
    from engine.runlock import RunLock
    # one live job per run directory: node 0's launcher holds the lock (the other nodes share the directory)
    with RunLock(Path(cfg.output_dir)) if node_rank == 0 else nullcontext():
        for line in lines:
            log(line)
        try:
            if launcher == "ray":
                from launch.ray_launcher import launch as ray_launch
                ray_launch(cfg_dict, workers=procs, use_gpu=gpus > 0, address=address, gpus_per_node=gpus_per_node,
                           max_restarts=max_restarts, resource_timeout=rdzv_timeout)
            else:
                from launch.torchrun import launch as torchrun_launch
                torchrun_launch(cfg_dict, nproc=procs, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                                master_port=master_port, max_restarts=max_restarts,
                                threads_per_proc=_threads_per_proc(gpus, procs), rdzv_timeout=rdzv_timeout)
        except BaseException as e:
            if node_rank == 0:  # the workers could not say the run ended (killed, crashed): the launcher does
                from engine.checkpoint import mark_run_ended
                mark_run_ended(Path(cfg.output_dir), f"{type(e).__name__}: {e}"[:300])
            raise


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@click.option("--backend", default=None)
@click.option("--continue", "continue_run", is_flag=True, help="train a finished run further (see engine launch)")
def train(args, backend, continue_run):
    """Per-rank entry point (also under an external torchrun): engine train CONFIG [KEY=VALUE ...]."""
    from engine.config import load_config
    from engine.worker import run

    config, overrides = _split_config_and_overrides(args)
    cfg = load_config(config, overrides, backend=backend)
    if cfg.output_dir is None:  # every rank must pick the same directory
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "local")
        cfg.output_dir = str(Path("runs") / f"{cfg.task}-{run_id}")
    if int(os.environ.get("RANK", 0)) == 0:
        from engine.checkpoint import check_output_dir
        check_output_dir(Path(cfg.output_dir), continue_run, cfg.train.max_steps)
    run(_with_continue(cfg.to_dict(), continue_run))


def _with_continue(cfg_dict: dict, continue_run: bool) -> dict:
    from engine.worker import CONTINUE_KEY
    return {**cfg_dict, CONTINUE_KEY: True} if continue_run else cfg_dict


@main.command("eval", context_settings={"ignore_unknown_options": True})
@click.argument("source")
@click.argument("overrides", nargs=-1)
@click.option("--data", default=None, help="eval set: file, GLUE folder (its dev set) or hub name; "
              "default: the run's validation set")
@click.option("--glue-task", default=None, help="mrpc, sst2, ...: columns, labels and official metrics "
              "(implies classification)")
@click.option("--task", type=click.Choice(["causal_lm", "classification"]), default=None,
              help="default: from the model's head (*ForSequenceClassification = classification) or the run")
@click.option("--output", default=None, help="metrics JSON (default: eval-<timestamp>.json in the evaluated run's directory, "
              "else runs/eval/); never overwritten")
@click.option("--predictions", default=None, help="per-example JSONL: index, prediction, label, logits, "
              "probabilities (classification) or loss, tokens (causal LM)")
@click.option("--batch-size", type=int, default=None, help="per process (default: the run's eval batch)")
@click.option("--gpus", type=int, default=None, help="GPUs, one process each (default: all; 0 = CPU processes)")
@click.option("--nproc", type=int, default=None, help="CPU processes when --gpus 0 (default 1)")
@click.option("--master-port", type=int, default=None, help="default: a free port")
def eval_(source, overrides, data, glue_task, task, output, predictions, batch_size, gpus, nproc, master_port):
    """Score a model without training: engine eval MODEL_DIR|RUN_DIR|RUN/checkpoints/step-N [--data ...]
    [KEY=VALUE ...]. Metrics (eval loss + perplexity, or the GLUE task's) go to --output and stdout."""
    from engine import evaluate as ev
    from engine.metrics import log

    gpus, procs = _processes(gpus, nproc)
    if batch_size is not None and batch_size < 1:
        raise EngineError("--batch-size must be >= 1")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise EngineError(f"unexpected argument {bad[0]!r}: give one model/run/checkpoint and KEY=VALUE overrides")
    ev.check_new_file(output, "--output")
    ev.check_new_file(predictions, "--predictions")
    if predictions and output and Path(predictions).resolve() == Path(output).resolve():
        raise EngineError("--output and --predictions must be different files")
    src = ev.resolve_source(source)
    output = output or ev.default_output(src)
    cfg = ev.build_config(src, data=data, glue_task=glue_task, task=task, batch_size=batch_size,
                          overrides=list(overrides))
    n = ev.preflight(cfg, src)
    log(f"evaluating {src.adapter or src.model or src.checkpoint} ({cfg.task}) on {n} examples with {procs} process(es)")
    job = ev.make_job(src, cfg, output, predictions)
    if procs == 1:
        ev.run(job)
        return
    from launch.torchrun import launch as torchrun_launch
    torchrun_launch(job, nproc=procs, master_port=master_port or 0,
                    threads_per_proc=_threads_per_proc(gpus, procs), entry=ev.run_and_exit)


@main.command("export")
@click.argument("checkpoint")
@click.argument("out_dir")
@click.option("--merged", is_flag=True, help="LoRA runs: the adapters merged into the base model (a plain HF "
              "folder) instead of the adapter folder")
def export(checkpoint, out_dir, merged):
    """Consolidated HF folder (safetensors + tokenizer) from RUN/checkpoints/step-N of any backend,
    in one CPU process: engine export runs/x/checkpoints/step-200 exported/step-200"""
    if not _gpu_count():  # transformers imports an installed DeepSpeed, which warns otherwise
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from engine.export import export_checkpoint
    report = export_checkpoint(checkpoint, out_dir, merged=merged)
    click.echo(f"exported step {report['step']} ({report['backend']} checkpoint, {report['weights']}) to {out_dir}"
               + (f"; vocabulary padding rows dropped: {', '.join(report['trimmed'])}" if report["trimmed"] else ""))



@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--prompt", "prompts", multiple=True, default=("Once upon a time",), show_default=True)
@click.option("--max-new-tokens", type=int, default=40, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-k", type=int, default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--greedy", is_flag=True, help="greedy decoding instead of sampling")
def generate(models, prompts, max_new_tokens, temperature, top_k, seed, greedy):
    """Sample from models side by side: engine generate BASE RUN_DIR/model --prompt '...'"""
    from engine.generate import generate_side_by_side
    for prompt, outputs in generate_side_by_side(list(models), list(prompts), max_new_tokens=max_new_tokens,
                                                 temperature=temperature, top_k=top_k, seed=seed, greedy=greedy):
        click.echo(f"=== prompt: {prompt!r}")
        for name, text in outputs:
            click.echo(f"--- {name}\n{text}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", default=None, help="PNG path (default RUN_DIR/metrics.png)")
def plot(run_dir, output):
    """Plot loss, learning rate and eval metrics of a run as a PNG."""
    from engine.plot import plot_run
    path = plot_run(Path(run_dir), Path(output) if output else None)
    click.echo(str(path))



@main.command()
@click.option("--backends", default=None, cls=RegistryHelp, help_from=_bench_help)
@click.option("--baselines", default="trainer,hand", show_default=True,
              help="reference runs in the same bench: trainer (HF Trainer), hand (plain PyTorch loop); '' for none")
@click.option("--models", default="tiny", show_default=True, cls=RegistryHelp, help_from=lambda: _models_help())
@click.option("--gpus", type=int, default=None, help="GPUs (one process each); default: all present, 0 = CPU")
@click.option("--nproc", type=int, default=None, help="CPU processes when --gpus 0 (default 2)")
@click.option("--seq", type=int, default=128, show_default=True)
@click.option("--micro-batch", type=int, default=4, show_default=True, help="per rank")
@click.option("--steps", type=int, default=10, show_default=True, help="measured steps")
@click.option("--warmup", type=int, default=3, show_default=True, help="steps run first and not measured")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="default: bf16 on GPUs, fp32 on CPU")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="results folder (default: WORK_DIR/<session>/results, beside this bench's runs; the "
                   "project's committed benchmarks/results are written only when named here)")
@click.option("--work-dir", default="runs/bench", show_default=True, type=click.Path(file_okay=False),
              help="run directories and logs, one folder per bench session")
@click.option("--timeout", type=int, default=1200, show_default=True, help="seconds per run before it is killed")
@click.option("--repeat", type=int, default=1, show_default=True,
              help="rounds over the whole matrix (interleaved); measured steps are pooled over rounds")
def bench(backends, baselines, models, gpus, nproc, seq, micro_batch, steps, warmup, precision, out, work_dir,
          timeout, repeat):
    """Throughput and memory of each backend x model, each a short real training run, beside the HF
    Trainer and a hand-written loop run the same way. Writes one JSON per run, RESULTS.md and chart.png."""
    from benchmarks.runner import run_matrix
    gpus, procs = _processes(gpus, nproc, default_nproc=2)
    if min(procs, seq, micro_batch, steps, repeat) < 1 or warmup < 0:
        raise EngineError("--nproc, --seq, --micro-batch, --steps and --repeat must be >= 1, --warmup >= 0")
    backends = _default_bench_specs() if backends is None else [b for b in backends.split(",") if b.strip()]
    specs = backends + [b for b in baselines.split(",") if b.strip()]
    try:
        run_matrix(specs, [m for m in models.split(",") if m.strip()], gpus=gpus, procs=procs, seq=seq,
                   micro_batch=micro_batch, steps=steps, warmup=warmup,
                   precision=precision or ("bf16" if gpus > 0 else "fp32"), out=Path(out) if out else None,
                   work_dir=Path(work_dir), timeout=timeout, repeat=repeat, echo=lambda m: click.echo(m, err=True))
    except ValueError as e:
        raise EngineError(str(e)) from None


def _estimator_inputs(model: str | None, gpu_memory: str, host_memory: str | None):
    """For estimate and recommend: MODEL parsed (None when not given), the GPU and host memory per
    node in bytes (host: this machine's unless given); the libraries' notes kept quiet."""
    if not _gpu_count():  # the estimator imports DeepSpeed's estimators, which warn otherwise
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from engine import estimate as est, warn_once
    from engine.flops import parse_model
    warn_once.install()  # LoRA counts import PEFT (and bitsandbytes): their notes are not the estimate's
    try:
        return (parse_model(model) if model else None, est.parse_size(gpu_memory),
                est.parse_size(host_memory) if host_memory else est.this_machine_memory())
    except (ValueError, KeyError) as e:
        raise EngineError(str(e)) from None


@main.command()
@click.argument("model", required=False)
@click.option("--largest", is_flag=True, help="instead of MODEL: the largest published model each backend can "
              "train fully on these machines (a sweep from gpt2 to llama-3.1-8b, at --seq, default 2048)")
@click.option("--gpus", type=int, default=8, show_default=True, help="GPUs per node")
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--gpu-memory", default="80GB", show_default=True, help="per GPU, e.g. 80GB, 24GB")
@click.option("--seq", type=int, default=None, help="default: the model's context length")
@click.option("--micro-batch", type=int, default=1, show_default=True, help="per GPU")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--host-memory", default=None, help="host RAM per node, e.g. 128GB (default: this machine's)")
@click.option("--lora", "lora_r", type=int, default=None, help="LoRA of this rank (PEFT's default target modules "
              "for the family) instead of full fine-tuning")
@click.option("--quantize", type=click.Choice(["nf4", "fp4"]), default=None, help="QLoRA (with --lora): the base's "
              "linear weights in 4 bits (bitsandbytes), as model.lora.quantize; rows of backends that keep them")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (bytes)")
def estimate(model, largest, gpus, nodes, gpu_memory, seq, micro_batch, precision, host_memory, lora_r, quantize,
             as_json):
    """Predicted memory per GPU for each backend/stage/offload, and which fit: engine estimate gpt2-xl --gpus 8"""
    import json as _json
    if (model is None) == (not largest):
        raise EngineError("give a MODEL or --largest (not both)")
    arch, memory, host = _estimator_inputs(model, gpu_memory, host_memory)
    from engine import estimate as est
    if min(gpus, nodes, micro_batch) < 1 or (lora_r is not None and lora_r < 1):
        raise EngineError("--gpus, --nodes, --micro-batch and --lora must be >= 1")
    if quantize and not lora_r:
        raise EngineError(f"--quantize {quantize} (QLoRA) trains LoRA adapters over the 4-bit base: add --lora R")
    how = (f"with LoRA r={lora_r}" + (f" over a 4-bit ({quantize}) base" if quantize else "")) if lora_r else "fully"
    if largest:
        seq = seq or 2048
        found = est.largest_models(gpus, nodes, seq, micro_batch, precision, memory, host, lora_r, bool(quantize))
        click.echo(f"largest model each backend can train {how}: {gpus} GPU(s) of {memory / 2**30:.0f} GiB x {nodes} "
                   f"node(s), {host / 2**30:.0f} GiB host memory per node, seq {seq}, micro-batch {micro_batch}, "
                   f"{precision} (sweep: {', '.join(est.SWEEP)})")
        for row, hit in found.items():
            click.echo(f"{row:28s} " + (f"{hit[0]:14s} {hit[1] / 1e9:5.2f}B" + ("  with gradient checkpointing"
                                                                          if hit[2] else "") if hit else "none"))
        return
    seq = seq or arch.context
    from engine.flops import lora_params
    trainable = lora_params(model, lora_r) if lora_r else None
    rows = est.estimate(model, gpus, nodes, seq=seq, micro_batch=micro_batch, precision=precision, gpu_memory=memory,
                        host_memory=host, lora_trainable=trainable, quantized=bool(quantize))
    if as_json:
        click.echo(_json.dumps({"model": model, "gpus_per_node": gpus, "nodes": nodes, "seq": seq,
                                "micro_batch": micro_batch, "precision": precision, "gpu_memory": memory,
                                "host_memory": host, "lora_r": lora_r, "lora_trainable": trainable,
                                "quantize": quantize, "rows": [r.to_dict() for r in rows]}, indent=1))
    else:
        base = ("frozen weights only (no gradients or AdamW state)" if not quantize else
                f"frozen, its linear weights in 4 bits ({quantize}: {est.quantized_base_bytes(model) / 2**30:.2f} GiB "
                f"with their quantization state; the rest fp32 as loaded); rows of the backends that keep "
                f"bitsandbytes' 4-bit layers only")
        click.echo(est.format_table(model, rows, gpus, nodes, seq, micro_batch, precision, memory, host)
                   + (f"\nLoRA r={lora_r}: {trainable:,} trainable parameters (PEFT's default targets); the base is "
                      + base if lora_r else ""))


@main.command()
@click.argument("model")
@click.option("--gpus", type=int, default=1, show_default=True, help="GPUs per node; 0 = CPU processes (--nproc)")
@click.option("--nproc", type=int, default=2, show_default=True, help="CPU processes per node when --gpus 0")
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--device", default=None, help="GPU name for the peak FLOP/s and the measured results to use "
              "(default: this machine's GPU; H100 when it has none)")
@click.option("--gpu-memory", default="80GB", show_default=True, help="per GPU")
@click.option("--host-memory", default=None, help="host RAM per node (default: this machine's)")
@click.option("--seq", type=int, default=None, help="default: the model's context length")
@click.option("--micro-batch", type=int, default=1, show_default=True, help="per GPU / process")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="default: bf16 on GPUs, fp32 on CPU")
@click.option("--results", "results_dirs", multiple=True, type=click.Path(file_okay=False),
              help="bench results to rank by (default: the project's benchmarks/results and runs/bench)")
@click.option("--lora", "lora_r", type=int, default=None, help="LoRA of this rank instead of full fine-tuning")
def recommend(model, gpus, nproc, nodes, device, gpu_memory, host_memory, seq, micro_batch, precision, results_dirs,
              lora_r):
    """Which backend to use: those that fit, ranked by expected tokens/s, measured where a bench of the
    same job on the same device class exists: engine recommend gpt2-xl --gpus 8"""
    arch, memory, host = _estimator_inputs(model, gpu_memory, host_memory)
    from benchmarks.recommend import COMMITTED_RESULTS, format_choices, recommend as rank
    if min(nodes, micro_batch, nproc, lora_r or 1) < 1 or gpus < 0:
        raise EngineError("--nodes, --nproc, --micro-batch and --lora must be >= 1, --gpus >= 0")
    if gpus:
        here = _gpu_count()
        if device is None and here:
            from benchmarks.runner import device_info
            info = device_info(1)
        else:
            info = {"kind": "cuda", "gpu_name": device or "H100"}
            if device is None:
                click.echo("(no GPU here: assuming H100; --device names another)", err=True)
    else:
        info = {"kind": "cpu"}
    dirs = [Path(d) for d in results_dirs] or [COMMITTED_RESULTS, Path("runs") / "bench"]
    left_out = []
    choices = rank(model, gpus, nodes, seq or arch.context, micro_batch, precision or ("bf16" if gpus else "fp32"),
                   memory, host, info, gpus or nproc, [d for d in dirs if d.is_dir()], left_out, lora_r)
    click.echo(format_choices(model, choices, gpus, nodes, nproc, left_out))


if __name__ == "__main__":
    main()
