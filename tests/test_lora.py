"""LoRA through PEFT (`model.lora`) on every backend that takes it, CPU, 2 processes, fp32.

All training runs are scenarios of the session's shared torchrun job (conftest.py). The LoRA run's
per-step losses on DeepSpeed ZeRO-2/3 (ZeRO-3 with and without CPU offload), FSDP2 and ColossalAI
torch_ddp / low_level_zero ZeRO-2 must equal the DDP run's within 1e-6, two ColossalAI pipeline stages
within 2e-6 (ColossalAI's tensor parallelism and Gemini refuse LoRA in one line) (the same adapters,
the same frozen base, the same torch AdamW update order: for_loop), and the trained adapters must be
the same tensors (1e-5): ZeRO-3 gathers them before PEFT
saves (DeepSpeed #4295 / PEFT #1443 saw adapters saved nearly empty). Resumed ZeRO-3, ColossalAI
ZeRO-2 and pipeline LoRA runs continue exactly; the adapter folder loads over its base
with PEFT, the merged folder in plain transformers; `engine export` and `engine eval` take both.
QLoRA (`model.lora.quantize=nf4`, bitsandbytes' CPU backend) trains the same adapters over the base
in 4 bits on DDP, resumes exactly, and exports onto the full-precision base; elsewhere it is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from drivers.run_many import scenario_log
from engine.config import load_config
from helpers import MRPC, SHAKESPEARE, losses, metrics, tiny_gpt2_dir
from launch.cli import main

STEPS = 4
EXACT = 1e-6
LORA = ["model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0"]
VARIANTS = {  # label -> backend overrides
    "ddp": ["backend.name=ddp"],
    "zero2": ["backend.name=deepspeed", "backend.deepspeed.zero_stage=2"],
    "zero3": ["backend.name=deepspeed", "backend.deepspeed.zero_stage=3"],
    "zero3+offload": ["backend.name=deepspeed", "backend.deepspeed.zero_stage=3",
                      "backend.deepspeed.offload_optimizer=cpu", "backend.deepspeed.offload_params=cpu"],
    "fsdp": ["backend.name=fsdp"],  # FSDP2: frozen base and trainable adapters sharded in the same groups
    # ColossalAI's Booster over the PEFT model (whole weights on every rank; ZeRO-2 shards the adapters' state)
    "col-ddp": ["backend.name=colossal", "backend.colossal.plugin=torch_ddp"],
    "col-zero2": ["backend.name=colossal", "backend.colossal.plugin=low_level_zero", "backend.colossal.zero_stage=2"],
    # two pipeline stages (hybrid without TP, as ColossalAI's LoRA allows), one data-parallel rank: twice
    # the micro-batch, in two pipeline micro-batches
    "col-pp2": ["backend.name=colossal", "backend.colossal.plugin=hybrid", "backend.colossal.pp_size=2",
                "backend.colossal.microbatches=2", "train.micro_batch_size=4"],
}
CLS_VARIANTS = ("ddp", "zero3", "fsdp", "col-zero2", "col-pp2")
# the pipeline's step loss is the float32 mean of its two micro-batches' (measured 1.4e-6, as for full runs)
TOLERANCE = {"col-pp2": 2e-6}


def _variants() -> list[str]:
    from test_export_checkpoints import _have
    return [v for v in VARIANTS if _have("colossalai") or not v.startswith("col-")]


def _task(task: str, model: Path) -> list[str]:
    if task == "clm":
        return ["task=causal_lm", f"model.name_or_path={model}", f"data.train={SHAKESPEARE}", "data.block_size=32",
                "data.max_train_samples=64", "data.validation_split=0.05", "data.max_eval_samples=8"]
    return ["task=classification", f"model.name_or_path={model}", f"data.train={MRPC}", "data.glue_task=mrpc",
            "data.block_size=64", "data.max_train_samples=64", "data.max_eval_samples=8"]


def _config(task: str, model: Path, out: Path, variant: str, *extra: str) -> dict:
    return load_config(None, [*_task(task, model), *LORA, f"train.max_steps={STEPS}",
                              "train.micro_batch_size=2", "train.lr=1e-2", "train.warmup_ratio=0.0",
                              "train.max_grad_norm=0.5", "train.log_every=1", "train.adamw_impl=for_loop",
                              "train.save_every=2", "train.keep_last=5", "train.eval_batch_size=4",
                              *VARIANTS[variant], f"output_dir={out}", *extra]).to_dict()


def shared_scenarios(root: Path, model: Path) -> list[dict]:
    # ZeRO-3 keeps parameters under stage3_param_persistence_threshold (1e5 elements by default) whole
    # on every rank: at 0, every adapter is partitioned too, as a real model's are, and PEFT must be
    # handed the gathered state to save them (the empty-adapter bug)
    root.mkdir(parents=True, exist_ok=True)
    (root / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    zero3 = [f"backend.deepspeed.config_file={root / 'zero3.json'}"]
    extra = {"ddp": ["model.lora.merge=true"], "zero3": zero3}
    out = [_config("clm", model, root / f"clm-{v}", v, *extra.get(v, [])) for v in _variants()]
    out += [_config("cls", model, root / f"cls-{v}", v, *extra.get(v, [])) for v in CLS_VARIANTS if v in _variants()]
    # stopped at step 2 (its checkpoint), relaunched to the end
    for variant, options in (("zero3", zero3), ("col-zero2", []), ("col-pp2", [])):
        if variant in _variants():
            resumed = root / f"clm-{variant}-resumed"
            out += [_config("clm", model, resumed, variant, *options, "train.stop_at_step=2"),
                    _config("clm", model, resumed, variant, *options)]
    # bitsandbytes' CPU kernels take 4-bit weights in blocks of 64 inputs: a 64-wide model, with
    # LoRA over its fp32 base as the reference
    wide, qlora = tiny_gpt2_dir(root, n_embd=64), ["model.lora.quantize=nf4", "model.lora.merge=true"]
    out += [_config("clm", wide, root / "clm-lora64", "ddp"),
            _config("clm", wide, root / "clm-qlora", "ddp", *qlora),
            _config("clm", wide, root / "clm-qlora-resumed", "ddp", *qlora, "train.stop_at_step=2"),
            _config("clm", wide, root / "clm-qlora-resumed", "ddp", *qlora)]
    return out


@pytest.fixture(scope="module")
def job(shared_job):
    return shared_job.root(__name__), shared_job.log


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("task,variant", [("clm", v) for v in _variants() if v != "ddp"]
                         + [("cls", v) for v in CLS_VARIANTS if v != "ddp" and v in _variants()])
def test_lora_losses_and_adapters_equal_ddps(job, task, variant):
    root, _ = job
    got, want = losses(root / f"{task}-{variant}"), losses(root / f"{task}-ddp")
    worst = max(abs(a - b) for a, b in zip(got, want))
    assert len(got) == STEPS and worst <= TOLERANCE.get(variant, EXACT), \
        f"{task} {variant}: max |loss - ddp loss| = {worst:.3g}"
    ours, ref = _adapter(root / f"{task}-{variant}" / "model"), _adapter(root / f"{task}-ddp" / "model")
    assert ours.keys() == ref.keys() and len(ref) >= 4  # lora_A/B per target (+ the head for classification)
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5
    assert all(t.numel() > 0 for t in ours.values())  # not saved empty (ZeRO-3 gathers before PEFT saves)


def test_only_the_adapters_train_and_the_log_says_how_many(job):
    import torch
    root, log = job
    (lines,) = scenario_log(log, root / "clm-ddp")
    said = [ln for ln in lines if "LoRA r=4 alpha=8 on c_attn" in ln]
    assert len(said) == 1 and "parameters train" in said[0], lines[-20:]
    trainable = int(said[0].split(": ")[1].split(" of ")[0].replace(",", ""))
    optimizer = torch.load(root / "clm-ddp" / "checkpoints" / f"step-{STEPS}" / "optimizer.pt", weights_only=True)
    moments = sum(s["exp_avg"].numel() for s in optimizer["state"].values())
    assert moments == trainable == 2 * (32 * 4 + 4 * 96)  # 2 layers x (A: 32x4, B: 4x96) on c_attn
    ref = _adapter(root / "clm-ddp" / "model")
    assert sum(t.numel() for t in ref.values()) == trainable
    # the memory event counts the same (ZeRO-3's partitioned model by its full sizes) and says what the
    # frozen base saves: its fp32 gradient and AdamW moments, 12 bytes a parameter
    for variant in ("ddp", "zero3"):
        (memory,) = metrics(root / f"clm-{variant}", "memory")
        total = memory["params"]["total"]
        assert memory["params"]["trainable"] == trainable and total > 100 * trainable, (variant, memory["params"])
        assert memory["frozen_states_saved_mb"] == round((total - trainable) * 12 / 2**20, 1)


@pytest.mark.parametrize("variant", [v for v in ("zero3", "col-zero2", "col-pp2") if v in _variants()])
def test_a_resumed_lora_run_continues_exactly(job, variant):
    """ZeRO-3 partitions the adapters; ColossalAI's Booster would save a PEFT model as its base alone
    (the backend writes the PEFT model's own state instead, and syncs low_level_zero's fp32 masters);
    two pipeline stages each write and read back their own layers."""
    root, log = job
    assert losses(root / f"clm-{variant}-resumed") == losses(root / f"clm-{variant}")
    assert any("resumed from step-2" in ln for ln in scenario_log(log, root / f"clm-{variant}-resumed")[-1])
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    resumed, uninterrupted = (_adapter(root / f"clm-{variant}{suffix}" / "model") for suffix in ("-resumed", ""))
    assert resumed[key].equal(uninterrupted[key])


def _logits(model, vocab: int):
    import torch
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_adapter_folder_loads_over_its_base_and_the_merged_folder_alone(job, tiny_gpt2):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, pipeline
    root, _ = job
    adapter, merged = root / "clm-ddp" / "model", root / "clm-ddp" / "model-merged"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_gpt2)
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), str(adapter)).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert (_logits(with_peft, 50257) - _logits(plain, 50257)).abs().max().item() <= 1e-5
    text = pipeline("text-generation", model=str(merged))("ROMEO:", max_new_tokens=4, do_sample=False)
    assert text[0]["generated_text"].startswith("ROMEO:")


def _cli(*args):
    return CliRunner().invoke(main, [str(x) for x in args])


def _export_adapter_and_merged(step: Path, run: Path, out: Path) -> float:
    """`engine export` of a LoRA run's checkpoint to out/adapter and (--merged) out/merged; returns the
    largest difference between the exported adapters and the run's own (model/)."""
    result = _cli("export", step, out / "adapter")
    assert result.exit_code == 0 and "LoRA adapters" in result.output, result.output
    ours, ref = _adapter(out / "adapter"), _adapter(run / "model")
    assert ours.keys() == ref.keys()
    assert _cli("export", step, out / "merged", "--merged").exit_code == 0
    return max((ours[k] - ref[k]).abs().max().item() for k in ref)


def test_export_and_eval_take_a_lora_checkpoint_and_its_adapters(job, tmp_path):
    """`engine export` of a ZeRO-3 LoRA checkpoint gives the run's own adapters (or, --merged, a plain
    folder); `engine eval` of the run (its adapters), of the checkpoint and of the export agree with the
    run's logged eval."""
    root, _ = job
    run, step = root / "cls-zero3", root / "cls-zero3" / "checkpoints" / f"step-{STEPS}"
    assert _export_adapter_and_merged(step, run, tmp_path) <= 1e-6
    logged = metrics(run, "eval")[-1]
    for name, source in (("run", run), ("checkpoint", step), ("adapter", tmp_path / "adapter"),
                         ("merged", tmp_path / "merged")):
        result = _cli("eval", source, "--gpus", "0", "--output", tmp_path / f"{name}.json",
                     *(["--data", MRPC, "--glue-task", "mrpc", "data.max_eval_samples=8", "data.block_size=64"]
                       if name in ("adapter", "merged") else []))
        assert result.exit_code == 0, (name, result.output)
        got = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]
        assert got["eval_loss"] == pytest.approx(logged["eval_loss"], abs=1e-5), name
        assert got["accuracy"] == logged["accuracy"], name


@pytest.mark.skipif("col-zero2" not in _variants(), reason="colossalai not installed")
@pytest.mark.parametrize("variant", ["col-zero2", "col-pp2"])
def test_a_colossal_lora_checkpoint_exports_the_runs_adapters(job, tmp_path, variant):
    """The low_level_zero checkpoint holds the PEFT model by PEFT's names, as ddp's does, and the
    pipeline's one shard per stage (the run's model/ folder gathers the stages' adapters): `engine
    export` reads the run's very adapters from it."""
    root, _ = job
    run = root / f"clm-{variant}"
    assert _export_adapter_and_merged(run / "checkpoints" / f"step-{STEPS}", run, tmp_path) == 0.0


@pytest.mark.fast
@pytest.mark.parametrize("options,reason", [
    (["backend.colossal.plugin=gemini"], "plugin=gemini (ColossalAI's Gemini has no LoRA support)"),
    (["backend.colossal.plugin=hybrid", "backend.colossal.tp_size=2"],
     "tensor parallelism (tp_size=2: ColossalAI's LoRA stops short of it; pp_size and ZeRO over data-parallel "
     "ranks take LoRA)")])
def test_lora_where_the_backend_cannot_is_refused_before_launch(tiny_gpt2, options, reason):
    pytest.importorskip("colossalai")
    from backends.base import backend_class
    from engine.errors import EngineError
    cfg = load_config(None, [*_task("clm", tiny_gpt2), *LORA, "backend.name=colossal", *options,
                             "train.precision=bf16"])
    with pytest.raises(EngineError) as refused:
        backend_class("colossal").preflight(cfg.training_spec(), cfg.backend_options(), 2)
    assert str(refused.value) == (f"model.lora is not supported by the colossal backend with {reason}; use "
                                  "backend.colossal.plugin=torch_ddp or low_level_zero, or --backend ddp, deepspeed "
                                  "or fsdp")
    for able in (["backend.colossal.plugin=torch_ddp"], ["backend.colossal.plugin=low_level_zero"],
                 ["backend.colossal.plugin=hybrid", "backend.colossal.pp_size=2"]):
        ok = load_config(None, [*_task("clm", tiny_gpt2), *LORA, "backend.name=colossal", *able])
        backend_class("colossal").preflight(ok.training_spec(), ok.backend_options(), 2)


@pytest.mark.fast
def test_lora_options_are_validated(tiny_gpt2):
    from engine.errors import EngineError
    assert load_config(None, [*_task("clm", tiny_gpt2), "model.lora=true"]).model.lora.r == 8
    assert load_config(None, [*_task("clm", tiny_gpt2), "model.lora=false"]).model.lora is None
    with pytest.raises(EngineError, match="model.lora.dropout must be in"):
        load_config(None, [*_task("clm", tiny_gpt2), "model.lora.dropout=1.5"])
    with pytest.raises(EngineError, match="unknown config key 'model.lora.rank'"):
        load_config(None, [*_task("clm", tiny_gpt2), "model.lora.rank=8"])


def test_qlora_trains_the_adapters_over_a_4bit_base_and_resumes_exactly(job):
    """The base's matmul weights are bitsandbytes NF4 in the checkpoint (packed, with their
    quantization state), so the losses differ from LoRA over the fp32 base, by the 4-bit rounding
    only; the same parameters train; a run stopped at step 2 and relaunched gives the same losses."""
    from safetensors import safe_open
    root, log = job
    qlora, lora = losses(root / "clm-qlora"), losses(root / "clm-lora64")
    assert len(qlora) == STEPS and qlora != lora
    assert max(abs(a - b) / b for a, b in zip(qlora, lora)) < 0.02
    assert losses(root / "clm-qlora-resumed") == qlora
    assert any("resumed from step-2" in ln for ln in scenario_log(log, root / "clm-qlora-resumed")[-1])
    (lines,) = scenario_log(log, root / "clm-qlora")
    assert any("the base in 4 bits (nf4, QLoRA)" in ln for ln in lines), lines[-20:]
    weights = root / "clm-qlora" / "checkpoints" / f"step-{STEPS}" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
        packed = f.get_slice("base_model.model.transformer.h.0.attn.c_attn.base_layer.weight")
        assert packed.get_dtype() == "U8" and packed.get_shape() == [64 * 192 // 2, 1]
    assert any(k.endswith(".weight.quant_state.bitsandbytes__nf4") for k in keys)
    full = root / "clm-lora64" / "checkpoints" / f"step-{STEPS}" / "model.safetensors"
    assert weights.stat().st_size < full.stat().st_size
    assert _adapter(root / "clm-qlora" / "model").keys() == _adapter(root / "clm-lora64" / "model").keys()


def test_a_qlora_checkpoint_exports_and_evaluates_over_the_full_precision_base(job, tmp_path):
    """`engine export` of a QLoRA checkpoint: its adapters (the run's own, exactly) for the
    pretrained base, or --merged into that base in full precision, as the run's model-merged is;
    `engine eval` of the checkpoint scores the adapters over that base."""
    from transformers import AutoModelForCausalLM
    root, _ = job
    run, step = root / "clm-qlora", root / "clm-qlora" / "checkpoints" / f"step-{STEPS}"
    assert _export_adapter_and_merged(step, run, tmp_path) == 0.0  # the very tensors
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "model-merged").eval()
    assert (_logits(exported, 50257) - _logits(merged, 50257)).abs().max().item() <= 1e-6
    result = _cli("eval", step, "--gpus", "0", "--output", tmp_path / "ckpt.json")
    assert result.exit_code == 0, result.output
    got, logged = json.loads((tmp_path / "ckpt.json").read_text())["metrics"], metrics(run, "eval")[-1]
    # the run evaluated over its 4-bit base, the checkpoint's eval over the full-precision one
    assert got["eval_loss"] == pytest.approx(logged["eval_loss"], rel=0.02) and got["eval_loss"] != logged["eval_loss"]

@pytest.mark.fast
def test_the_estimate_of_a_qlora_base_is_what_bitsandbytes_stores(tmp_path):
    """`engine estimate --lora R --quantize nf4`: the ddp row's parameter bytes (the 4-bit linear
    weights with their double-quantized scales and code tables, the rest fp32, the adapters fp32)
    against the bytes of the model the engine builds on CPU with bitsandbytes: every parameter and
    buffer, and every tensor of each 4-bit weight's quantization state."""
    import torch
    from bitsandbytes.nn import Params4bit
    from transformers import AutoModelForCausalLM

    from engine.estimate import estimate
    from engine.modeling import load_model_config, load_tokenizer, model_builder
    wide = tiny_gpt2_dir(tmp_path, n_embd=64)
    cfg = load_config(None, [*_task("clm", wide), *LORA, "model.lora.quantize=nf4", "train.precision=fp32"])
    model = model_builder(cfg, load_model_config(cfg, load_tokenizer(cfg), None), AutoModelForCausalLM)()
    stored, quantized = 0, 0
    for p in model.parameters():
        stored += p.numel() * p.element_size()
        if isinstance(p, Params4bit):
            quantized += p.quant_state.shape.numel()
            state = p.quant_state.as_dict(packed=False)  # absmax, code, nested absmax/code/offset
            stored += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    stored += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    (e,) = estimate(str(wide), 1, seq=32, precision="fp32", rows=["ddp"], lora_trainable=trainable, quantized=True)
    from engine.flops import quantized_params
    assert quantized_params(str(wide))[0] == quantized > 0  # the linear weights bitsandbytes took
    print(f"estimated {e.params:,} B, stored {stored:,} B")
    assert e.source == "formula+qlora" and e.params == pytest.approx(stored, rel=0.01), (e.params, stored)
    (full,) = estimate(str(wide), 1, seq=32, precision="fp32", rows=["ddp"], lora_trainable=trainable)
    assert e.params < full.params  # and it can fail: the fp32 base is 4 bytes a weight


@pytest.mark.fast
@pytest.mark.parametrize("backend", ["deepspeed", "fsdp", "colossal"])
def test_qlora_where_the_backend_cannot_is_refused_in_one_line(tiny_gpt2, backend):
    from engine.errors import EngineError
    from engine.preflight import check_quantized_base
    cfg = load_config(None, [*_task("clm", tiny_gpt2), *LORA, "model.lora.quantize=nf4", f"backend.name={backend}"])
    with pytest.raises(EngineError, match=rf"^model.lora.quantize=nf4 \(QLoRA\) is not supported by the {backend} "
                                          r"backend: .*; use --backend ddp, or LoRA without model.lora.quantize$"):
        check_quantized_base(cfg)
    check_quantized_base(load_config(None, [*_task("clm", tiny_gpt2), *LORA, "model.lora.quantize=nf4"]))  # ddp
    with pytest.raises(EngineError, match="model.lora.quantize must be one of"):
        load_config(None, [*_task("clm", tiny_gpt2), *LORA, "model.lora.quantize=int3"])
    with pytest.raises(EngineError, match=r"^model.lora.quantize \(QLoRA\) quantizes a pretrained base: set "
                                          "model.name_or_path"):
        load_config(None, ["task=causal_lm", f"data.train={SHAKESPEARE}", *LORA, "model.lora.quantize=nf4"])
