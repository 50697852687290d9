"""Which backend to use for a model on given machines: the rows of `engine estimate` that fit,
ranked by expected tokens/s, each with the reason for its place.

Two sources, said per row:
- measured: an `engine bench` result of the same model on the same device class (the same GPU
  name, or a CPU with the same process count), from ONE bench session (ratios across sessions are
  not comparable: another day, another machine); the file is named;
- estimated: a step-time model, relative to a measured row of that session when there is one
  (then in tokens/s), else from FLOPs at an assumed MFU on the device's peak. Per optimizer step
  and device:
      compute   6 N + 12 L d s FLOPs per token (engine.flops) at ASSUMED_MFU of the dense peak;
                x 4/3 when only gradient checkpointing makes the row fit (one more forward)
      network   gradient all-reduce 2 x P x 2 bytes (ring, bf16/fp16; 4 bytes in fp32) for
                replicated, ZeRO-1/2 and FSDP grad_op (reduce-scatter + all-gather moves the same);
                x 1.5 for ZeRO-3, Gemini and FSDP full (parameters gathered for forward and
                backward, gradients reduce-scattered); nothing on one device; at INTRA_NODE_GBPS
                within a node, INTER_NODE_GBPS across nodes; not overlapped with compute
      offload   optimizer offload: gradients down and parameters up over PCIe (2 x P/ranks x 2
                bytes at PCIE_GBPS) plus a CPU Adam step (CPU_ADAM_PARAMS_PER_S); parameter
                offload: the parameters up again for every forward and backward (2 x P x 2 bytes)
These are assumptions, stated as such; a measurement of the same session always wins.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ASSUMED_MFU = 0.40
INTRA_NODE_GBPS = 300.0     # NVLink-class, per GPU
INTER_NODE_GBPS = 25.0      # 200 Gb/s InfiniBand/Ethernet, per node
PCIE_GBPS = 25.0            # host <-> device, per GPU
CPU_ADAM_PARAMS_PER_S = 2e9  # DeepSpeedCPUAdam, AVX-512, all cores of a node, per node
COMMITTED_RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Choice:
    row: str                    # the `engine estimate` row, e.g. deepspeed:zero3+offload
    needs_checkpointing: bool   # fits only with gradient checkpointing
    tokens_per_s: float | None  # expected (measured or estimated); None: relative only
    relative: float             # step-time model: tokens/s relative to the best row (1.0)
    basis: str                  # measured | estimated
    reason: str                 # one line
    command: str                # what to run


@dataclass
class Excluded:
    row: str
    reason: str


def step_seconds(row, params: int, flops_per_token: float, tokens_per_device_step: int, devices: int, nodes: int,
                 precision: str, peak_flops: float, needs_checkpointing: bool, lora: bool = False) -> float:
    """The step-time model of the module docstring, per device (seconds). lora: `params` are the
    adapters' (what is reduced and stepped), and the backward skips the frozen weights' gradients
    (4 N instead of 6 N FLOPs per token)."""
    grad_bytes = 4 if precision == "fp32" else 2
    compute = tokens_per_device_step * flops_per_token * (2 / 3 if lora else 1) / (peak_flops * ASSUMED_MFU)
    if needs_checkpointing:
        compute *= 4 / 3
    network = 0.0
    if devices > 1:
        volume = 2 * params * grad_bytes * (1.5 if row.zero_stage == 3 else 1.0)
        bandwidth = (INTER_NODE_GBPS if nodes > 1 else INTRA_NODE_GBPS) * 1e9
        network = volume * (devices - 1) / devices / bandwidth
    offload = 0.0
    if row.offload_optimizer:
        offload += 2 * params / devices * 2 / (PCIE_GBPS * 1e9)
        offload += params / nodes / CPU_ADAM_PARAMS_PER_S
    if row.offload_params:
        offload += 2 * params * 2 / (PCIE_GBPS * 1e9)
    return compute + network + offload


def measured_session(results_dirs: list[Path], model: str, device: dict, procs: int, precision: str, seq: int,
                     micro_batch: int) -> tuple[str, dict[str, tuple[float | str, Path]]]:
    """(session, row -> (tokens/s, file)) of the bench session with the most engine rows of this
    model on this device class, job and precision; ("", {}) when there is none. A row that failed
    there has its error message instead of tokens/s."""
    sessions: dict[str, dict[str, tuple[float | str, Path]]] = {}
    for folder in results_dirs:
        for path in sorted(Path(folder).rglob("*.json")):
            try:
                r = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not (isinstance(r, dict) and r.get("system") == "engine" and r.get("model") == model and r.get("precision") == precision and r.get("seq") == seq
                    and r.get("micro_batch") == micro_batch and r.get("procs") == procs
                    and not r.get("overrides") and _same_device(r.get("device") or {}, device)):
                continue
            row = (r.get("estimate") or {}).get("row")
            if row:
                got = r["tokens_per_s"]["median"] if r.get("outcome") == "ok" else str(r.get("message", "failed"))
                sessions.setdefault(r.get("session", ""), {})[row] = (got, path)
    if not sessions:
        return "", {}
    best = max(sessions, key=lambda s: (len(sessions[s]), s))  # most rows, then the newest
    return best, sessions[best]


def _same_device(recorded: dict, here: dict) -> bool:
    if here.get("kind") != recorded.get("kind"):
        return False
    if here["kind"] == "cpu":
        return True  # CPU rows compare with CPU rows of the same process count (checked by the caller)
    return (here.get("gpu_name") or "").lower() in (recorded.get("gpu_name") or "").lower()


def recommend(model: str, gpus: int, nodes: int, seq: int, micro_batch: int, precision: str, gpu_memory: float,
              host_memory: float, device: dict, procs: int, results_dirs: list[Path],
              excluded: list[Excluded] | None = None, lora_r: int | None = None) -> list[Choice]:
    """Every row that fits (device and host) and did not fail where it was measured, best first;
    `excluded` collects the rows that fit but failed in the bench session used. `device` as
    benchmarks.runner.device_info records it (kind cpu|cuda, gpu_name); gpus = 0 means `procs`
    CPU processes per node."""
    from engine.estimate import estimate, estimate_rows
    from engine.flops import device_peak_tflops, flops_per_token, param_counts

    rows = {r.key: r for r in estimate_rows()}
    if not gpus:  # CPU processes: everything lives in host memory, shared by the node's processes
        gpu_memory = host_memory / procs
    from engine.flops import lora_params
    trainable = lora_params(model, lora_r) if lora_r else None
    estimates = estimate(model, gpus or procs, nodes, seq=seq, micro_batch=micro_batch, precision=precision,
                         gpu_memory=gpu_memory, host_memory=host_memory, lora_trainable=trainable)
    fitting = [e for e in estimates if e.fits_full or e.fits_ckpt]
    devices = (gpus or procs) * nodes
    params, per_token = param_counts(model).total, flops_per_token(model, seq)
    peak = device_peak_tflops(device.get("gpu_name") or "", precision) if device.get("kind") == "cuda" else None
    # on a CPU (no data-sheet peak) the model's compute part is only relative: 1 TFLOP/s stands in
    peak_flops = (peak or 1.0) * 1e12
    # a bench of full fine-tuning says nothing of a LoRA run's speed (and LoRA bench runs carry overrides)
    session, found = ("", {}) if lora_r else measured_session(results_dirs, model, device, procs, precision, seq,
                                                              micro_batch)
    failed = {row for row, (got, _) in found.items() if isinstance(got, str)}  # it fails here: not a choice
    if excluded is not None:
        excluded += [Excluded(e.backend, f"failed in bench session {session} ({_shown(found[e.backend][1])}): "
                                         f"{found[e.backend][0][:120]}") for e in fitting if e.backend in failed]
    fitting = [e for e in fitting if e.backend not in failed]
    measured = {row: m for row, m in found.items() if row not in failed}

    modelled = {e.backend: step_seconds(rows[e.backend], trainable or params, per_token, seq * micro_batch, devices,
                                        nodes, precision, peak_flops, not e.fits_full, lora=bool(lora_r))
                for e in fitting}
    anchor = next((k for k in modelled if k in measured), None)  # a measured row the others scale from
    choices = []
    for e in fitting:
        rel_model = min(modelled.values()) / modelled[e.backend]
        if e.backend in measured:
            tps, path = measured[e.backend]
            basis, reason = "measured", f"measured {tps:,.0f} tokens/s (bench session {session}, {_shown(path)})"
            if peak is not None:  # how far the model is from what was measured, where it gives tokens/s
                said = seq * micro_batch * devices / modelled[e.backend]
                reason += f"; the step-time model says {said:,.0f} ({said / tps - 1:+.0%})"
            elif e.backend != anchor:
                said = measured[anchor][0] * modelled[anchor] / modelled[e.backend]
                reason += f"; the step-time model, scaled from {anchor}, says {said:,.0f} ({said / tps - 1:+.0%})"
        elif anchor is not None:
            tps = measured[anchor][0] * modelled[anchor] / modelled[e.backend]
            basis, reason = "estimated", (f"estimated {tps:,.0f} tokens/s: {anchor}'s measured "
                                          f"{measured[anchor][0]:,.0f} x the step-time model's ratio "
                                          f"{modelled[anchor] / modelled[e.backend]:.2f} (not measured in session {session})")
        elif peak is not None:
            tps = seq * micro_batch * devices / modelled[e.backend]
            basis, reason = "estimated", (f"estimated {tps:,.0f} tokens/s from FLOPs at {ASSUMED_MFU:.0%} MFU of "
                                          f"{peak:.0f} TFLOP/s plus modelled communication/offload (nothing measured "
                                          "on this device class yet)")
        else:
            tps = None
            basis, reason = "estimated", (f"estimated {rel_model:.2f}x the best row's speed by the step-time model "
                                          "(nothing measured for this job on this device class)")
        if not e.fits_full:
            reason += "; fits only with gradient checkpointing"
        b = _spec(e.backend)
        options = " ".join(f"backend.{b.backend}.{k}={_yaml(v)}" for k, v in b.options.items())
        where = f"--gpus {gpus}" if gpus else f"--gpus 0 --nproc {procs}"
        command = (f"engine launch CONFIG {where}" + (f" --nnodes {nodes}" if nodes > 1 else "")
                   + f" --backend {b.backend}" + (f" {options}" if options else "")
                   + (" train.gradient_checkpointing=true" if not e.fits_full else "")
                   + (f" model.lora.r={lora_r}" if lora_r else "")
                   + (f" train.precision={precision}" if precision != "fp32" else ""))
        choices.append(Choice(e.backend, not e.fits_full, tps, rel_model, basis, reason, command))
    # what was measured first (by its tokens/s), then what is only estimated: a measurement of this job
    # on this device class beats any model of it
    choices.sort(key=lambda c: (c.basis != "measured",
                                -(c.tokens_per_s if c.tokens_per_s is not None else c.relative)))
    return choices


def _spec(row_key: str):
    from benchmarks.runner import parse_backend
    return parse_backend(row_key)


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def format_choices(model: str, choices: list[Choice], gpus: int, nodes: int, procs: int,
                   excluded: list[Excluded] = ()) -> str:
    where = f"{gpus} GPU(s) x {nodes} node(s)" if gpus else f"{procs} CPU process(es) x {nodes} node(s)"
    if not choices:
        return (f"{model} on {where}: no backend fits (see `engine estimate` for what each needs: more GPUs, "
                "offload, a larger --gpu-memory/--host-memory, or LoRA)")
    lines = [f"run: {choices[0].command}", "",
             f"{model} on {where}: {len(choices)} backend configuration(s) fit; measured ones first, by their "
             "tokens/s, then estimated ones (assumptions: benchmarks/recommend.py)"]
    for i, c in enumerate(choices, 1):
        lines.append(f"{i:2d}. {c.row:26s} {c.basis:9s} {c.reason}")
    lines += [f" -  {x.row:26s} left out: {x.reason}" for x in excluded]
    return "\n".join(lines)
