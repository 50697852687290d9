"""Single-process runs of the real loop in this process (no launcher): precision modes,
gradient checkpointing, unpacked causal-LM rows, weight-decay groups."""
import pytest
import torch

from engine.config import load_config
from engine.worker import run
from helpers import SHAKESPEARE, losses


def job(model, out, *extra):
    return load_config(None, ["task=causal_lm", f"model.name_or_path={model}", f"data.train={SHAKESPEARE}",
                              "data.block_size=32", "data.max_train_samples=64", "train.micro_batch_size=4",
                              "train.max_steps=4", "train.lr=1e-3", "train.log_every=1",
                              f"output_dir={out}", *extra]).to_dict()


def test_gradient_checkpointing_gives_the_same_losses(tiny_gpt2, tmp_path, monkeypatch):
    # equal losses alone would also hold if the option were ignored: count the checkpointed calls
    import transformers.modeling_utils as modeling_utils
    calls = []
    checkpoint = modeling_utils.checkpoint
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    run(job(tiny_gpt2, tmp_path / "plain"))
    assert not calls
    run(job(tiny_gpt2, tmp_path / "ckpt", "train.gradient_checkpointing=true"))
    assert len(calls) >= 4 * 2  # every step, both layers
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "ckpt"), abs=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(tiny_gpt2, tmp_path, precision):
    run(job(tiny_gpt2, tmp_path / "fp32"))
    run(job(tiny_gpt2, tmp_path / precision, f"train.precision={precision}"))
    ref, got = losses(tmp_path / "fp32"), losses(tmp_path / precision)
    assert got != ref  # autocast really ran in lower precision
    assert got == pytest.approx(ref, rel=2e-2)


@pytest.mark.fast
def test_one_example_per_row_without_packing(tiny_gpt2, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join('{"text": "%s"}\n' % ("word " * n) for n in range(1, 40)))
    cfg = load_config(None, ["task=causal_lm", f"model.name_or_path={tiny_gpt2}", f"data.train={rows}",
                             "data.packing=false", "data.block_size=16", "data.validation_split=0.2",
                             "train.micro_batch_size=4", "train.max_steps=3", "train.log_every=1",
                             f"output_dir={tmp_path / 'run'}"])
    from engine.worker import prepare_run
    task, _, data, _ = prepare_run(cfg)
    batch = task.collate([data.train[i] for i in range(4)])
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() <= 16 and len(set(lengths.tolist())) > 1  # truncated, not packed
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding is not learned
    result = run(cfg.to_dict())
    assert result["finished"] and "eval_loss" in result


@pytest.mark.fast
def test_no_weight_decay_on_biases_and_norms(tiny_gpt2):
    """The optimizer a backend really builds: every bias and every LayerNorm parameter undecayed,
    every matrix decayed, each parameter (tied wte/lm_head once) in exactly one group."""
    from transformers import AutoModelForCausalLM
    from backends.base import OptimizerSpec, SchedulerSpec, TrainingSpec
    from backends.ddp import DDPBackend, DDPOptions
    spec = TrainingSpec("causal_lm", "fp32", 1, 1, 0.0, OptimizerSpec(1e-3, 0.1, (0.9, 0.999), 1e-8), "constant")
    backend = DDPBackend(spec, DDPOptions())
    backend.setup(lambda: AutoModelForCausalLM.from_pretrained(tiny_gpt2), SchedulerSpec("constant", 0, 1))
    names = {id(p): n for n, p in backend.module.named_parameters()}
    decay_of = {names[id(p)]: g["weight_decay"] for g in backend.optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in backend.optimizer.param_groups) == len(decay_of) == len(names)
    undecayed = {n for n in names.values() if n.endswith(".bias") or ".ln_" in n}
    assert len(undecayed) > 10 and any(".ln_f." in n for n in undecayed)
    assert {n for n, wd in decay_of.items() if wd == 0.0} == undecayed
    assert {n for n, wd in decay_of.items() if wd == 0.1} == set(names.values()) - undecayed
    assert "transformer.h.0.attn.c_attn.weight" in set(names.values()) - undecayed


def test_embedded_default_job_runs_and_its_export_generates(tmp_path):
    """`engine launch` with no config: the project's own corpus and tokenizer, no download."""
    from engine.config import BUILTIN_SAMPLE
    from transformers import pipeline
    cfg = load_config(None, ["train.max_steps=6", "train.eval_every=3", "train.log_every=1",
                             f"output_dir={tmp_path / 'run'}"])
    assert cfg.data.train == BUILTIN_SAMPLE and cfg.model.name_or_path is None
    result = run(cfg.to_dict())
    assert result["finished"] and result["perplexity"] < 1000
    values = losses(tmp_path / "run")
    assert values[-1] < values[0]
    text = pipeline("text-generation", model=str(tmp_path / "run" / "model"))("Ada went to", max_new_tokens=5,
                                                                              do_sample=False)[0]["generated_text"]
    assert text.startswith("Ada went to")


@pytest.mark.fast
def test_causal_lm_models_have_a_loss_type_transformers_knows(tiny_gpt2, tmp_path):
    """transformers warns `loss_type=None ... unrecognized` at every launch unless the model's
    loss_type is in its LOSS_MAPPING (GPT2LMHeadModel's class name maps to none)."""
    from transformers import AutoModelForCausalLM
    from transformers.loss.loss_utils import LOSS_MAPPING

    from engine.modeling import model_builder
    from engine.worker import prepare_run
    cfg = load_config(None, ["task=causal_lm", f"model.name_or_path={tiny_gpt2}", f"data.train={SHAKESPEARE}",
                             "data.block_size=32", "data.max_train_samples=8", f"output_dir={tmp_path}"])
    conf = prepare_run(cfg)[3]
    model = model_builder(cfg, conf, AutoModelForCausalLM)()
    assert model.loss_type in LOSS_MAPPING
    assert model.loss_function is LOSS_MAPPING["ForCausalLM"]  # the loss transformers used anyway


@pytest.mark.fast
@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_the_model_output_is_gone_before_backward(tiny_gpt2, name):
    """forward_backward keeps the loss, not the model's output: its logits (b*s*V, 16-bit) living
    through backward were 1.5 GiB of the engine's peak on the H200 headline (GPT-2, 16 x 1024) that
    the hand loop did not have. A backward hook on the first block looks for the logits."""
    import weakref

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from backends.base import OptimizerSpec, SchedulerSpec, TrainingSpec, backend_class, backend_spec

    logits, alive_in_backward = [], []

    def build():
        model = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2))
        model.register_forward_hook(lambda m, args, out: logits.append(weakref.ref(out.logits)))
        model.transformer.h[0].register_full_backward_hook(
            lambda m, gin, gout: alive_in_backward.append(logits[-1]() is not None))
        return model

    spec = TrainingSpec("causal_lm", "fp32", 2, 1, 1.0, OptimizerSpec(1e-3, 0.0, (0.9, 0.999), 1e-8, "for_loop"),
                        "constant")
    cls = backend_class(name)
    cls.init_distributed()  # fsdp: a group of one in this process; ddp: nothing (a bare module)
    try:
        backend = cls(spec, backend_spec(name).options_cls())
        backend.setup(build, SchedulerSpec("constant", 0, 1))
        ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
        out = backend.forward_backward({"input_ids": ids, "labels": ids}, sync_grads=True)
        assert out.logits is None and torch.isfinite(out.loss)
        assert alive_in_backward == [False]
        kept = backend.forward_backward({"input_ids": ids, "labels": ids}, sync_grads=True, return_logits=True)
        assert kept.logits.shape == (2, 16, 50257) and not kept.logits.requires_grad  # asked for: detached
        backend.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.fast
def test_profile_step_writes_what_one_step_spends_its_time_on(tiny_gpt2, tmp_path, capsys):
    """train.profile_step=2: step 2 profiled (the trace, the operator table, the JSON summary), the
    other steps not; the matmuls are among the operators and the shares add up to at most 1."""
    import json
    run(job(tiny_gpt2, tmp_path / "run", "train.max_steps=3", "train.profile_step=2"))
    folder = tmp_path / "run" / "profile"
    assert sorted(f.name for f in folder.iterdir()) == ["step-2-rank0.trace.json", "step-2.json", "step-2.txt"]
    summary = json.loads((folder / "step-2.json").read_text())
    names = [op["name"] for op in summary["ops"]]
    assert summary["step"] == 2 and summary["time"] == "CPU" and summary["wall_s"] > 0
    assert {"aten::addmm", "aten::mm"} <= set(names)
    assert all(0 < op["share"] <= 1 for op in summary["ops"]) and sum(op["share"] for op in summary["ops"]) <= 1 + 1e-9
    assert [op["self_ms"] for op in summary["ops"]] == sorted((op["self_ms"] for op in summary["ops"]), reverse=True)
    assert "aten::addmm" in (folder / "step-2.txt").read_text()
    assert json.loads((folder / "step-2-rank0.trace.json").read_text())["traceEvents"]
    assert "profile of step 2" in capsys.readouterr().err
    run(job(tiny_gpt2, tmp_path / "late", "train.max_steps=2", "train.profile_step=5"))
    assert not (tmp_path / "late" / "profile").exists()
    assert "train.profile_step=5 is after the last step (2)" in capsys.readouterr().err
