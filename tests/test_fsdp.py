"""FSDP2 backend (backends/fsdp.py): real 2-process runs on CPU (gloo), fp32, dropout 0.

Every training scenario (DDP references, FSDP2 with resharding on/off and CPU offload over a crossed
table of task x clipping x accumulation; gradient checkpointing; a stopped-and-resumed run with
asynchronous DCP saves; bf16 and fp16; torch.compile; a Llama built from config) runs inside the
session's shared torchrun job (conftest.py shared_job, tests/drivers/run_many.py). Option
validation, preflight, the bench/estimate declarations, the sharding units of each model family and
the gradient-sync switch are checked in this process (`fast`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from drivers.run_many import scenario_log
from helpers import GPT2_TOKENIZER, MRPC, SHAKESPEARE, losses, metrics, parity_config, small_data, with_backend

STEPS = 4
TOL = 1e-6
# The gradient norm has its own bound: an fp32 norm over GPT-2's 1.6M-element embedding gradient is
# only good to ~5e-5 relative on CPU (measured against float64), and FSDP2 sums it in two halves,
# DDP in one. It is checked beside the losses because AdamW hides a uniform gradient scale (m/sqrt(v)):
# a loss divided by grad_accum twice leaves the losses within 1e-7 but halves the norms.
NORM_TOL = 3e-4
CLIP = 0.5  # the tiny model's gradient norms are ~1-6 at these steps: this clips every step

# (label, backend name, options): what changes where FSDP2's arithmetic happens
VARIANTS = [
    ("ddp", "ddp", {}),
    ("fsdp", "fsdp", {}),                                            # reshard after forward (ZeRO-3-like)
    ("fsdp-noreshard", "fsdp", {"reshard_after_forward": False}),    # keep gathered until backward (ZeRO-2-like)
    ("fsdp-offload", "fsdp", {"offload": True}),                     # CPUOffloadPolicy
]
# every task with clipping off and on, grad_accum 1 and 2, crossed (as tests/test_deepspeed.py)
SETTINGS = {
    "clm-noclip-ga1": ("clm", 0.0, 1),
    "clm-clip-ga2": ("clm", CLIP, 2),
    "cls-clip-ga1": ("cls", CLIP, 1),
    "cls-noclip-ga2": ("cls", 0.0, 2),
}
DATA: dict = {"clm": SHAKESPEARE, "cls": MRPC}
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def base_config(task: str, model: Path | None, out: Path, max_grad_norm: float, grad_accum: int) -> dict:
    return parity_config(task, model, out, max_grad_norm, grad_accum, DATA, STEPS)


def _runs(root: Path) -> dict:
    runs = {(setting, label): root / setting / label for setting in SETTINGS for label, _, _ in VARIANTS}
    for label in ("gc", "resume", "bf16", "fp16", "compile", "llama-ddp", "llama-fsdp"):
        runs[label] = root / label
    return runs


def shared_scenarios(root: Path, model: Path) -> list[dict]:
    """This file's training scenarios, run in the session's shared 2-process job (conftest.py)."""
    DATA.update(small_data(root / "data", shakespeare_lines=3000, mrpc_rows=(200, 40)))
    runs, scenarios = _runs(root), []
    for setting, (task, clip, ga) in SETTINGS.items():
        for label, name, options in VARIANTS:
            scenarios.append(with_backend(base_config(task, model, runs[(setting, label)], clip, ga), name, options))
    clm_clip_ga2 = lambda out: base_config("clm", model, out, CLIP, 2)  # noqa: E731
    # HF gradient checkpointing (the engine's model builder enables it) inside fully_shard'ed blocks
    scenarios.append(with_backend(clm_clip_ga2(runs["gc"]), "fsdp", {}, gradient_checkpointing=True))
    # stopped at step 2 (an asynchronous DCP save), relaunched in the same output_dir to the end
    resume = with_backend(clm_clip_ga2(runs["resume"]), "fsdp", {"async_save": True}, save_every=2)
    scenarios += [with_backend(resume, "fsdp", {"async_save": True}, stop_at_step=2), resume]
    # mixed precision: 16-bit compute copies, fp32 reduction and fp32 master shards
    for precision in ("bf16", "fp16"):
        scenarios.append(with_backend(base_config("clm", model, runs[precision], 0.0, 1), "fsdp", {},
                                      precision=precision))
    # torch.compile of every sharded block
    scenarios.append(with_backend(base_config("clm", model, runs["compile"], 0.0, 1), "fsdp", {}, compile=True,
                                  save_final=False))
    # a Llama built from config (no weights): its decoder layers are found through _no_split_modules
    for name in ("ddp", "fsdp"):
        cfg = with_backend(base_config("clm", model, runs[f"llama-{name}"], CLIP, 1), name, {})
        cfg["model"] = {"config": LLAMA}
        cfg["tokenizer"] = str(GPT2_TOKENIZER)
        scenarios.append(cfg)
    return scenarios


@pytest.fixture(scope="module")
def job(shared_job, tiny_gpt2):
    root = shared_job.root(__name__)
    return {"runs": _runs(root), "root": root, "log": shared_job.log, "seconds": shared_job.seconds,
            "model": tiny_gpt2, "n": shared_job.scenarios}


def _diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b)) if len(a) == len(b) == STEPS else float("inf")


def _norm_diff(run: Path, ref: Path) -> float:
    """Max relative difference of the logged (pre-clip) gradient norms."""
    a, b = ([m["grad_norm"] for m in metrics(r)] for r in (run, ref))
    return max(abs(x - y) / y for x, y in zip(a, b)) if len(a) == len(b) == STEPS else float("inf")


def parity_table(job) -> str:
    lines = [f"{len(VARIANTS) - 1} FSDP2 variants x {len(SETTINGS)} settings, {STEPS} steps each, 2 processes "
             f"(gloo), fp32, torch AdamW for_loop; per cell: max |loss - DDP loss| over all steps / max relative "
             f"difference of the logged pre-clip gradient norm.", "",
             "| setting | task | max_grad_norm | grad_accum | " + " | ".join(v[0] for v in VARIANTS[1:]) + " |",
             "|---|---|---|---|" + "---|" * (len(VARIANTS) - 1)]
    for setting, (task, clip, ga) in SETTINGS.items():
        ref = job["runs"][(setting, "ddp")]
        cells = [f"{_diff(losses(job['runs'][(setting, label)]), losses(ref)):.1e} / "
                 f"{_norm_diff(job['runs'][(setting, label)], ref):.0e}" for label, _, _ in VARIANTS[1:]]
        lines.append(f"| {setting} | {'causal LM' if task == 'clm' else 'classification'} | {clip} | {ga} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_parity_with_ddp(job, capsys):
    """Per-step losses of every FSDP2 variant equal DDP's within 1e-6 and the logged pre-clip gradient
    norms within NORM_TOL, for both tasks, clipping on and off, accumulation 1 and 2 (the loss
    scaling, the skipped and the final gradient reduce, clipping over DTensor gradients and AdamW on
    the shards all show in steps 2-4)."""
    table = parity_table(job)
    (job["root"] / "parity.md").write_text(table)
    with capsys.disabled():
        print("\n\nFSDP2 vs DDP per-step losses\n" + table)
    failures = []
    for setting in SETTINGS:
        ref = job["runs"][(setting, "ddp")]
        assert len(losses(ref)) == STEPS
        for label, _, _ in VARIANTS[1:]:
            run = job["runs"][(setting, label)]
            worst, norm = _diff(losses(run), losses(ref)), _norm_diff(run, ref)
            if worst > TOL or norm > NORM_TOL:
                failures.append(f"{setting}/{label}: loss {worst:.3g}, grad norm {norm:.3g}")
    assert not failures, failures


def test_the_logged_grad_norm_is_the_norm_before_clipping(job):
    """StepInfo's grad_norm is the full gradient's norm before clipping, not the clipped one."""
    for setting in ("clm-clip-ga2", "cls-clip-ga1"):
        norms = [m["grad_norm"] for m in metrics(job["runs"][(setting, "fsdp")])]
        assert min(norms) > 1.1 * CLIP  # every step was clipped to CLIP; the norm before it is logged


def test_gradient_checkpointing_under_fully_shard(job):
    (logged,) = scenario_log(job["log"], job["runs"]["gc"])
    assert any("backend fsdp" in line for line in logged)
    assert _diff(losses(job["runs"]["gc"]), losses(job["runs"][("clm-clip-ga2", "ddp")])) <= TOL


def test_resume_with_asynchronous_saves_is_exact(job):
    """Stopped at step 2 (async DCP save), relaunched: natively loaded (no layout line), and the
    losses are the uninterrupted run's bit for bit."""
    run = job["runs"]["resume"]
    stopped, resumed = scenario_log(job["log"], run)
    assert any("'async_save': True" in line for line in stopped)
    assert any("resumed from step-2" in line for line in resumed) and not any("layout changed" in l for l in resumed)
    assert losses(run) == losses(job["runs"][("clm-clip-ga2", "fsdp")])
    step = run / "checkpoints" / "step-2"
    assert json.loads((step / "layout.json").read_text()) == {"backend": "fsdp"}
    assert sorted(p.name for p in (step / "fsdp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_mixed_precision_trains_and_keeps_fp32_masters(job):
    """bf16/fp16 parameters with fp32 reduction: close to the fp32 losses (not equal: 16-bit
    compute), fp16 keeps its loss scaler in the checkpoint, and both export fp32 master weights."""
    from safetensors.torch import load_file
    import torch
    ref = losses(job["runs"][("clm-noclip-ga1", "ddp")])
    for precision in ("bf16", "fp16"):
        run = job["runs"][precision]
        got = losses(run)
        assert len(got) == STEPS and 0 < _diff(got, ref) < 0.02, (precision, got, ref)
        (logged,) = scenario_log(job["log"], run)
        assert any(f"'precision': '{precision}'" in line for line in logged)
        assert {t.dtype for t in load_file(str(run / "model" / "model.safetensors")).values()} == {torch.float32}
        assert (run / "checkpoints" / f"step-{STEPS}" / "scaler.pt").exists() == (precision == "fp16")


def test_compile_gives_the_same_losses(job):
    """Each fully_shard'ed block compiled with inductor (the suite's one inductor compile: C++ kernels
    on CPU): the losses of the eager run, within the bound of the other compile tests
    (tests/test_fast_path.py, tests/test_deepspeed.py, which compile with aot_eager)."""
    run = job["runs"]["compile"]
    (logged,) = scenario_log(job["log"], run)
    assert any("'compiled': True" in line for line in logged)
    assert _diff(losses(run), losses(job["runs"][("clm-noclip-ga1", "ddp")])) <= 1e-5


def test_llama_from_config_is_sharded_by_its_decoder_layers(job):
    run = job["runs"]["llama-fsdp"]
    (logged,) = scenario_log(job["log"], run)
    assert any("fully_shard x 2 (LlamaDecoderLayer) + root" in line for line in logged), logged[-5:]
    assert _diff(losses(run), losses(job["runs"]["llama-ddp"])) <= TOL


def test_the_finished_run_exports_a_folder_transformers_loads(job):
    """model/ of a finished run: the consolidated fp32 weights (rank 0's save_pretrained of the full
    state dict), the DDP run's weights within the parity bound, and transformers.pipeline runs it."""
    import torch
    from safetensors.torch import load_file
    from transformers import pipeline
    out = job["runs"][("clm-noclip-ga1", "fsdp")] / "model"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    got, want = (load_file(str(run / "model" / "model.safetensors"))
                 for run in (job["runs"][("clm-noclip-ga1", "fsdp")], job["runs"][("clm-noclip-ga1", "ddp")]))
    assert got.keys() == want.keys() and max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    gen = pipeline("text-generation", model=str(out), device=torch.device("cpu"))
    text = gen("ROMEO:", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_damaged_dcp_files_are_reported_and_the_resume_falls_back(job, tmp_path):
    """checkpoint_problem reads DCP's .metadata and file sizes (no tensor data): a truncated or
    missing shard, a damaged .metadata, a missing scheduler.pt each make the checkpoint unusable,
    and the engine's resume then picks the previous one."""
    from backends.fsdp import FSDPBackend
    from engine.checkpoint import resumable_checkpoint
    run = tmp_path / "run"
    shutil.copytree(job["runs"]["resume"], run, ignore=shutil.ignore_patterns("model"))
    step4 = run / "checkpoints" / "step-4"
    assert FSDPBackend.checkpoint_problem(step4, {}) is None
    shard = step4 / "fsdp" / "__1_0.distcp"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 2])
    problem = FSDPBackend.checkpoint_problem(step4, {})
    assert problem.startswith("its DCP shard fsdp/__1_0.distcp is truncated"), problem
    found, skipped = resumable_checkpoint(run)
    assert found.name == "step-2" and len(skipped) == 1 and "truncated" in skipped[0]
    shard.unlink()
    assert FSDPBackend.checkpoint_problem(step4, {}) == "its DCP shard fsdp/__1_0.distcp is missing"
    shard.write_bytes(whole)
    (step4 / "fsdp" / ".metadata").write_bytes(b"not a pickle")
    assert FSDPBackend.checkpoint_problem(step4, {}) == "DCP fsdp/.metadata is unreadable (UnpicklingError)"
    (step4 / "fsdp" / ".metadata").unlink()
    assert FSDPBackend.checkpoint_problem(step4, {}) == "it has no DCP fsdp/.metadata"
    step2 = run / "checkpoints" / "step-2"
    (step2 / "scheduler.pt").unlink()
    assert "scheduler.pt" in FSDPBackend.checkpoint_problem(step2, {})


def test_offline_readers_give_the_full_state(job):
    """read_weights = the run's own export at the final step; checkpoint_shapes = the model's; the
    AdamW moments are full tensors of the parameters' shapes, by name, with AdamW's step."""
    import torch
    from safetensors.torch import load_file
    from backends.fsdp import FSDPBackend
    run = job["runs"]["resume"]
    step = run / "checkpoints" / f"step-{STEPS}"
    weights, source = FSDPBackend.read_weights(step, {}, [], {})
    export = load_file(str(run / "model" / "model.safetensors"))
    assert "DCP" in source and all(torch.equal(weights[k], v) for k, v in export.items())
    shapes = FSDPBackend.checkpoint_shapes(step, {})
    assert shapes == {k: tuple(v.shape) for k, v in weights.items()}
    assert "lm_head.weight" not in weights  # a tied tensor is stored once
    order = list(export)
    moments, adam_step = FSDPBackend.read_moments(step, order, {"lm_head.weight": "transformer.wte.weight"}, {}, None)
    assert adam_step == STEPS and set(moments) == set(order)
    assert all(moments[k]["exp_avg_sq"].shape == export[k].shape for k in order)
    assert all(moments[k]["exp_avg_sq"].abs().sum() > 0 for k in order)


# ------------------------------------------------------------------------------------------------
# In this process: options, preflight, bench/estimate declarations, sharding units, gradient sync
# ------------------------------------------------------------------------------------------------
@pytest.mark.fast
def test_option_validation_names_the_key(tmp_path):
    from backends.fsdp import FSDPOptions
    from engine.config import load_config
    from engine.errors import EngineError
    with pytest.raises(EngineError, match=r"^backend.fsdp.offload must be true or false, got 'yes'$"):
        FSDPOptions(offload="yes")
    with pytest.raises(EngineError, match=r"^backend.fsdp.shard_modules must be a list of module class names"):
        FSDPOptions(shard_modules=["GPT2Block", "not a name"])
    assert FSDPOptions(shard_modules="GPT2Block, LlamaDecoderLayer").shard_modules == ["GPT2Block",
                                                                                       "LlamaDecoderLayer"]
    for override, message in (("backend.fsdp.reshard_after_forward=sometimes",
                               "backend.fsdp.reshard_after_forward must be true or false, got 'sometimes'"),
                              ("backend.fsdp.async=true", "unknown config key 'backend.fsdp.async'")):
        with pytest.raises(EngineError) as e:
            load_config(None, ["backend.name=fsdp", f"output_dir={tmp_path}", override]).backend_options()
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.fast
def test_preflight_needs_fully_shard(monkeypatch, tmp_path):
    import torch.distributed.fsdp as fsdp_pkg
    from backends.fsdp import FSDPBackend
    from engine.config import load_config
    from engine.errors import EngineError
    cfg = load_config(None, ["backend.name=fsdp", "train.compile=true", "train.precision=fp16",
                             f"output_dir={tmp_path}"])
    assert FSDPBackend.preflight(cfg.training_spec(), cfg.backend_options(), 2) is None  # compile, fp16: fine
    monkeypatch.delattr(fsdp_pkg, "fully_shard")
    with pytest.raises(EngineError, match=r"^backend fsdp needs torch.distributed.fsdp.fully_shard \(FSDP2"):
        FSDPBackend.preflight(cfg.training_spec(), cfg.backend_options(), 2)


@pytest.mark.fast
def test_bench_specs_and_estimate_rows():
    from benchmarks.runner import estimate_key, parse_backend
    from engine.estimate import estimate
    assert parse_backend("fsdp").options == {"reshard_after_forward": True}
    assert parse_backend("fsdp:grad_op+offload").options == {"reshard_after_forward": False, "offload": True}
    with pytest.raises(ValueError, match="fsdp:grad_op"):
        parse_backend("fsdp:hybrid")
    with pytest.raises(ValueError, match=r"unknown modifier \+tp2 \(fsdp takes \+offload\)"):
        parse_backend("fsdp+tp2")
    keys = {spec: estimate_key(spec) for spec in ("fsdp", "fsdp:full+offload", "fsdp:grad_op", "fsdp:grad_op+offload")}
    assert keys == {"fsdp": "fsdp:full", "fsdp:full+offload": "fsdp:full+offload", "fsdp:grad_op": "fsdp:grad_op",
                    "fsdp:grad_op+offload": "fsdp:grad_op+offload"}
    rows = {e.backend: e for e in estimate("gpt2", 2, precision="fp32", rows=list(keys.values()))}
    zero3, zero2 = (e for e in estimate("gpt2", 2, precision="fp32", rows=["deepspeed:zero3", "deepspeed:zero2"]))
    # resharding is ZeRO-3's arithmetic, without DeepSpeed's whole reduce bucket (fp32: 4 bytes an element)
    from backends.deepspeed_zero import REDUCE_BUCKET_DEFAULT
    assert rows["fsdp:full"].model_states == zero3.model_states - 4 * REDUCE_BUCKET_DEFAULT
    assert rows["fsdp:grad_op"].model_states == zero2.model_states - 4 * REDUCE_BUCKET_DEFAULT
    assert rows["fsdp:full+offload"].params == 0 and rows["fsdp:full+offload"].host_per_node > 0
    assert rows["fsdp:grad_op+offload"].optim == 0 and rows["fsdp:grad_op+offload"].params > 0


@pytest.mark.fast
@pytest.mark.parametrize("model_type, unit", [("gpt2", "GPT2Block"), ("llama", "LlamaDecoderLayer"),
                                              ("qwen2", "Qwen2DecoderLayer"), ("mistral", "MistralDecoderLayer"),
                                              ("gpt_neo", "GPTNeoBlock"), ("gptj", "GPTJBlock")])
def test_every_family_is_sharded_by_its_repeated_blocks(model_type, unit):
    """The units come from the model's own _no_split_modules, built from config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from backends.fsdp import shard_units
    sizes = {"num_hidden_layers": 3, "num_layers": 3, "n_layer": 3, "hidden_size": 32, "n_embd": 32,
             "num_attention_heads": 4, "num_heads": 4, "n_head": 4, "intermediate_size": 64, "vocab_size": 100,
             "attention_types": [[["global"], 3]]}
    conf = AutoConfig.for_model(model_type, **sizes)
    for auto in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        with torch.device("meta"):
            model = auto.from_config(conf)
        units, wanted = shard_units(model, [])
        assert [type(u).__name__ for u in units] == [unit] * 3 and unit in wanted
        assert shard_units(model, ["Nonesuch"])[0] == []


@pytest.mark.fast
def test_accumulation_skips_the_reduce_scatter_until_the_last_micro_batch(monkeypatch, tiny_gpt2):
    """In this process, one rank: FSDP2 reduces a parameter group's gradients only in backwards where
    gradient sync is on. With sync_grads False no group reduces; the last micro-batch reduces each
    group once; the step clips over DTensor gradients and returns the pre-clip norm. Also: a
    shard_modules class the model lacks is one line, and eval_forward gives full logits."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    from backends.base import OptimizerSpec, SchedulerSpec, TrainingSpec
    from backends.fsdp import FSDPBackend, FSDPOptions
    from engine.errors import EngineError
    from transformers import AutoModelForCausalLM

    reduced = []
    real = _fsdp_param_group.foreach_reduce
    monkeypatch.setattr(_fsdp_param_group, "foreach_reduce",
                        lambda params, *a, **k: reduced.append(len(params)) or real(params, *a, **k))
    spec = TrainingSpec("causal_lm", "fp32", 2, 2, 0.5, OptimizerSpec(1e-3, 0.0, (0.9, 0.999), 1e-8, "for_loop"),
                        "constant")
    build = lambda: AutoModelForCausalLM.from_pretrained(str(tiny_gpt2))  # noqa: E731
    assert not dist.is_initialized()
    FSDPBackend.init_distributed()  # no torchrun: a group of one in this process
    try:
        with pytest.raises(EngineError, match=r"^backend.fsdp.shard_modules=\['Nonesuch'\]: the model has no "):
            FSDPBackend(spec, FSDPOptions(shard_modules=["Nonesuch"])).setup(build, SchedulerSpec("constant", 0, 1))
        backend = FSDPBackend(spec, FSDPOptions())
        backend.setup(build, SchedulerSpec("constant", 0, 1))
        ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "labels": ids}
        backend.forward_backward(batch, sync_grads=False)
        assert reduced == []  # the first micro-batch's gradients stay local
        backend.forward_backward(batch, sync_grads=True)
        assert len(reduced) == 3 and sum(reduced) == len(list(backend.module.parameters()))  # 2 blocks + root
        info = backend.step()
        assert isinstance(info.grad_norm, torch.Tensor) and type(info.grad_norm) is torch.Tensor
        assert float(info.grad_norm) > 0.5  # before clipping to 0.5
        backend.train_mode(False)
        assert backend.eval_forward({"input_ids": ids}).shape == (2, 16, 50257)
        backend.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.fast
def test_dcp_failures_become_errors_the_engine_handles():
    """DCP raises CheckpointException (a BaseException, past `except Exception`) with every rank's
    failure: a full disk on any rank becomes OSError(ENOSPC), which the engine's checkpoint code
    turns into its one line; anything else a RuntimeError naming the first failure."""
    import errno
    from torch.distributed.checkpoint import CheckpointException
    from backends.fsdp import _dcp_errors
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as e:
        with _dcp_errors("save"):
            raise CheckpointException("save failed", {1: (full, None)})
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == "[Errno 28] DCP checkpoint save failed: No space left on device"
    with pytest.raises(RuntimeError, match=r"^DCP checkpoint load failed \(KeyError: 'model.x'\)$"):
        with _dcp_errors("load"):
            raise CheckpointException("load failed", {0: (KeyError("model.x"), None)})
