"""Predicted memory per rank for every backend / ZeRO stage / offload, with and without gradient
checkpointing, and whether it fits a given device.

The rows come from the backends, in registry order: each backend class lists its own
(`Backend.estimate_rows()`, `backends.base.EstimateRow`) as data: ZeRO stage (None = replicated),
optimizer/parameter offload, whether DeepSpeed's estimator functions apply, and for replicated rows
the all-reduce bucket and autocast weight copies. Nothing here names a backend.

Sources, per row (the `source` field says which):
- `deepspeed`: DeepSpeed's own estimators, `estimate_zero2_model_states_mem_needs` and
  `estimate_zero3_model_states_mem_needs` (what `estimate_zero{2,3}_model_states_mem_needs_all_live`
  print), for ZeRO-2/3 with 16-bit training. They assume mixed precision (16-bit params and grads,
  fp32 master weights and Adam moments) and the default 1.5 host buffer factor.
- `formula`: ours, in bytes per parameter (P = parameter count, N = ranks, L = largest layer's
  parameters, the gather buffer ZeRO-3 needs):

  | backend                        | 16-bit (bf16/fp16)                    | fp32                         |
  |--------------------------------|---------------------------------------|------------------------------|
  | ddp, colossal:torch_ddp        | 4 p + 4 g + 8 opt + 4 bucket + 2 cast | 4 p + 4 g + 8 opt + 4 bucket |
  | deepspeed:zero0                | 2 p + 6 g + 12 opt                    | 4 p + 4 g + 8 opt            |
  | deepspeed:zero1, colossal:zero1| 2 p + (2 + 4/N) g + 12/N opt          | 4 p + 4 g + 12/N opt         |
  | deepspeed:zero2, colossal:zero2| 2 p + 6/N g + 12/N opt  (= DeepSpeed) | 4 p + 4/N g + 12/N opt       |
  | deepspeed:zero3, colossal:gemini| (2 p + 4 g + 12 opt)/N + 4 L (= DeepSpeed) | (4 + 4 + 12)/N + 4 L   |

  DDP/torch_ddp keep fp32 weights under autocast (the 2 "cast" bytes are autocast's bf16 weight
  copies) and a gradient bucket copy when N > 1 (torch_ddp also on one rank: it always wraps).
  DeepSpeed ZeRO 1-3 add their reduce buffer, allocated whole: reduce_bucket_size (5e8 elements
  by default) in the weights' width, 954 MiB in 16 bits, whatever the model's size.
  DeepSpeed/ColossalAI ZeRO keep an fp32 master copy of their partition even in fp32 runs (12 =
  master 4 + Adam moments 8). Offload moves the optimizer (and with +offload on ZeRO-3 also the
  parameters) to host memory, per node, with DeepSpeed's buffer factor 1.5.

QLoRA (`quantized=True`, with lora_trainable): on the rows whose backend keeps bitsandbytes' 4-bit
layers, the base's linear weights at QUANT_BYTES_PER_WEIGHT (+ QUANT_BYTES_PER_LAYER), the rest of
the base fp32 plus autocast's 16-bit copies; the adapters as in LoRA.

Activations per rank, micro-batch b, sequence s, width h, heads a, layers l, vocabulary V, in the
form of Korthikanti et al. 2022 ("Reducing Activation Recomputation", no tensor parallelism) with
per-layer constants measured on the H200 (benchmarks/results/h200-x1, GPT-2 124M at 16 x 1024 and
GPT-2-XL at 8 x 1024, bf16, SDPA attention, dropout off; two sizes give the two unknowns):
  per layer       c * s*b*h bytes: c = 74 under autocast over fp32 weights (DDP, torch_ddp, the
                  HF Trainer; layer norms and GELU's pow/tanh run in fp32 there), 44 with 16-bit
                  weights (DeepSpeed, ColossalAI ZeRO/Gemini, FSDP2's bf16 policy), 88 in fp32 (the
                  16-bit tensors at 4 bytes; not measured). Their paper's 34 assumes fused kernels:
                  transformers' GPT-2 saves ~2x that (gelu_new alone keeps four 4h tensors).
                  Plus 5*a*s^2*b (16-bit) or 9*a*s^2*b (fp32) when attention is not a fused
                  SDPA/flash kernel (GPT-Neo and GPT-J run eager attention)
  logits + loss   b*s*V*14 bytes (16-bit: logits, their fp32 upcast, log-softmax, its gradient;
                  fitted 13.5) or 12 (fp32)
  with gradient checkpointing: each block's input (4*s*b*h, fp32 residual stream) for all l
  layers, plus one layer's full activations while it is recomputed, plus logits + loss.

A configuration fits when params + grads + optimizer + buffers + activations <= 90% of the
device memory (10% is left for the CUDA context, allocator fragmentation and workspace).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from engine.flops import param_counts, parse_model

if TYPE_CHECKING:
    from backends.base import EstimateRow

GiB = 2 ** 30
FIT_FRACTION = 0.9
BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor default for host memory

EAGER_ATTENTION = ("gpt_neo", "gptj")


@dataclass
class Estimate:
    backend: str
    source: str             # deepspeed | formula
    params: int             # bytes per rank on the device
    grads: int
    optim: int
    buffers: int
    act_full: int
    act_ckpt: int
    host_per_node: int      # host memory per node (see HOST_COLUMN)
    gpu_fits_full: bool = False  # the device part (without / with gradient checkpointing)
    gpu_fits_ckpt: bool = False
    host_fits: bool = True       # the host part (per node, against the host memory given)

    @property
    def fits_full(self) -> bool:
        return self.gpu_fits_full and self.host_fits

    @property
    def fits_ckpt(self) -> bool:
        return self.gpu_fits_ckpt and self.host_fits

    def verdict(self, checkpointing: bool) -> str:
        """`yes`, or which limit fails: `no(gpu)`, `no(host)`, `no(both)`."""
        gpu = self.gpu_fits_ckpt if checkpointing else self.gpu_fits_full
        if gpu and self.host_fits:
            return "yes"
        return "no(" + ("both" if not gpu and not self.host_fits else "gpu" if not gpu else "host") + ")"

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optim + self.buffers

    @property
    def total_full(self) -> int:
        return self.model_states + self.act_full

    @property
    def total_ckpt(self) -> int:
        return self.model_states + self.act_ckpt

    def to_dict(self) -> dict:
        return {**asdict(self), "model_states": self.model_states, "total_full": self.total_full,
                "total_ckpt": self.total_ckpt, "fits_full": self.fits_full, "fits_ckpt": self.fits_ckpt}


# bytes per s*b*h per layer (module docstring): measured on the H200, fp32 by the tensors' width
PER_LAYER_AUTOCAST, PER_LAYER_16BIT, PER_LAYER_FP32 = 74, 44, 88


def activation_bytes(model: str, seq: int, micro_batch: int, precision: str, *,
                     autocast: bool) -> tuple[int, int]:
    """(without, with) gradient checkpointing, per rank; formulas in the module docstring.
    autocast: 16-bit compute over fp32 weights (EstimateRow.autocast_copy); else 16-bit weights."""
    arch = parse_model(model)
    s, b, h, a, l, V = seq, micro_batch, arch.d_model, arch.n_head, arch.n_layer, arch.vocab
    half = precision != "fp32"
    c = (PER_LAYER_AUTOCAST if autocast else PER_LAYER_16BIT) if half else PER_LAYER_FP32
    per_layer = c * s * b * h
    if arch.kwargs["model_type"] in EAGER_ATTENTION:
        per_layer += (5 if half else 9) * a * s * s * b
    logits = (14 if half else 12) * b * s * V
    return l * per_layer + logits, l * 4 * s * b * h + per_layer + logits


def deepspeed_model_states(total: int, largest: int, gpus_per_node: int, nodes: int, stage: int,
                           offload_opt: bool, offload_params: bool) -> tuple[int, int]:
    """(device bytes per rank, host bytes per node) from DeepSpeed's estimator functions."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=offload_opt,
                                                         additional_buffer_factor=BUFFER_FACTOR)
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes,
                                                            cpu_offload=offload_opt, cpu_offload_params=offload_params,
                                                            zero_init=True, additional_buffer_factor=BUFFER_FACTOR)
    return gpu, cpu


def estimate_rows(listed_only: bool = True) -> tuple[EstimateRow, ...]:
    """Every backend's rows (`Backend.estimate_rows`), in registry order; `listed_only=False` adds
    the rows kept out of the table (only bench runs are mapped to them)."""
    from backends.base import backend_class, backend_names
    return tuple(row for name in backend_names() for row in backend_class(name).estimate_rows()
                 if row.listed or not listed_only)


def replicated_row() -> EstimateRow:
    """The first replicated row (fp32 weights, grads and AdamW on every rank): plain PyTorch DDP,
    the row of the bench's HF Trainer and hand-loop baselines."""
    return next(row for row in estimate_rows() if row.zero_stage is None)


def estimate(model: str, gpus_per_node: int, nodes: int = 1, seq: int | None = None, micro_batch: int = 1,
             precision: str = "bf16", gpu_memory: float = 80 * GiB, rows=None,
             host_memory: float | None = None, lora_trainable: int | None = None,
             quantized: bool = False) -> list[Estimate]:
    """One Estimate per row key in `rows` (default: every listed row); formulas in the module docstring.
    host_memory: per node; the `fits` verdicts then need the host column within FIT_FRACTION of it too
    (None: device memory only). lora_trainable: a LoRA run's trainable parameters (lora_params): they
    get gradients and AdamW state, the base only its frozen weights (_frozen_base). quantized: QLoRA,
    the base's linear weights in 4 bits (quantized_base_bytes); only rows whose backend keeps them."""
    if quantized and lora_trainable is None:
        raise ValueError("a 4-bit (QLoRA) base needs LoRA adapters (lora_trainable)")
    table = {row.key: row for row in estimate_rows(listed_only=False)}
    if rows is None:
        selected = [row for row in table.values() if row.listed and (row.quantized_base or not quantized)]
    else:
        unknown = [key for key in rows if key not in table]
        if unknown:
            raise ValueError(f"no estimate row {', '.join(map(repr, unknown))}; rows: {', '.join(table)}")
        selected = [table[key] for key in rows]
        refused = [row.key for row in selected if quantized and not row.quantized_base]
        if refused:
            raise ValueError(f"no 4-bit (QLoRA) base on {', '.join(refused)}; rows that keep one: "
                             + ", ".join(row.key for row in table.values() if row.quantized_base))
    counts = param_counts(model)
    arch = parse_model(model)
    seq = seq or arch.context
    P, L, N = counts.total, counts.largest_layer, gpus_per_node * nodes
    half = precision != "fp32"
    activations = {autocast: activation_bytes(model, seq, micro_batch, precision, autocast=autocast)
                   for autocast in {row.autocast_copy for row in selected}}  # the model is read once per kind
    out = []
    for row in selected:
        act_full, act_ckpt = activations[row.autocast_copy]
        if lora_trainable is None:
            p, g, o, buf, host = _states(row, P, L, N, nodes, half)
            source = "formula"
            if half and row.deepspeed_estimator and row.zero_stage in (2, 3):
                # DeepSpeed's own figures; our split above sums to the same device total
                gpu, host = deepspeed_model_states(P, L, gpus_per_node, nodes, row.zero_stage, row.offload_optimizer,
                                                   row.offload_params)
                source = "deepspeed"
                ours = p + g + o + buf
                if ours != gpu:  # keep DeepSpeed's total; put the difference into buffers
                    buf += gpu - ours
        else:  # the adapters train as a model of lora_trainable parameters would; the base is frozen weights only
            p, g, o, buf, host = _states(row, lora_trainable, 0, N, nodes, half)
            base, base_host = (_quantized_base(row, model, P, half) if quantized
                               else _frozen_base(row, P, L, N, nodes, half))
            p, host, source = p + base, host + base_host, "formula+qlora" if quantized else "formula+lora"
        buf += row.reduce_bucket * (2 if half else 4)  # on the device, offloaded or not
        e = Estimate(row.key, source, int(p), int(g), int(o), int(buf), act_full, act_ckpt, int(host))
        e.host_fits = host_memory is None or e.host_per_node <= FIT_FRACTION * host_memory
        e.gpu_fits_full = e.total_full <= FIT_FRACTION * gpu_memory
        e.gpu_fits_ckpt = e.total_ckpt <= FIT_FRACTION * gpu_memory
        out.append(e)
    return out


def _states(row, P: int, L: int, N: int, nodes: int, half: bool) -> tuple[int, int, int, int, int]:
    """(params, grads, optim, buffers on the device per rank, host per node) of P trained
    parameters (largest layer L) under the row; formulas in the module docstring."""
    stage, host = row.zero_stage, 0
    if stage is None:  # replicated
        p, g, o = 4 * P, 4 * P, 8 * P
        bucket = row.grad_bucket and (N > 1 or row.grad_bucket_one_rank)
        buf = (4 * P if bucket else 0) + (2 * P if row.autocast_copy and half else 0)
    elif stage == 0:
        p, g, o, buf = (2 * P, 6 * P, 12 * P, 0) if half else (4 * P, 4 * P, 8 * P, 0)
    elif stage == 1:
        p, g, o, buf = (2 * P, 2 * P + 4 * P // N, 12 * P // N, 0) if half else (4 * P, 4 * P, 12 * P // N, 0)
    elif stage == 2:
        p, g, o, buf = (2 * P, 6 * P // N, 12 * P // N, 0) if half else (4 * P, 4 * P // N, 12 * P // N, 0)
    else:
        pb = 2 if half else 4
        p, g, o, buf = pb * P // N, 4 * P // N, 12 * P // N, 4 * L
    if row.offload_optimizer:
        host = int((g + o) * N / nodes * BUFFER_FACTOR)
        g, o = 0, 0
        if row.offload_params:
            host += int(p * N / nodes * BUFFER_FACTOR)
            p = 0
    return p, g, o, buf, host


def _frozen_base(row, P: int, L: int, N: int, nodes: int, half: bool) -> tuple[int, int]:
    """(device bytes per rank, host bytes per node) of a LoRA run's frozen base weights: as the
    engine loads them (fp32) on replicated rows (plus autocast's 16-bit copies), in the training
    precision on ZeRO rows (DeepSpeed casts the module), sharded on ZeRO-3 rows (plus one gathered
    layer), in host memory where the row offloads parameters. No gradients, no optimizer state."""
    width = 2 if half else 4
    if row.zero_stage is None:
        return 4 * P + (2 * P if row.autocast_copy and half else 0), 0
    if row.zero_stage < 3:
        return width * P, 0
    if row.offload_params:
        return 4 * L, int(width * P * N / nodes * BUFFER_FACTOR)
    return width * P // N + 4 * L, 0


# bitsandbytes' 4-bit layout (blocksize 64, double quantization: the per-block absmax in uint8, one
# fp32 absmax per 256 of those), per layer its 16-entry 4-bit code, the nested 256-entry uint8 code
# and offset, all fp32
QUANT_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
QUANT_BYTES_PER_LAYER = 4 * (16 + 256 + 1)


def quantized_base_bytes(model: str) -> int:
    """Device bytes of QLoRA's 4-bit linear weights of `model` (engine.flops.quantized_params)."""
    from engine.flops import quantized_params
    weights, layers = quantized_params(model)
    return int(QUANT_BYTES_PER_WEIGHT * weights) + QUANT_BYTES_PER_LAYER * layers


def _quantized_base(row, model: str, P: int, half: bool) -> tuple[int, int]:
    """(device bytes per rank, host bytes per node) of QLoRA's frozen base on a replicated row: the
    linear weights in 4 bits (dequantized a layer at a time, so no lasting 16-bit copy), the rest
    (embeddings, norms, biases, the head) fp32 as loaded, with autocast's 16-bit copies."""
    from engine.flops import quantized_params
    rest = P - quantized_params(model)[0]
    return quantized_base_bytes(model) + 4 * rest + (2 * rest if row.autocast_copy and half else 0), 0


# the sweep of `engine estimate --largest`: the published architectures the estimator knows
SWEEP = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-neo-1.3B", "gpt-neo-2.7B", "gpt-j-6B",
         "qwen2.5-0.5b", "llama-3.2-1b", "mistral-7b", "llama-3.1-8b")


def largest_models(gpus_per_node: int, nodes: int, seq: int, micro_batch: int, precision: str, gpu_memory: float,
                   host_memory: float, lora_r: int | None = None,
                   quantized: bool = False) -> dict[str, tuple[str, int, bool] | None]:
    """Row -> (the largest model of SWEEP that fits it, its parameter count, needs gradient
    checkpointing), None when none does; full fine-tuning (or LoRA of rank lora_r, over a 4-bit base
    if quantized), at `seq` tokens."""
    from engine.flops import lora_params
    best: dict[str, tuple[str, int, bool] | None] = {row.key: None for row in estimate_rows()
                                                     if row.quantized_base or not quantized}
    for model in sorted(SWEEP, key=lambda m: param_counts(m).total):
        for e in estimate(model, gpus_per_node, nodes, seq=seq, micro_batch=micro_batch, precision=precision,
                          gpu_memory=gpu_memory, host_memory=host_memory,
                          lora_trainable=lora_params(model, lora_r) if lora_r else None, quantized=quantized):
            if e.fits_full or e.fits_ckpt:
                best[e.backend] = (model, param_counts(model).total, not e.fits_full)
    return best


def this_machine_memory() -> float:
    """Physical memory of this machine, bytes (the default host memory of `engine estimate`)."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def parse_size(text: str) -> float:
    """`80GB`, `80GiB`, `24G`, `81920MB` -> bytes (GB and GiB both read as 2^30: what nvidia-smi shows)."""
    t = text.strip().upper().replace("IB", "B")
    for suffix, mult in (("TB", 2 ** 40), ("GB", GiB), ("MB", 2 ** 20), ("T", 2 ** 40), ("G", GiB), ("M", 2 ** 20)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * mult
    return float(t) * GiB


HOST_COLUMN = ("host = host memory per node, GiB: offloaded states on +offload rows (x1.5 buffers); on DeepSpeed "
               "ZeRO-2/3 rows DeepSpeed's own estimate, which without offload is loading the fp32 weights "
               "(4 B/param per GPU process x1.5; ZeRO-3 builds partitioned: its largest layer); 0 = nothing counted")


def format_table(model: str, rows: list[Estimate], gpus_per_node: int, nodes: int, seq: int, micro_batch: int,
                 precision: str, gpu_memory: float, host_memory: float | None = None) -> str:
    counts = param_counts(model)
    g = lambda b: f"{b / GiB:8.2f}"
    host = (f"; host memory {host_memory / GiB:.0f} GiB per node (fits needs host <= {FIT_FRACTION:.0%} of it too)"
            if host_memory is not None else "")
    lines = [f"{model}: {counts.total / 1e6:,.1f}M parameters (largest layer {counts.largest_layer / 1e6:,.1f}M); "
             f"{gpus_per_node} GPU(s) x {nodes} node(s); seq {seq}, micro-batch {micro_batch} per GPU, {precision}; "
             f"device memory {gpu_memory / GiB:.0f} GiB (fits = total <= {FIT_FRACTION:.0%} of it){host}",
             "GiB per GPU; act = activations without / with gradient checkpointing; " + HOST_COLUMN,
             f"{'backend':30s} {'params':>8s} {'grads':>8s} {'optim':>8s} {'buffers':>8s} {'states':>8s} "
             f"{'act':>8s} {'act+gc':>8s} {'total':>8s} {'total+gc':>8s} {'host':>8s}  {'fits':9s} {'fits+gc':9s} source"]
    for e in rows:
        lines.append(f"{e.backend:30s} {g(e.params)} {g(e.grads)} {g(e.optim)} {g(e.buffers)} {g(e.model_states)} "
                     f"{g(e.act_full)} {g(e.act_ckpt)} {g(e.total_full)} {g(e.total_ckpt)} {g(e.host_per_node)}  "
                     f"{e.verdict(False):9s} {e.verdict(True):9s} {e.source}")
    return "\n".join(lines)
