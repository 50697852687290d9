"""Tokenizer and model construction through the real `from_pretrained` / `from_config` paths."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from engine.config import BUILTIN_SAMPLE, Config
from engine.errors import EngineError
from engine.hub import check_hub_name

from backends.files import check_safetensors, check_torch_file, index_shards

CONTEXT_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")
# what a saved tokenizer leaves in its folder (fast, slow BPE, SentencePiece, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "vocab.txt")


def load_tokenizer(cfg: Config):
    path = cfg.tokenizer_path
    if path == BUILTIN_SAMPLE:
        from engine.sample import sample_tokenizer
        tok = sample_tokenizer()
    else:
        from transformers import AutoTokenizer, GPT2Tokenizer
        local = Path(path).expanduser()
        if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
            which = "model.name_or_path" if cfg.tokenizer is None else "tokenizer"
            raise EngineError(f"{which} folder {local} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); "
                              "name the tokenizer the model was trained with: tokenizer=<hub id or folder>")
        check_hub_name(path, "model.name_or_path" if cfg.tokenizer is None else "tokenizer")
        try:
            if local.is_dir() and not (local / "tokenizer_config.json").exists() and (local / "vocab.json").exists():
                tok = GPT2Tokenizer.from_pretrained(str(local))  # a bare vocab.json + merges.txt folder
            else:
                tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as e:
            raise EngineError(f"tokenizer {path!r} could not be loaded (not a tokenizer folder, and the hub "
                              f"is unreachable or has no such id): {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:  # GPT-2 family has no pad token: pad with EOS (masked out anyway)
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model_config(cfg: Config, tokenizer, num_labels: int | None):
    from transformers import AutoConfig
    overrides = dict(cfg.model.config)
    extra = {}
    if num_labels is not None:
        extra = {"num_labels": num_labels, "pad_token_id": tokenizer.pad_token_id}
    try:
        if cfg.model.name_or_path:
            overrides.pop("model_type", None)
            check_hub_name(cfg.model.name_or_path, "model.name_or_path")
            conf = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code,
                                              **overrides, **extra)
        else:
            model_type = overrides.pop("model_type", "gpt2")
            overrides.setdefault("vocab_size", len(tokenizer))
            for key in ("bos_token_id", "eos_token_id"):
                overrides.setdefault(key, tokenizer.eos_token_id)
            conf = AutoConfig.for_model(model_type, **overrides, **extra)
    except (OSError, ValueError) as e:
        where = cfg.model.name_or_path or "model.config"
        raise EngineError(f"model {where!r} could not be configured: {str(e).splitlines()[0]}") from None
    return conf


def check_weights(cfg: Config) -> None:
    """A local model folder's weights must be readable before any process starts: the safetensors
    header parses and every tensor lies inside the file (each shard of a sharded checkpoint), or the
    torch .bin is a complete zip. Reads headers only, never the tensors."""
    if not cfg.model.name_or_path:
        return
    folder = Path(cfg.model.name_or_path).expanduser()
    if not folder.is_dir():
        return  # a hub id: from_pretrained resolves (and verifies) it
    where = f"model {cfg.model.name_or_path!r}"
    if (folder / "model.safetensors").is_file():
        check_safetensors(folder / "model.safetensors", where)
    elif (folder / "model.safetensors.index.json").is_file():
        for shard in index_shards(folder / "model.safetensors.index.json", where):
            check_safetensors(shard, where)
    elif (folder / "pytorch_model.bin").is_file():
        check_torch_file(folder / "pytorch_model.bin", where)
    elif (folder / "pytorch_model.bin.index.json").is_file():
        for shard in index_shards(folder / "pytorch_model.bin.index.json", where):
            check_torch_file(shard, where)
    else:
        raise EngineError(f"{where}: folder {folder} holds no weights (model.safetensors, "
                          "model.safetensors.index.json or pytorch_model.bin)")


def model_context(conf) -> int | None:
    for attr in CONTEXT_ATTRS:
        value = getattr(conf, attr, None)
        if isinstance(value, int):
            return value
    return None


def check_block_size(cfg: Config, conf) -> None:
    ctx = model_context(conf)
    if ctx is not None and cfg.data.block_size > ctx:
        raise EngineError(f"data.block_size={cfg.data.block_size} exceeds the model's context of {ctx} tokens")


def check_attn_implementation(cfg: Config, conf, auto_class) -> None:
    """model.attn_implementation against the model class and the installed packages, before spawning."""
    impl = cfg.model.attn_implementation
    if impl is None or impl == "eager":
        return
    model_cls = auto_class._model_mapping.get(type(conf), None) if hasattr(auto_class, "_model_mapping") else None
    supports = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}[impl]
    if model_cls is not None and getattr(model_cls, supports, True) is False:
        raise EngineError(f"model.attn_implementation={impl} is not supported by {model_cls.__name__}; "
                          f"use eager (or leave it unset for the model's default)")
    if impl == "flash_attention_2":
        import importlib.util
        if importlib.util.find_spec("flash_attn") is None:
            raise EngineError("model.attn_implementation=flash_attention_2 needs the flash-attn package "
                              "(pip install flash-attn, CUDA only); sdpa uses PyTorch's own flash kernels")


def head_mismatch(cfg: Config, conf) -> str | None:
    """A pretrained classification head whose size does not fit the task (a 2-label MRPC model
    fine-tuned on STS-B's 1-value regression): the note saying it is re-initialised (what HF users
    expect when they pass another num_labels), else None."""
    if cfg.task != "classification" or not cfg.model.name_or_path:
        return None
    from transformers import AutoConfig
    try:
        saved = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return None
    if not any(a.endswith("ForSequenceClassification") for a in saved.architectures or ()):
        return None  # no head in the checkpoint: it is new anyway
    if saved.num_labels == conf.num_labels:
        return None
    return (f"{cfg.model.name_or_path} has a {saved.num_labels}-label classification head; this task needs "
            f"{conf.num_labels}: the head is re-initialised (the rest of the model is loaded)")


def model_builder(cfg: Config, conf, auto_class) -> Callable[[], torch.nn.Module]:
    """A zero-argument factory: backends call it inside their own construction context
    (e.g. ZeRO-3's zero.Init) so a model too big for one device is partitioned as it is built."""
    extra = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    if head_mismatch(cfg, conf):
        extra["ignore_mismatched_sizes"] = True
    if cfg.model.lora is not None and cfg.model.lora.quantize:
        extra["quantization_config"] = quantization_config(cfg)

    def build() -> torch.nn.Module:
        torch.manual_seed(cfg.train.seed)  # identical random init on every rank and backend
        if cfg.model.name_or_path:
            model = auto_class.from_pretrained(cfg.model.name_or_path, config=conf, dtype=torch.float32,
                                               trust_remote_code=cfg.model.trust_remote_code, **extra)
        else:
            model = auto_class.from_config(conf, dtype=torch.float32,
                                           trust_remote_code=cfg.model.trust_remote_code, **extra)
        if cfg.train.gradient_checkpointing:
            kwargs = {"use_reentrant": False}  # non-reentrant works with DDP/ZeRO hooks
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False  # no KV cache while training
        if getattr(model, "loss_type", "") is None and "CausalLM" in auto_class.__name__:
            # GPT2LMHeadModel's class name maps to no loss type: transformers falls back to this one
            # anyway, with a warning at every launch
            model.loss_type = "ForCausalLM"
        if cfg.model.lora is not None:
            model = with_lora(model, cfg)
        return model
    return build


def quantization_config(cfg: Config):
    """QLoRA's frozen base: bitsandbytes 4-bit weights (model.lora.quantize: nf4 or fp4, with double
    quantization of the scales, as the QLoRA paper does), computing in the run's precision. Only the
    matmul weights are quantized; embeddings, norms and the head stay as loaded (fp32)."""
    from transformers import BitsAndBytesConfig
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.model.lora.quantize,
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def parameter_counts(model: torch.nn.Module) -> dict:
    """{"total", "trainable"}: unique parameters (tied ones once), full sizes under ZeRO-3 too."""
    size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - ZeRO-3 partitions keep the full size here
    params = list(model.parameters())
    return {"total": sum(size(p) for p in params), "trainable": sum(size(p) for p in params if p.requires_grad)}


def with_lora(model: torch.nn.Module, cfg: Config, quiet: bool = False) -> torch.nn.Module:
    """The model as a PEFT LoRA model: adapters on `target_modules` (PEFT's per-family default when
    unset), the classification head trained fully (PEFT's SEQ_CLS default) or `modules_to_save`;
    everything else frozen. Says once (rank 0) how many parameters train."""
    import os

    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model
    lora = cfg.model.lora
    task_type = TaskType.SEQ_CLS if cfg.task == "classification" else TaskType.CAUSAL_LM
    try:
        peft_model = get_peft_model(model, PeftLoraConfig(
            task_type=task_type, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, modules_to_save=lora.modules_to_save,
            fan_in_fan_out=model.config.model_type == "gpt2"))  # GPT-2's Conv1D stores weights transposed
    except ValueError as e:  # e.g. target modules the model does not have, or no default for its family
        raise EngineError(f"model.lora: {str(e).splitlines()[0]}") from None
    if not quiet and os.environ.get("RANK", "0") == "0":
        from engine.metrics import log
        counts = parameter_counts(peft_model)
        trainable, total = counts["trainable"], counts["total"]
        targets = sorted(peft_model.peft_config["default"].target_modules)
        base = f", the base in 4 bits ({lora.quantize}, QLoRA)" if lora.quantize else ""
        log(f"LoRA r={lora.r} alpha={lora.alpha} on {', '.join(targets)}: {trainable:,} of {total:,} parameters "
            f"train ({100 * trainable / total:.2f}%){base}")
    return peft_model
