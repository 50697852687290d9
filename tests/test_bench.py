"""`engine bench` and `engine estimate`: the bench runs end to end and records failures as results;
the FLOPs formula and the memory estimator agree with hand computations and DeepSpeed's estimators.
No timing assertions: these check that the figures are produced and well-formed, not their values."""
from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
from click.testing import CliRunner

from launch.cli import main
from tests.helpers import REPO, run_engine


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------
@pytest.mark.fast
def test_flops_per_token_gpt2_matches_hand_computation():
    from engine.flops import flops_per_token, param_counts

    c = param_counts("gpt2")
    assert c.total == 124_439_808            # GPT-2 small, tied LM head counted once
    assert c.embedding == 50257 * 768 + 1024 * 768
    # by hand: every parameter except the position table takes part in a matmul (wte as the LM head)
    n_matmul = 124_439_808 - 1024 * 768
    attention = 12 * 12 * 768 * 1024       # 12 * layers * d_model * seq
    assert flops_per_token("gpt2", 1024) == 6 * n_matmul + attention == 855_166_464
    assert flops_per_token("gpt2", 512) == 6 * n_matmul + attention // 2


@pytest.mark.fast
@pytest.mark.parametrize("name,total,tied", [("llama-3.2-1b", 1_235_814_400, True), ("llama-3.1-8b", 8_030_261_248, False),
                                             ("qwen2.5-0.5b", 494_032_768, True), ("mistral-7b", 7_241_732_096, False),
                                             ("qwen3-0.6b", 596_049_920, True), ("qwen3-8b", 8_190_735_360, False)])
def test_todays_families_have_their_published_sizes_and_flops(name, total, tied):
    """Grouped-query attention, gated MLP, tied or untied heads: the counts are the models' own (meta
    device), equal to the published sizes; an untied LM head takes part in the matmuls once."""
    from engine.flops import flops_per_token, param_counts, parse_model
    c, arch = param_counts(name), parse_model(name)
    assert (c.total, c.tied) == (total, tied)
    assert c.embedding == arch.vocab * arch.d_model  # rotary: no position table
    assert c.matmul == total - (0 if tied else c.embedding)
    heads_x_head_dim = arch.n_head * arch.kwargs.get("head_dim", arch.d_model // arch.n_head)
    assert arch.attn_width == heads_x_head_dim  # Qwen3-0.6B: 2048 on a 1024-wide model
    assert flops_per_token(name, 2048) == 6 * c.matmul + 12 * arch.n_layer * heads_x_head_dim * 2048


# ------------------------------------------------------------------------------------------------
# Estimator
# ------------------------------------------------------------------------------------------------
def _estimate(*args) -> tuple[str, int]:
    result = CliRunner().invoke(main, ["estimate", *args])
    return result.output, result.exit_code


def _row(text: str, backend: str) -> list[str]:
    for line in text.splitlines():
        if line.split() and line.split()[0] == backend:
            return line.split()
    raise AssertionError(f"no row {backend!r} in:\n{text}")


@pytest.mark.fast
def test_estimate_gpt2_xl_agrees_with_deepspeed_estimators():
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_cold)
    from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                      estimate_zero2_model_states_mem_needs_all_cold)

    out, code = _estimate("gpt2-xl", "--gpus", "8", "--json")
    assert code == 0, out
    rows = {r["backend"]: r for r in json.loads(out)["rows"]}
    total, largest = 1_557_611_200, 50257 * 1600  # GPT-2 XL; its largest layer is the token embedding
    # exact bytes against the functions DeepSpeed's *_all_live/_all_cold estimators call, plus the
    # reduce bucket they leave out, which ZeRO allocates whole (bf16: 5e8 x 2 bytes; H200 smoke)
    bucket = 500_000_000 * 2
    for key, off in (("deepspeed:zero2", False), ("deepspeed:zero2+offload", True)):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, 8, 1, cpu_offload=off)
        assert (rows[key]["model_states"], rows[key]["host_per_node"], rows[key]["source"]) == (gpu + bucket, cpu,
                                                                                                 "deepspeed")
    for key, off_opt, off_par in (("deepspeed:zero3", False, False), ("deepspeed:zero3+offload_opt", True, False),
                                  ("deepspeed:zero3+offload", True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, 8, 1, cpu_offload=off_opt,
                                                            cpu_offload_params=off_par, zero_init=True)
        assert (rows[key]["model_states"], rows[key]["host_per_node"]) == (gpu + bucket, cpu)

    # and the human table prints the same GiB figures as DeepSpeed's own printed estimates
    text, code = _estimate("gpt2-xl", "--gpus", "8")
    assert code == 0, text
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=8)
        estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=8)
    ds = {}
    for line in printed.getvalue().splitlines():
        m = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)", line)
        if m:
            ds[re.sub(r"\s+", "", m.group(3).replace("OffloadDeviceEnum.", ""))] = (m.group(1), m.group(2))
    header = text.splitlines()[2].split()
    states, host = header.index("states"), header.index("host")
    expect = {"deepspeed:zero2": "offload_optimizer=none", "deepspeed:zero2+offload": "offload_optimizer=cpu",
              "deepspeed:zero3": "offload_param=none, offload_optimizer=none, zero_init=1",
              "deepspeed:zero3+offload_opt": "offload_param=none, offload_optimizer=cpu , zero_init=1",
              "deepspeed:zero3+offload": "offload_param=cpu , offload_optimizer=cpu , zero_init=1"}
    for backend, options in expect.items():
        row = _row(text, backend)
        ds_host, ds_states = ds[re.sub(r"\s+", "", options)]
        assert row[host] == ds_host and abs(float(row[states]) - bucket / 2**30 - float(ds_states)) <= 0.011, \
            (backend, row, ds)


@pytest.mark.fast
def test_estimate_fits_verdict_flips_with_gpu_memory():
    host = ("--host-memory", "1TB")  # the device verdicts alone, whatever this machine has
    big, code = _estimate("gpt2-xl", "--gpus", "8", "--gpu-memory", "80GB", *host)
    assert code == 0, big
    small, _ = _estimate("gpt2-xl", "--gpus", "8", "--gpu-memory", "16GB", *host)
    fits = lambda text, b: _row(text, b)[-3]  # columns: ... fits fits+gc source
    assert fits(big, "ddp") == "yes" and fits(small, "ddp") == "no(gpu)"   # ~35 GiB per GPU with DDP
    assert fits(small, "deepspeed:zero3") == "yes"                           # ZeRO-3 shards it 8 ways
    tiny, _ = _estimate("gpt2-xl", "--gpus", "8", "--gpu-memory", "1GB", *host)
    assert all(fits(tiny, b) == "no(gpu)" for b in ("ddp", "deepspeed:zero3", "deepspeed:zero3+offload"))
    bad, code = _estimate("gpt2-xxl", "--gpus", "8")
    assert code == 2 and "unknown model" in bad


@pytest.mark.fast
def test_estimate_fits_checks_host_memory_too_and_says_which_limit_fails():
    """GPT-J-6B on one 80 GB GPU: ZeRO-3 with full offload fits the GPU (8.4 GiB) but needs ~152 GiB of
    host memory per node; on a 128 GiB machine that does not fit, on a 256 GiB one it does."""
    job = ("gpt-j-6B", "--gpus", "1", "--seq", "1024", "--micro-batch", "1", "--precision", "bf16")
    small, code = _estimate(*job, "--host-memory", "128GB")
    assert code == 0, small
    fits = lambda text, b: _row(text, b)[-3:-1]  # fits, fits+gc
    assert fits(small, "deepspeed:zero3+offload") == ["no(host)", "no(host)"]
    assert fits(small, "ddp") == ["no(gpu)", "no(gpu)"]
    assert "host memory 128 GiB per node" in small
    large, _ = _estimate(*job, "--host-memory", "256GB")
    assert fits(large, "deepspeed:zero3+offload") == ["yes", "yes"]
    tiny_gpu, _ = _estimate(*job, "--host-memory", "128GB", "--gpu-memory", "4GB")
    assert fits(tiny_gpu, "deepspeed:zero3+offload")[0] == "no(both)"
    # without --host-memory: this machine's memory
    from engine.estimate import estimate, this_machine_memory
    here, _ = _estimate(*job)
    [row] = estimate("gpt-j-6B", 1, seq=1024, rows=["deepspeed:zero3+offload"], host_memory=this_machine_memory())
    assert fits(here, "deepspeed:zero3+offload")[0] == row.verdict(False)
    assert f"host memory {this_machine_memory() / 2**30:.0f} GiB per node" in here


# Every row as the estimator computed it before the rows moved into the backend classes (bytes:
# source, params, grads, optim, buffers, act_full, act_ckpt, host_per_node; all fit 80 GiB); the
# activation columns since their constants were measured on the H200 (autocast rows: ddp, torch_ddp).
ROWS_GPT2_XL_8_BF16 = {
    "ddp": ("formula", 6230444800, 6230444800, 12460889600, 9345667200, 6540081152, 1156298752, 0),
    "deepspeed:zero0": ("formula", 3115222400, 9345667200, 18691334400, 0, 4180785152, 1107146752, 0),
    "deepspeed:zero1": ("formula", 3115222400, 3894028000, 2336416800, 1000000000, 4180785152, 1107146752, 0),
    "deepspeed:zero2": ("deepspeed", 3115222400, 1168208400, 2336416800, 1000000000, 4180785152, 1107146752,
                        74765337600),
    "deepspeed:zero2+offload": ("deepspeed", 3115222400, 0, 0, 1000000000, 4180785152, 1107146752, 74765337600),
    "deepspeed:zero3": ("deepspeed", 389402800, 778805600, 2336416800, 1321644800, 4180785152, 1107146752, 3859737600),
    "deepspeed:zero3+offload_opt": ("deepspeed", 389402800, 0, 0, 1321644800, 4180785152, 1107146752, 37382668800),
    "deepspeed:zero3+offload": ("deepspeed", 0, 0, 0, 1321644800, 4180785152, 1107146752, 42055502400),
    "colossal:torch_ddp": ("formula", 6230444800, 6230444800, 12460889600, 9345667200, 6540081152, 1156298752, 0),
    "colossal:zero1": ("formula", 3115222400, 3894028000, 2336416800, 0, 4180785152, 1107146752, 0),
    "colossal:zero2": ("formula", 3115222400, 1168208400, 2336416800, 0, 4180785152, 1107146752, 0),
    "colossal:gemini": ("formula", 389402800, 778805600, 2336416800, 321644800, 4180785152, 1107146752, 0),
    # added with the fsdp backend (issue 20): ZeRO-3's / ZeRO-2's formula rows, offload flags
    "fsdp:full": ("formula", 389402800, 778805600, 2336416800, 321644800, 4180785152, 1107146752, 0),
    "fsdp:grad_op": ("formula", 3115222400, 1168208400, 2336416800, 0, 4180785152, 1107146752, 0),
    "fsdp:full+offload": ("formula", 0, 0, 0, 321644800, 4180785152, 1107146752, 42055502400),
    "fsdp:grad_op+offload": ("formula", 3115222400, 0, 0, 0, 4180785152, 1107146752, 42055502400),
}
ROWS_GPT2_2_FP32 = {
    "ddp": ("formula", 497759232, 497759232, 995518464, 497759232, 1448030208, 724512768, 0),
    "deepspeed:zero0": ("formula", 497759232, 497759232, 995518464, 0, 1448030208, 724512768, 0),
    "deepspeed:zero1": ("formula", 497759232, 497759232, 746638848, 2000000000, 1448030208, 724512768, 0),
    "deepspeed:zero2": ("formula", 497759232, 248879616, 746638848, 2000000000, 1448030208, 724512768, 0),
    "deepspeed:zero2+offload": ("formula", 497759232, 0, 0, 2000000000, 1448030208, 724512768, 2986555392),
    "deepspeed:zero3": ("formula", 248879616, 248879616, 746638848, 2154389504, 1448030208, 724512768, 0),
    "deepspeed:zero3+offload_opt": ("formula", 248879616, 0, 0, 2154389504, 1448030208, 724512768, 2986555392),
    "deepspeed:zero3+offload": ("formula", 0, 0, 0, 2154389504, 1448030208, 724512768, 3733194240),
    "colossal:torch_ddp": ("formula", 497759232, 497759232, 995518464, 497759232, 1448030208, 724512768, 0),
    "colossal:zero1": ("formula", 497759232, 497759232, 746638848, 0, 1448030208, 724512768, 0),
    "colossal:zero2": ("formula", 497759232, 248879616, 746638848, 0, 1448030208, 724512768, 0),
    "colossal:gemini": ("formula", 248879616, 248879616, 746638848, 154389504, 1448030208, 724512768, 0),
    "fsdp:full": ("formula", 248879616, 248879616, 746638848, 154389504, 1448030208, 724512768, 0),
    "fsdp:grad_op": ("formula", 497759232, 248879616, 746638848, 0, 1448030208, 724512768, 0),
    "fsdp:full+offload": ("formula", 0, 0, 0, 154389504, 1448030208, 724512768, 3733194240),
    "fsdp:grad_op+offload": ("formula", 497759232, 0, 0, 0, 1448030208, 724512768, 2986555392),
}


@pytest.mark.parametrize("args, kwargs, expected", [(("gpt2-xl", 8), {}, ROWS_GPT2_XL_8_BF16),
                                                    (("gpt2", 2), {"precision": "fp32"}, ROWS_GPT2_2_FP32)])
def test_estimate_rows_from_the_backends_keep_every_figure(args, kwargs, expected):
    from engine.estimate import estimate

    rows = estimate(*args, **kwargs)
    got = {e.backend: (e.source, e.params, e.grads, e.optim, e.buffers, e.act_full, e.act_ckpt, e.host_per_node)
           for e in rows}
    assert list(got) == list(expected)  # the same rows in the same order (registry order)
    assert got == expected
    assert all(e.fits_full and e.fits_ckpt for e in rows)


@pytest.mark.fast
def test_registry_order_does_not_depend_on_which_backend_was_imported_first(monkeypatch):
    # CI once imported backends.deepspeed_zero before backends.ddp and every table reordered.
    import backends.base as base

    base.backend_names()  # every built-in registered
    monkeypatch.setattr(base, "_SPECS", dict(reversed(list(base._SPECS.items()))))
    names = base.backend_names()
    assert names[0] == "ddp" and names.index("deepspeed") < names.index("colossal")


def test_every_bench_spec_maps_to_a_declared_estimate_row():
    from backends.base import backend_class, backend_names
    from benchmarks.runner import estimate_key
    from engine.estimate import estimate, estimate_rows

    keys = {row.key for row in estimate_rows(listed_only=False)}
    specs = ["ddp", "trainer", "hand+gc", "colossal:torch_ddp", "colossal:low_level_zero+stage2", "colossal:gemini",
             *(f"deepspeed:zero{n}{mod}" for n in range(4) for mod in ("", "+offload", "+offload_opt")),
             *(f"fsdp{variant}{mod}" for variant in ("", ":full", ":grad_op") for mod in ("", "+offload"))]
    for spec in specs:
        assert estimate_key(spec) in keys, spec
        estimate("micro", 2, rows=(estimate_key(spec),), precision="fp32")  # computable
    assert estimate_key("colossal:hybrid+tp2") is None
    assert all(backend_class(n).estimate_rows() for n in backend_names())  # every backend adds its rows
    with pytest.raises(ValueError, match="no estimate row"):
        estimate("micro", 2, rows=("nonesuch",))


# ------------------------------------------------------------------------------------------------
# Backend specs
# ------------------------------------------------------------------------------------------------
@pytest.mark.fast
def test_backend_specs_map_to_engine_options():
    from benchmarks.runner import estimate_key, parse_backend

    b = parse_backend("deepspeed:zero3+offload")
    assert (b.system, b.backend, b.options) == ("engine", "deepspeed", {"zero_stage": 3, "offload_optimizer": "cpu",
                                                                       "offload_params": "cpu"})
    assert parse_backend("deepspeed:zero2+offload").options == {"zero_stage": 2, "offload_optimizer": "cpu"}
    assert parse_backend("colossal:zero2").options == {"plugin": "low_level_zero", "zero_stage": 2}
    assert parse_backend("colossal:hybrid+tp2+pp2").options == {"plugin": "hybrid", "tp_size": 2, "pp_size": 2}
    g = parse_backend("ddp+gc@train.grad_accum=2")
    assert g.overrides == {"train.gradient_checkpointing": True, "train.grad_accum": 2}
    assert parse_backend("trainer").system == "hf-trainer" and parse_backend("hand").system == "hand-loop"
    assert estimate_key("deepspeed:zero3+offload") == "deepspeed:zero3+offload"
    assert estimate_key("colossal:low_level_zero") == "colossal:zero1"
    assert estimate_key("trainer") == "ddp"  # the baselines are plain torch DDP
    for bad, why in (("deepspeed:zero4", "zero0..zero3"), ("ddp:x", "no :variant"), ("colossal:nope", "plugin"),
                     ("deepspeed:zero2+nope", "unknown modifier"), ("nope", "unknown backend spec")):
        with pytest.raises(ValueError, match=why):
            parse_backend(bad)


@pytest.mark.fast
def test_a_lora_specs_estimate_counts_the_adapters_as_trainable():
    """`ddp@model.lora.r=4`: the estimate the bench puts beside the measurement is the LoRA row
    (adapters with gradients and AdamW state, the base frozen), not the full fine-tuning one."""
    from benchmarks.runner import RunSpec, parse_backend, summarize
    from engine.flops import lora_params

    def predicted(spec: str, config: dict) -> dict:
        run = RunSpec(parse_backend(spec), "micro", 2, 0, 32, 2, 2, 1, "fp32", 60)
        raw = {"outcome": "ok", "exit_code": 0, "wall_s": 1.0, "config": config, "steps": []}
        return summarize(run, raw, {"kind": "cpu"})["estimate"]

    full = predicted("ddp", {"model": {"lora": None}})
    lora = predicted("ddp@model.lora.r=4", {"model": {"lora": {"r": 4, "quantize": None}}})
    assert full["lora_trainable"] is None and lora["lora_trainable"] == lora_params("micro", 4) > 0
    assert lora["row"] == full["row"] == "ddp" and lora["predicted_per_rank_mb"] < full["predicted_per_rank_mb"]


# ------------------------------------------------------------------------------------------------
# The bench end to end: real runs in subprocesses (1 process each, to stay fast)
# ------------------------------------------------------------------------------------------------
def test_bench_end_to_end_records_results_and_failures(tmp_path):
    """With the default options, from the user's own folder: the results land beside the bench's runs
    under runs/bench/<session>/, and the project's committed results are not touched."""
    committed = {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").rglob("*")}
    proc = run_engine(["bench", "--gpus", "0", "--nproc", "1", "--models", "micro", "--seq", "32",
                       "--micro-batch", "2", "--warmup", "1", "--steps", "2",
                       "--backends", "ddp,ddp@train.precision=fp8", "--baselines", "hand"], cwd=tmp_path, timeout=600)
    assert not (tmp_path / "benchmarks").exists()
    assert {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").rglob("*")} == committed
    [session] = (tmp_path / "runs" / "bench").iterdir()
    results_dir = session / "results" / "cpu-1proc"
    files = sorted(results_dir.glob("*.json"))
    assert len(files) == 3, proc.stderr
    results = {r["label"]: r for r in (json.loads(p.read_text()) for p in files)}

    ok = results["ddp"]
    assert ok["outcome"] == "ok", ok.get("message")
    assert ok["tokens_per_s"]["n"] == 2 and ok["tokens_per_s"]["median"] > 0   # warm-up step excluded
    assert ok["step_s"]["median"] > 0 and ok["samples_per_s"]["median"] > 0
    assert ok["device"]["kind"] == "cpu" and ok["software"]["torch"]
    assert ok["config"]["backend"]["name"] == "ddp" and ok["config"]["train"]["save_final"] is False
    rank0 = ok["memory"]["per_rank"][0]
    assert rank0["host_rss_mb"] > 0 and "host_rss_before_setup_mb" in rank0
    assert ok["estimate"]["row"] == "ddp" and ok["mfu"]["mfu"] is None  # no MFU without a device peak

    failed = results["ddp@train.precision=fp8"]  # refused by the config loader, no process started
    assert failed["outcome"] == "error" and failed["message"].startswith("train.precision must be one of")
    assert failed["wall_s"] == 0.0
    assert "tokens_per_s" not in failed

    hand = results["hand"]
    assert hand["outcome"] == "ok" and hand["system"] == "hand-loop" and hand["tokens_per_s"]["n"] == 2
    assert hand["optimizer"] == "torch.optim.AdamW"

    md = (results_dir / "RESULTS.md").read_text()
    assert "| ddp | ok |" in md and "| ddp@train.precision=fp8 | error |" in md and "x hand" in md
    assert "Estimate vs measured" in md
    assert (results_dir / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[1/3] micro ddp" in proc.stderr and "report:" in proc.stderr  # progress lines


@pytest.mark.fast
def test_rounds_pool_measured_steps_and_drop_each_rounds_warmup():
    from benchmarks.runner import RunSpec, merge_rounds, parse_backend, summarize

    run = RunSpec(parse_backend("ddp"), "micro", 2, 0, 32, 2, steps=2, warmup=1, precision="fp32", timeout=60)

    def raw(tps, t0):
        steps = [{"step": i + 1, "tokens_per_s": x, "samples_per_s": x / 32, "end": t0 + i} for i, x in enumerate(tps)]
        return {"outcome": "ok", "exit_code": 0, "wall_s": 10.0, "config": {}, "steps": steps,
                "memory_per_rank": [{"host_rss_mb": 500.0, "host_rss_before_setup_mb": 300.0},
                                    {"host_rss_mb": 520.0, "host_rss_before_setup_mb": 310.0}]}

    device = {"kind": "cpu", "cpu_model": "x", "cpu_cores": 2}
    r = summarize(run, merge_rounds([raw([1.0, 100.0, 300.0], 0.0), raw([2.0, 200.0, 400.0], 50.0)]), device)
    assert r["tokens_per_s"]["n"] == 4 and r["tokens_per_s"]["median"] == 250.0  # warm-up steps (1, 2) excluded
    assert r["round_median_tokens_per_s"] == [200.0, 300.0]
    assert r["wall_s"] == 20.0 and r["memory"]["max_over_ranks"]["host_rss_delta_mb"] == 210.0
    failed = dict(raw([1.0], 0.0), outcome="oom", message="out of GPU memory")
    assert merge_rounds([raw([1.0, 2.0, 3.0], 0.0), failed])["outcome"] == "oom"


@pytest.mark.fast
def test_report_takes_ratios_only_within_one_bench_session(tmp_path):
    """A folder holding two invocations' results (a user's --out reused) gets one table per session;
    the engine's `x Trainer` is against the Trainer of its own session, never the other's."""
    from benchmarks.report import markdown, load_results
    src = REPO / "benchmarks" / "results" / "cpu-2proc"
    for session, speed in (("S1", 1.0), ("S2", 0.5)):  # the second session ran on a machine half as fast
        for name in ("tiny__ddp__fp32_s128_b4.json", "tiny__trainer__fp32_s128_b4.json"):
            r = json.loads((src / name).read_text())
            r["session"] = session
            r["tokens_per_s"] = {k: v * speed for k, v in r["tokens_per_s"].items() if k != "n"} | {"n": 10}
            (tmp_path / f"{session}-{name}").write_text(json.dumps(r))
    md = markdown(load_results(tmp_path))
    ddp = json.loads((src / "tiny__ddp__fp32_s128_b4.json").read_text())["tokens_per_s"]["median"]
    trainer = json.loads((src / "tiny__trainer__fp32_s128_b4.json").read_text())["tokens_per_s"]["median"]
    assert md.count("session S1") == 1 and md.count("session S2") == 1
    ddp_rows = [line for line in md.splitlines() if line.startswith("| ddp | ok |")]
    x_trainer = [line.split(" | ")[6] for line in ddp_rows]  # run, outcome, tok/s, samples/s, step ms, wall, x Trainer
    assert x_trainer == [f"{ddp / trainer:.2f}"] * 2  # across sessions it would read 2x or 0.5x that


@pytest.mark.fast
def test_estimate_takes_the_model_a_user_has_a_folder_or_a_run(tmp_path):
    """A local HF folder, a run directory (its model/) and a LoRA run's adapters (their base) are
    estimated from their config.json: grouped-query attention and the gated MLP counted as built."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from engine.flops import param_counts
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=160, vocab_size=1000, max_position_embeddings=256)
    folder = tmp_path / "my-llama"
    config.save_pretrained(folder)
    run = tmp_path / "run"
    config.save_pretrained(run / "model")
    lora_run = tmp_path / "lora-run"
    (lora_run / "model").mkdir(parents=True)
    (lora_run / "model" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(folder)}))
    with torch.device("meta"):
        built = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    for source in (folder, run, lora_run):
        assert param_counts(str(source)).total == built
        text, code = _estimate(str(source), "--gpus", "1", "--host-memory", "1TB")
        assert code == 0 and text.startswith(f"{source}: 0.2M parameters") and "seq 256" in text, text
    text, code = _estimate(str(tmp_path / "nothing-here"), "--gpus", "1")
    assert code == 2 and "not a local HF folder or run directory" in text


@pytest.mark.fast
def test_recommend_ranks_by_the_committed_cpu_measurements(tmp_path):
    """On the committed 2-process CPU bench: the measured rows in the measured order (tokens/s of the
    one session), the file named; the row that failed there (Gemini needs CUDA) left out, with why;
    rows that bench did not run come after, estimated from its DDP row; the top line is the command."""
    from benchmarks.recommend import Excluded, format_choices, recommend
    folder = REPO / "benchmarks" / "results" / "cpu-2proc"
    left_out: list[Excluded] = []
    choices = recommend("tiny", 0, 1, 128, 4, "fp32", 0.0, 64 * 2**30, {"kind": "cpu"}, 2, [folder], left_out)
    results = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    measured = sorted(((r["tokens_per_s"]["median"], r["estimate"]["row"]) for r in results
                       if r["system"] == "engine" and r["outcome"] == "ok"), reverse=True)
    assert [(c.row, c.basis) for c in choices[:len(measured)]] == [(row, "measured") for _, row in measured]
    assert all(c.basis == "estimated" and "ddp's measured" in c.reason for c in choices[len(measured):])
    assert {c.row for c in choices[len(measured):]} >= {"fsdp:full", "fsdp:grad_op"}  # not in that bench
    assert [x.row for x in left_out] == ["colossal:gemini"] and "needs CUDA" in left_out[0].reason
    top = choices[0]
    assert top.tokens_per_s == measured[0][0] and "cpu-2proc/tiny__" in top.reason  # the file it rests on
    text = format_choices("tiny", choices, 0, 1, 2, left_out)
    assert text.splitlines()[0] == f"run: {top.command}" and "--gpus 0 --nproc 2" in top.command
    # through the CLI, the same first line
    result = CliRunner().invoke(main, ["recommend", "tiny", "--gpus", "0", "--nproc", "2", "--seq", "128",
                                       "--micro-batch", "4", "--results", str(folder), "--host-memory", "64GB"])
    assert result.exit_code == 0 and result.output.splitlines()[0] == f"run: {top.command}", result.output


@pytest.mark.fast
def test_recommend_without_measurements_models_communication_offload_and_host_memory():
    from benchmarks.recommend import recommend
    h100 = {"kind": "cuda", "gpu_name": "H100"}
    eight = {c.row: c for c in recommend("gpt2-xl", 8, 1, 1024, 1, "bf16", 80 * 2**30, 1024 * 2**30, h100, 8, [])}
    assert all(c.basis == "estimated" and "40% MFU" in c.reason for c in eight.values())
    # ZeRO-3 gathers parameters on top of DDP's all-reduce; offload pays PCIe and a CPU Adam step
    assert eight["ddp"].tokens_per_s > eight["deepspeed:zero3"].tokens_per_s > eight["deepspeed:zero3+offload"].tokens_per_s
    assert eight["deepspeed:zero2"].tokens_per_s == eight["ddp"].tokens_per_s  # the same traffic, modelled
    # GPT-J-6B on one 80 GB GPU: nothing fits with 128 GiB of host memory, offload rows with 256 GiB
    assert recommend("gpt-j-6B", 1, 1, 1024, 1, "bf16", 80 * 2**30, 128 * 2**30, h100, 1, []) == []
    big_host = recommend("gpt-j-6B", 1, 1, 1024, 1, "bf16", 80 * 2**30, 256 * 2**30, h100, 1, [])
    assert big_host and all("offload" in c.row for c in big_host)


@pytest.mark.fast
def test_estimate_largest_sweeps_the_published_sizes_per_backend():
    """One 80 GB GPU, seq 2048: replicated DDP tops out at GPT-Neo-2.7B; offload reaches Llama-3.1-8B
    only with the host memory it needs (512 GiB), not on a 128 GiB machine."""
    from engine.estimate import largest_models
    small = largest_models(1, 1, 2048, 1, "bf16", 80 * 2**30, 128 * 2**30)
    big = largest_models(1, 1, 2048, 1, "bf16", 80 * 2**30, 512 * 2**30)
    assert small["ddp"][0] == big["ddp"][0] == "gpt-neo-2.7B"
    assert big["deepspeed:zero3+offload"][0] == "llama-3.1-8b"
    assert small["deepspeed:zero3+offload"][1] < big["deepspeed:zero3+offload"][1]
    text, code = _estimate("--largest", "--gpus", "1", "--host-memory", "512GB")
    assert code == 0 and any(line.split()[:2] == ["deepspeed:zero3+offload", "llama-3.1-8b"]
                             for line in text.splitlines()), text
    assert _estimate("gpt2", "--largest")[1] == 2 and _estimate()[1] == 2


@pytest.mark.fast
def test_estimate_with_lora_counts_the_adapters_as_peft_builds_them_and_the_base_frozen():
    """--lora R: PEFT's own trainable count (GPT-2 r=8 on c_attn: 294,912, the figure PEFT prints; Llama
    on q_proj/v_proj: 3,407,872 for Llama-3.1-8B), gradients and AdamW for those only, the base as frozen
    weights: every row needs less memory than full fine-tuning, and Llama-3.1-8B fits one 80 GB GPU on DDP."""
    from engine.estimate import estimate
    from engine.flops import lora_params
    assert lora_params("gpt2", 8) == 294_912 and lora_params("llama-3.1-8b", 8) == 3_407_872
    full = {e.backend: e for e in estimate("llama-3.1-8b", 1, seq=2048, host_memory=128 * 2**30)}
    lora = {e.backend: e for e in estimate("llama-3.1-8b", 1, seq=2048, host_memory=128 * 2**30,
                                           lora_trainable=lora_params("llama-3.1-8b", 8))}
    # device + host: offload rows keep the same base on the device either way, but offload only the adapters
    assert all(lora[k].model_states + lora[k].host_per_node < full[k].model_states + full[k].host_per_node
               for k in full)
    ddp = lora["ddp"]
    assert ddp.optim == 8 * 3_407_872 and ddp.grads == 4 * 3_407_872   # AdamW and grads: the adapters only
    assert ddp.params == 4 * 3_407_872 + 4 * 8_030_261_248 + 2 * 8_030_261_248  # + fp32 base and autocast copies
    assert not full["ddp"].fits_full and ddp.fits_full
    text, code = _estimate("llama-3.1-8b", "--gpus", "1", "--seq", "2048", "--lora", "8", "--host-memory", "128GB")
    assert code == 0 and "LoRA r=8: 3,407,872 trainable parameters" in text and "Failed to load" not in text, text


@pytest.mark.fast
def test_estimate_of_qlora_lists_the_backends_that_keep_a_4bit_base():
    """--quantize nf4 with --lora: Llama-3.1-8B's linear weights (all but the head) in 4 bits, the
    rest fp32 as loaded with autocast's bf16 copies; only the rows whose backend keeps bitsandbytes'
    layers (ddp); without --lora it is an error in one line."""
    from engine.estimate import QUANT_BYTES_PER_WEIGHT, estimate
    from engine.flops import lora_params, param_counts, quantized_params
    q, layers = quantized_params("llama-3.1-8b")
    P = param_counts("llama-3.1-8b").total
    assert layers == 32 * 7 and q == P - 2 * 128256 * 4096 - (2 * 32 + 1) * 4096  # embed, head, norms stay
    lora = lora_params("llama-3.1-8b", 8)
    (ddp,) = estimate("llama-3.1-8b", 1, seq=2048, lora_trainable=lora, quantized=True)
    assert ddp.backend == "ddp" and ddp.source == "formula+qlora"
    assert ddp.params == pytest.approx(4 * lora + QUANT_BYTES_PER_WEIGHT * q + 6 * (P - q), abs=2**20)
    with pytest.raises(ValueError, match="no 4-bit \\(QLoRA\\) base on deepspeed:zero3; rows that keep one: ddp"):
        estimate("llama-3.1-8b", 1, lora_trainable=lora, quantized=True, rows=["deepspeed:zero3"])
    text, code = _estimate("llama-3.1-8b", "--gpus", "1", "--seq", "2048", "--lora", "8", "--quantize", "nf4")
    assert code == 0 and [line.split()[0] for line in text.splitlines()[3:4]] == ["ddp"], text
    assert "linear weights in 4 bits (nf4: 3.35 GiB" in text, text
    text, code = _estimate("llama-3.1-8b", "--quantize", "nf4")
    assert code != 0 and "error: --quantize nf4 (QLoRA) trains LoRA adapters over the 4-bit base: add --lora R" in text
