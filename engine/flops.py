"""Named architectures (random init from config), parameter counts and model FLOPs per token.

FLOPs per trained token (forward + backward), the PaLM / nanoGPT convention (Chowdhery et al.
2022, appendix B):

    flops_per_token = 6 * N_matmul + 12 * n_layer * d_attn * seq_len

N_matmul is every parameter that takes part in a matrix multiply: all parameters minus the
input embedding tables (token and position lookups cost no FLOPs) plus the LM head (d_model x
vocab, counted once whether or not it is tied to the token embedding). 6 = 2 (multiply-add) x 3
(forward, backward to activations, backward to weights). The second term is attention's
score and value products (QK^T and AV, 2 x 2 x seq x d_attn per token per layer forward, x3 with
backward; d_attn = query heads x head size: d_model unless the config sets head_dim apart),
counted without halving for the causal mask, as PaLM does. Gradient checkpointing's recomputation
is not counted: this is *model* FLOPs (MFU), not hardware FLOPs.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# HF config kwargs for each name; real sizes (vocab, context) of the published checkpoints.
ARCHS: dict[str, dict] = {
    "gpt2": {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024,
             "vocab_size": 50257},
    "gpt2-medium": {"model_type": "gpt2", "n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024,
                    "vocab_size": 50257},
    "gpt2-large": {"model_type": "gpt2", "n_layer": 36, "n_embd": 1280, "n_head": 20, "n_positions": 1024,
                   "vocab_size": 50257},
    "gpt2-xl": {"model_type": "gpt2", "n_layer": 48, "n_embd": 1600, "n_head": 25, "n_positions": 1024,
                "vocab_size": 50257},
    "gpt-neo-1.3B": {"model_type": "gpt_neo", "num_layers": 24, "hidden_size": 2048, "num_heads": 16,
                     "max_position_embeddings": 2048, "vocab_size": 50257, "window_size": 256,
                     "attention_types": [[["global", "local"], 12]]},
    "gpt-neo-2.7B": {"model_type": "gpt_neo", "num_layers": 32, "hidden_size": 2560, "num_heads": 20,
                     "max_position_embeddings": 2048, "vocab_size": 50257, "window_size": 256,
                     "attention_types": [[["global", "local"], 16]]},
    "gpt-j-6B": {"model_type": "gptj", "n_layer": 28, "n_embd": 4096, "n_head": 16, "n_positions": 2048,
                 "rotary_dim": 64, "vocab_size": 50400, "tie_word_embeddings": False},
    # today's families (grouped-query attention, gated MLP, RMSNorm, rotary): the published configs
    "llama-3.2-1b": {"model_type": "llama", "num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 8192, "max_position_embeddings": 131072,
                     "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0},
    "llama-3.1-8b": {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 14336, "max_position_embeddings": 131072,
                     "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500000.0},
    "qwen2.5-0.5b": {"model_type": "qwen2", "num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864, "max_position_embeddings": 32768,
                     "vocab_size": 151936, "tie_word_embeddings": True},
    # Qwen3: Qwen2's layout plus per-head query/key norms, head_dim 128 whatever the width
    "qwen3-0.6b": {"model_type": "qwen3", "num_hidden_layers": 28, "hidden_size": 1024, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
                   "max_position_embeddings": 40960, "vocab_size": 151936, "tie_word_embeddings": True},
    "qwen3-8b": {"model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 4096, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
                 "max_position_embeddings": 40960, "vocab_size": 151936, "tie_word_embeddings": False},
    "mistral-7b": {"model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "intermediate_size": 14336, "max_position_embeddings": 32768,
                   "vocab_size": 32000, "tie_word_embeddings": False},
    "llama-tiny": {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512,
                   "vocab_size": 8192},
    # CPU sizes: a few seconds per step on one core
    "tiny": {"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 512,
             "vocab_size": 8192},
    # CPU memory checks: wide enough that model states (~60M params) dwarf per-process overheads
    "tiny-wide": {"model_type": "gpt2", "n_layer": 4, "n_embd": 1024, "n_head": 16, "n_positions": 256,
                  "vocab_size": 8192},
    # its Llama counterpart (grouped-query attention, gated MLP, untied head): ~61M params, for full vs LoRA
    "llama-wide": {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 1024, "num_attention_heads": 16,
                   "num_key_value_heads": 4, "intermediate_size": 2816, "max_position_embeddings": 256,
                   "vocab_size": 8192, "tie_word_embeddings": False},
    "micro": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256,
              "vocab_size": 1024},
}

# Dense peak TFLOP/s per device (vendor data sheets; no sparsity). Matched by substring of
# torch.cuda.get_device_name(). fp32 = plain FP32 (torch's default matmul precision, no TF32).
DEVICE_PEAKS_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),   # SXM / HBM3
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("V100", {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7}),
]


def device_peak_tflops(device_name: str, precision: str) -> float | None:
    for key, peaks in DEVICE_PEAKS_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(precision) or None
    return None


@dataclass
class Arch:
    name: str
    kwargs: dict           # HF config kwargs (model_type first)
    n_layer: int
    d_model: int
    n_head: int
    vocab: int
    context: int

    @property
    def attn_width(self) -> int:
        """Query heads x head size: d_model, except where a config sets head_dim apart (Qwen3-0.6B:
        16 x 128 = 2048 on a 1024-wide model)."""
        head_dim = self.kwargs.get("head_dim")
        return self.n_head * head_dim if head_dim else self.d_model


def parse_model(spec: str) -> Arch:
    """`gpt2`, `gpt2-xl`, `tiny`, a custom gpt2 size `gpt2:L=4,d=256,h=4,V=8192`, or any model a user
    has: a local HF folder, a run directory (its model/), a hub name whose config is in the local cache."""
    if spec in ARCHS:
        kwargs = dict(ARCHS[spec])
    elif (saved := saved_config(spec)) is not None:
        kwargs = saved
    else:
        m = re.fullmatch(r"gpt2:(.+)", spec)
        if not m:
            raise ValueError(f"unknown model {spec!r}: not a local HF folder or run directory, not a hub name in "
                             f"the local cache, not one of {', '.join(ARCHS)}, nor gpt2:L=..,d=..,h=..,V=..")
        kw = dict(item.split("=", 1) for item in m.group(1).split(","))
        kwargs = {"model_type": "gpt2", "n_layer": int(kw["L"]), "n_embd": int(kw["d"]), "n_head": int(kw["h"]),
                  "vocab_size": int(kw.get("V", 50257)), "n_positions": int(kw.get("ctx", 1024))}
    g = lambda *names: next(kwargs[n] for n in names if n in kwargs)
    return Arch(spec, kwargs, g("n_layer", "num_layers", "num_hidden_layers"), g("n_embd", "hidden_size"),
                g("n_head", "num_heads", "num_attention_heads"), kwargs["vocab_size"],
                g("n_positions", "max_position_embeddings"))


def saved_config(spec: str) -> dict | None:
    """config.json of a local HF folder, of a run directory's model/ (its base model's, for a LoRA
    run's adapter folder) or of a hub name in the local cache; None if there is none."""
    import json
    from pathlib import Path
    folder = Path(spec).expanduser()
    if (folder / "model").is_dir() and not (folder / "config.json").is_file():
        folder = folder / "model"  # a run directory
    if (folder / "adapter_config.json").is_file():  # LoRA adapters: what is estimated is their base model
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return saved_config(base) if base else None
    path = folder / "config.json"
    if not path.is_file():
        from engine.hub import looks_like_hub_id
        if not looks_like_hub_id(spec):
            return None
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(spec, "config.json")
        except Exception:  # not a valid repo id
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    config = json.loads(path.read_text())
    return config if "model_type" in config else None


def hf_config(arch: Arch, **extra):
    from transformers import AutoConfig
    kwargs = dict(arch.kwargs)
    model_type = kwargs.pop("model_type")
    if arch.vocab <= 50256:  # small-vocab CPU sizes: GPT-2's default special ids would be out of range
        kwargs.setdefault("bos_token_id", 0)
        kwargs.setdefault("eos_token_id", 0)
    return AutoConfig.for_model(model_type, **kwargs, **extra)


@dataclass
class ParamCounts:
    total: int             # unique parameters (tied weights once)
    embedding: int         # input lookup tables (token + position)
    lm_head: int           # d_model x vocab
    largest_layer: int     # largest single module's own parameters (DeepSpeed ZeRO-3 estimator input)
    tied: bool = True      # the LM head is the token embedding (then `total` holds it once, as a lookup table)

    @property
    def matmul(self) -> int:
        # an untied head is already in `total` (and not in `embedding`); a tied one only as the lookup table
        return self.total - self.embedding + (self.lm_head if self.tied else 0)


@functools.lru_cache(maxsize=32)
def param_counts(spec: str) -> ParamCounts:
    """Counted on the meta device: no memory is allocated, whatever the model size."""
    import torch
    from transformers import AutoModelForCausalLM

    arch = parse_model(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(arch))
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return ParamCounts(total, embedding, arch.d_model * arch.vocab, largest, tied)


@functools.lru_cache(maxsize=32)
def quantized_params(spec: str) -> tuple[int, int]:
    """(weights, layers) QLoRA's bitsandbytes config stores in 4 bits on a causal LM of `spec`: every
    linear layer's weight (GPT-2's Conv1D too) except the output head, which transformers keeps as
    loaded (engine.modeling.quantization_config); counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(parse_model(spec)))
    head = model.get_output_embeddings()
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]
    return sum(m.weight.numel() for m in layers), len(layers)


def flops_per_token(spec: str, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), formula in the module docstring."""
    arch = parse_model(spec)
    return 6.0 * param_counts(spec).matmul + 12.0 * arch.n_layer * arch.attn_width * seq_len


@functools.lru_cache(maxsize=32)
def lora_params(spec: str, r: int) -> int:
    """Trainable parameters of PEFT's LoRA (rank r, its default target modules for the family) on a
    causal LM of `spec`, counted as PEFT builds them, on the meta device."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    arch = parse_model(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(arch))
        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=r,
                                                 fan_in_fan_out=arch.kwargs["model_type"] == "gpt2"))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

