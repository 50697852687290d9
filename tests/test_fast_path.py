"""The device fast path, checked on CPU: the AdamW implementations agree, torch.compile and the
attention implementations give the losses of the plain path, and keeping losses on the device
between log steps loses nothing (a log window's loss is the mean of its steps' losses). In-process
(the plain run is trained once), except torch.compile: its 2-rank runs are scenarios of the shared
job (conftest.py)."""
from pathlib import Path

import pytest

from engine.config import load_config
from engine.errors import EngineError
from engine.worker import prepare_run, run
from helpers import SHAKESPEARE, losses, metrics

STEPS = 6


def job(model, out, *extra):
    return load_config(None, ["task=causal_lm", f"model.name_or_path={model}", f"data.train={SHAKESPEARE}",
                              "data.block_size=32", "data.max_train_samples=96", "train.micro_batch_size=4",
                              f"train.max_steps={STEPS}", "train.lr=1e-3", "train.weight_decay=0.01", "train.log_every=1",
                              "train.save_final=false", f"output_dir={out}", *extra]).to_dict()


def shared_scenarios(root: Path, model: Path) -> list[dict]:
    """DDP on 2 ranks, eager and compiled (no eval: only the training graph is compiled). Compiled with
    aot_eager: dynamo, DDPOptimizer's split at the gradient buckets and AOT autograd as with inductor,
    without inductor's C++ kernel builds (33 s cold on 2 cores); inductor's kernels are FSDP2's compile
    test's (tests/test_fsdp.py), and DDP with inductor is the GPU plan's (profile, matrix-gpt2)."""
    return [job(model, root / label, *extra) for label, extra in
            (("ddp-eager", ()), ("ddp-compiled", ("train.compile=true", "train.compile_backend=aot_eager")))]


@pytest.fixture(scope="module")
def plain(tiny_gpt2, tmp_path_factory):
    """The job as users run it by default (adamw_impl auto = foreach on CPU, sdpa attention, eager,
    log_every=1), trained once: the reference of every comparison below."""
    out = tmp_path_factory.mktemp("fast-path") / "plain"
    run(job(tiny_gpt2, out))
    return out


def test_default_adamw_matches_the_deterministic_path(tiny_gpt2, tmp_path, plain):
    """auto (foreach on CPU, fused on CUDA) and fused against for_loop, 6 steps at lr 1e-3 with
    weight decay and clipping. All three compute the same elementwise AdamW update; measured on this
    CPU they are bit-identical (difference 0). The 1e-5 bound (about 10 float32 ulps at a loss of
    10.8) leaves room for a fused kernel that contracts multiply-adds (FMA) differently, as the CUDA
    kernels may; a wrong update (a missing bias correction, decay on the wrong group) moves these
    losses by 1e-3 or more."""
    run(job(tiny_gpt2, tmp_path / "for_loop", "train.adamw_impl=for_loop"))
    run(job(tiny_gpt2, tmp_path / "fused", "train.adamw_impl=fused"))
    ref = losses(tmp_path / "for_loop")
    for impl, got in (("auto", losses(plain)), ("fused", losses(tmp_path / "fused"))):
        worst = max(abs(a - b) for a, b in zip(got, ref))
        assert len(got) == STEPS and worst <= 1e-5, f"{impl}: max |loss - for_loop loss| = {worst:.3g}"
    assert ref[-1] < ref[0]


def test_window_loss_is_the_mean_of_its_steps(tiny_gpt2, tmp_path, plain):
    """Losses are summed on the device and read once per log window: log_every=3 must report the
    mean of the per-step losses that log_every=1 reports, and the same token counts."""
    run(job(tiny_gpt2, tmp_path / "every3", "train.log_every=3"))
    per_step, windows = losses(plain), losses(tmp_path / "every3")
    assert [r["step"] for r in metrics(tmp_path / "every3")] == [3, 6]
    assert windows == pytest.approx([sum(per_step[:3]) / 3, sum(per_step[3:]) / 3], abs=1e-12)


def test_compile_gives_the_same_losses(shared_job):
    """torch.compile through DDP on 2 ranks: its graph is split at the gradient buckets (DDPOptimizer).
    Bound 1e-5 as for inductor, which fuses elementwise ops and reorders reductions (measured 9.5e-7,
    one float32 ulp at 10.8, when this test compiled with it)."""
    from drivers.run_many import scenario_log
    root = shared_job.root(__name__)
    (logged,) = scenario_log(shared_job.log, root / "ddp-compiled")
    assert any("'compiled': 'aot_eager'" in line for line in logged)
    eager, compiled = losses(root / "ddp-eager"), losses(root / "ddp-compiled")
    worst = max(abs(a - b) for a, b in zip(eager, compiled))
    assert len(compiled) == STEPS and worst <= 1e-5, f"max |compiled - eager| = {worst:.3g}"


def test_attention_implementations_agree(tiny_gpt2, tmp_path, plain):
    """sdpa (GPT-2's default, the plain run's) and eager attention are the same math; on CPU in fp32
    they agree to float32 rounding. The model really is built with the implementation asked for."""
    run(job(tiny_gpt2, tmp_path / "eager", "model.attn_implementation=eager"))
    assert losses(plain) == pytest.approx(losses(tmp_path / "eager"), abs=1e-5)
    from engine.modeling import model_builder
    cfg = load_config(None, [f"model.name_or_path={tiny_gpt2}", f"data.train={SHAKESPEARE}", "data.block_size=32",
                             "model.attn_implementation=eager"])
    task, _, _, conf = prepare_run(cfg)
    assert model_builder(cfg, conf, task.auto_model_class())().config._attn_implementation == "eager"


@pytest.mark.fast
def test_attention_and_optimizer_choices_are_checked_before_launch(tiny_gpt2):
    base = [f"model.name_or_path={tiny_gpt2}", f"data.train={SHAKESPEARE}", "data.block_size=32"]
    with pytest.raises(EngineError, match="train.adamw_impl must be one of auto, fused, foreach, for_loop"):
        load_config(None, base + ["train.adamw_impl=apex"])
    with pytest.raises(EngineError, match="model.attn_implementation must be one of"):
        load_config(None, base + ["model.attn_implementation=flash"])
    if __import__("importlib").util.find_spec("flash_attn") is None:
        with pytest.raises(EngineError, match="needs the flash-attn package"):
            prepare_run(load_config(None, base + ["model.attn_implementation=flash_attention_2"]))


@pytest.mark.fast
def test_compile_backend_and_mode_are_checked_and_reach_the_backend(tiny_gpt2):
    """train.compile_backend / train.compile_mode (the HF Trainer's torch_compile_backend/_mode): a
    name torch.compile does not have, or either without train.compile, is one line before launch."""
    from backends.base import compile_options
    base = [f"model.name_or_path={tiny_gpt2}", f"data.train={SHAKESPEARE}", "data.block_size=32"]
    with pytest.raises(EngineError, match=r"^train.compile_mode must be one of default, reduce-overhead, "):
        load_config(None, base + ["train.compile=true", "train.compile_mode=fastest"])
    with pytest.raises(EngineError, match=r"^train.compile_backend must be one of .*inductor.*; got 'inductr' "
                                          r"\(did you mean 'inductor'\?\)"):
        load_config(None, base + ["train.compile=true", "train.compile_backend=inductr"])
    with pytest.raises(EngineError, match=r"^train.compile_backend=aot_eager only apply with train.compile=true"):
        load_config(None, base + ["train.compile_backend=aot_eager"])
    spec = load_config(None, base + ["train.compile=true", "train.compile_backend=aot_eager"]).training_spec()
    assert compile_options(spec) == {"backend": "aot_eager"}
    assert compile_options(load_config(None, base + ["train.compile=true"]).training_spec()) == {}


@pytest.mark.fast
def test_compile_is_refused_where_the_backend_cannot(tiny_gpt2):
    pytest.importorskip("colossalai")
    from backends.base import backend_class
    cfg = load_config(None, [f"model.name_or_path={tiny_gpt2}", f"data.train={SHAKESPEARE}", "train.compile=true"],
                      backend="colossal")
    with pytest.raises(EngineError, match="train.compile is not supported by the colossal backend"):
        backend_class("colossal").preflight(cfg.training_spec(), cfg.backend_options())
