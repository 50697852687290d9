"""benchmarks/gpu/driver.py's plan, `next` and row logging, in-process (no GPU, no process started)."""
from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

DRIVER = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "driver.py"


@pytest.fixture(scope="module")
def driver():
    spec = importlib.util.spec_from_file_location("gpu_driver", DRIVER)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_driver"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def args(tmp_path, cpu=False, **kw) -> Namespace:
    base = dict(cpu=cpu, nproc=1, jobs=4, work=tmp_path / "work", resume_all=False, negative_control=True,
                compile=False, budget_s=450.0, estimate_from=[])
    return Namespace(**{**base, **kw})


def rows_of(part):
    return [(r.section, r.name, r.model) for b in part.benches for r in b.rows]


@pytest.mark.fast
def test_headline_plan_order_and_contents(driver, tmp_path):
    p = driver.headline_part(args(tmp_path), extras=[])
    kinds = [type(s).__name__ for s in p.steps]
    # the initial weights, (a)+(b) in one bench, (c), (d); Gemini and its build went to the `gemini` part
    assert kinds == ["InitWeights", "Bench", "Bench", "EstimateStep"]
    assert rows_of(p) == [
        ("a", "engine ddp", "gpt2"), ("a", "HF Trainer (its defaults)", "gpt2"), ("a", "hand-written loop", "gpt2"),
        ("b", "deepspeed:zero2", "gpt2"), ("b", "deepspeed:zero3", "gpt2"),
        ("b", "colossal:low_level_zero (zero2)", "gpt2"), ("c", "engine ddp", "gpt2-xl")]
    init, first = p.steps[0], p.steps[1]
    argv = first.argv
    # every engine row of (a)+(b) starts from the one saved random init (ZeRO-3 builds its own otherwise)
    engine_rows = [r for r in first.rows if r.spec.split("@")[0] not in ("trainer", "hand")]
    assert all(f"@model.name_or_path={init.out_dir}@" in r.spec for r in engine_rows)
    assert init.model == "gpt2" and init.argv()[-2:] == ["gpt2", str(init.out_dir)]
    # one bench for (a) and (b): specs in --backends keep their order (baselines included), bf16, seq 1024, mb 16
    assert argv[argv.index("--baselines") + 1] == ""
    assert [s.split("@")[0] for s in argv[argv.index("--backends") + 1].split(",")] == [
        "ddp", "trainer", "hand", "deepspeed:zero2", "deepspeed:zero3", "colossal:zero2"]
    assert all("@model.config.resid_pdrop=0.0" in r.spec for b in p.benches for r in b.rows)  # dropout off everywhere
    for flag, value in [("--models", "gpt2"), ("--precision", "bf16"), ("--seq", "1024"), ("--micro-batch", "16"),
                        ("--gpus", "1")]:
        assert argv[argv.index(flag) + 1] == value
    assert p.steps[2].argv[p.steps[2].argv.index("--models") + 1] == "gpt2-xl"
    # no offload anywhere, no JIT build
    assert not any("offload" in r.spec for b in p.benches for r in b.rows)
    assert not any(type(s).__name__ == "Build" for s in p.steps)
    assert [r.name for r in first.rows if r.compare] == ["deepspeed:zero2", "deepspeed:zero3",
                                                        "colossal:low_level_zero (zero2)"]


@pytest.mark.fast
def test_headline_picks_up_the_fsdp_row_and_gemini_and_lora_have_their_parts(driver, tmp_path):
    p = driver.headline_part(args(tmp_path), extras=[("fsdp", "fsdp", True)])
    b = [r for r in p.steps[1].rows if r.section == "b"]
    assert (b[-1].name, b[-1].spec.split("@model.name_or_path")[0], b[-1].compare) == ("fsdp", "fsdp", True)
    assert rows_of(p)[-1] == ("c", "engine ddp", "gpt2-xl")  # still before (c)
    # Gemini: its build first, then the headline's gpt2 row against a ddp reference from one init, then gpt2-xl
    g = driver.build("gemini", args(tmp_path))
    assert [type(s).__name__ for s in g.steps] == ["Build", "InitWeights", "Bench", "Bench"]
    gpt2 = g.steps[2].rows
    assert [(r.name, r.compare) for r in gpt2] == [("engine ddp", False), ("colossal:gemini", True)]
    assert all(f"@model.name_or_path={g.steps[1].out_dir}@" in r.spec for r in gpt2)
    assert g.steps[2].needs == "colossalai-kernels"
    # LoRA: in matrix-gpt2 (not compared: it trains other parameters); gpt-neo Gemini in largest-neo, after its build
    m = driver.build("matrix-gpt2", args(tmp_path))
    assert [(r.name, r.spec.split("@")[:2], r.compare) for r in m.steps[0].rows][-1] == (
        "ddp + LoRA", ["ddp", "model.lora.r=8"], False)
    n = driver.build("largest-neo", args(tmp_path))
    assert [type(s).__name__ for s in n.steps] == ["Bench", "Build", "Bench"]
    assert n.steps[2].rows[0].name == "colossal:gemini+gc"


@pytest.mark.fast
def test_families_lora_part_measures_full_and_lora_on_a_llama(driver, tmp_path):
    """Issue 21's GPU proof: Llama-3.2-1B full vs LoRA on DDP and ZeRO-3 in one bench (ZeRO-3's full
    run compared with ddp's losses; LoRA rows not: they train other parameters), LoRA on FSDP2, then
    `engine estimate` against each peak; llama-tiny on CPU; `next` takes it right after the smokes."""
    p = driver.build("families-lora", args(tmp_path))
    assert [type(s).__name__ for s in p.steps] == ["InitWeights", "Bench", "EstimateStep"]
    init, rows = p.steps[0], p.steps[1].rows
    same = f"@model.name_or_path={init.out_dir}"  # one saved init: ZeRO-3 would build its own
    assert [(r.name, r.spec, r.compare) for r in rows] == [
        ("ddp", "ddp" + same, False), ("ddp + LoRA", f"ddp{same}@model.lora.r=8", False),
        ("deepspeed:zero3", "deepspeed:zero3" + same, True),
        ("deepspeed:zero3 + LoRA", f"deepspeed:zero3{same}@model.lora.r=8", False),
        ("fsdp + LoRA", f"fsdp{same}@model.lora.r=8", False)]  # Llama's config has no *_pdrop keys to zero
    argv = p.steps[1].argv
    assert [argv[argv.index(f) + 1] for f in ("--models", "--micro-batch", "--precision")] == [
        "llama-3.2-1b", "4", "bf16"]
    assert {r.model for r in driver.build("families-lora", args(tmp_path, cpu=True)).steps[1].rows} == {"llama-tiny"}
    order = driver.NEXT_ORDER
    assert order.index("families-lora") == order.index("smoke-fp16") + 1


@pytest.mark.fast
def test_extra_rows_follow_the_registry(driver, monkeypatch):
    import backends.base as base
    rows, notes = driver.extra_rows()
    assert ("fsdp" in base.backend_names()) == any(name == "fsdp" for name, _, _ in rows)
    monkeypatch.setattr(base, "backend_names", lambda: ("ddp", "deepspeed", "colossal", "fsdp"))
    monkeypatch.setattr(base, "backend_class", lambda name: type("FSDP", (), {"bench_defaults": ("fsdp:full",)}))
    rows, _ = driver.extra_rows()
    assert ("fsdp", "fsdp:full", True) in rows


@pytest.mark.fast
def test_headline_estimate_fits_one_call(driver, tmp_path):
    p = driver.headline_part(args(tmp_path), extras=[])
    items = driver.part_estimate(p)
    total = sum(s for _, s in items)
    assert total <= driver.CALL_LIMIT_S == 480
    assert total <= driver.BUDGET_S  # the runtime budget would not skip the last row
    names = [w for w, _ in items]
    assert names[0].startswith("wheel install")
    # with the fsdp row, still inside one call (measured on the H200: with Gemini and LoRA it took 10 minutes)
    more = driver.headline_part(args(tmp_path), extras=[("fsdp", "fsdp", True)])
    assert sum(s for _, s in driver.part_estimate(more)) <= driver.CALL_LIMIT_S
    # every part `next` may pick fits one call too
    for name in driver.NEXT_ORDER:
        part = driver.build(name, args(tmp_path))
        assert sum(s for _, s in driver.part_estimate(part)) <= driver.CALL_LIMIT_S, name


@pytest.mark.fast
def test_plan_fails_loudly_over_the_limit(driver, tmp_path, capsys, monkeypatch):
    a = args(tmp_path)
    assert driver.print_plan([driver.headline_part(a, extras=[])], a)
    monkeypatch.setitem(driver.EST, "trainer", 400)
    assert not driver.print_plan([driver.headline_part(a, extras=[])], a)
    assert "OVER ONE CALL'S LIMIT" in capsys.readouterr().out


@pytest.mark.fast
def test_cpu_headline_uses_tiny_sizes(driver, tmp_path):
    p = driver.headline_part(args(tmp_path, cpu=True), extras=[])
    argv = p.steps[1].argv
    assert argv[argv.index("--gpus") + 1] == "0" and argv[argv.index("--precision") + 1] == "fp32"
    assert {r.model for b in p.benches for r in b.rows} == {"micro", "tiny"}
    assert all(r.on_cpu for b in p.benches for r in b.rows)


@pytest.mark.fast
def test_next_picks_the_first_missing_part(driver, tmp_path):
    res = tmp_path / "h100-80gb-hbm3-x1"
    assert driver.next_part(res) == "headline"  # no folder yet
    res.mkdir()
    (res / "headline.jsonl").write_text("{}\n")  # a call cut short: rows but no headline.json
    (res / "headline.md").write_text("")
    assert driver.next_part(res) == "headline"
    (res / "headline.json").write_text("{}")
    assert driver.next_part(res) == "profile"
    for name in driver.NEXT_ORDER[1:4]:
        (res / f"{name}.json").write_text("{}")
    assert driver.next_part(res) == driver.NEXT_ORDER[4]
    (res / "smoke-fp16.json").unlink()  # a removed record comes again, before later parts
    assert driver.next_part(res) == "smoke-fp16"
    for name in driver.NEXT_ORDER:
        (res / f"{name}.json").write_text("{}")
    assert driver.next_part(res) is None


@pytest.mark.fast
def test_next_skips_parts_another_gpu_finished(driver, tmp_path):
    """A grant is short: a part done on the H200 is not redone on an H100. The CPU rehearsal's folder
    does not count, and a folder without a headline is no GPU proof."""
    (tmp_path / "h200-x1").mkdir()
    for name in ("headline", "profile", "smoke-bf16"):
        (tmp_path / "h200-x1" / f"{name}.json").write_text("{}")
    (tmp_path / "cpu-1proc").mkdir()
    for name in driver.NEXT_ORDER[:5]:
        (tmp_path / "cpu-1proc" / f"{name}.json").write_text("{}")
    (tmp_path / "memory").mkdir()
    dirs = driver.gpu_result_dirs(tmp_path, "h100-80gb-hbm3-x1")
    assert dirs == [tmp_path / "h100-80gb-hbm3-x1", tmp_path / "h200-x1"]
    assert driver.next_part(dirs) == "smoke-fp16"
    (tmp_path / "h100-80gb-hbm3-x1").mkdir()
    (tmp_path / "h100-80gb-hbm3-x1" / "smoke-fp16.json").write_text("{}")
    assert driver.next_part(driver.gpu_result_dirs(tmp_path, "h100-80gb-hbm3-x1")) == "families-lora"


@pytest.mark.fast
def test_next_order_starts_with_the_headline_and_names_known_parts(driver):
    assert driver.NEXT_ORDER[:4] == ["headline", "profile", "smoke-bf16", "smoke-fp16"]
    assert set(driver.NEXT_ORDER) <= driver.KNOWN
    assert driver.expand(["all"])[:len(driver.NEXT_ORDER)] == driver.NEXT_ORDER


@pytest.mark.fast
def test_row_log_writes_each_row_at_once(driver, tmp_path):
    p = driver.headline_part(args(tmp_path), extras=[])
    device = {"gpu_name": "NVIDIA H100 80GB HBM3", "slug": "h100-80gb-hbm3-x1"}
    slug_dir = tmp_path / "out" / device["slug"]
    log = driver.RowLog(slug_dir, p, device, "2026-11-27 10:00:00", 0.0)
    jsonl, md = slug_dir / "headline.jsonl", slug_dir / "headline.md"
    assert jsonl.read_text() == ""
    ddp_bench = {"name": "gpt2__ddp", "label": p.steps[1].rows[0].spec, "model": "gpt2", "outcome": "ok",
                 "tokens_per_s": {"median": 200000.0, "p10": 190000.0, "p90": 210000.0},
                 "memory": {"max_over_ranks": {"gpu_alloc_mb": 18000.0, "gpu_reserved_mb": 20000.0}},
                 "losses": {"1": 10.9, "2": 10.5, "3": 10.1}, "wall_s": 21.0, "seq": 1024, "micro_batch": 16, "precision": "bf16"}
    log.add({"kind": "run", **driver.bench_row(p.steps[1].rows[0], ddp_bench, None, 0.02)})
    # on disk the moment it is added: one JSON line, and the Markdown shows it with what is still to come
    lines = jsonl.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["tokens_per_s"] == 200000.0
    text = md.read_text()
    assert "engine ddp" in text and "200,000" in text and "17.58" in text  # 18000 MiB in GiB
    assert "not measured yet" in text and "a: gpt2 HF Trainer (its defaults)" in text
    assert (slug_dir / "RESULTS.md").exists()

    zero2 = dict(ddp_bench, name="gpt2__zero2", label=p.steps[1].rows[3].spec, losses={"1": 10.9, "2": 10.52, "3": 10.3},
                 tokens_per_s={"median": 180000.0, "p10": 1.0, "p90": 2.0})
    row = log.add({"kind": "run", **driver.bench_row(p.steps[1].rows[3], zero2, ddp_bench, 0.02)})
    assert row["vs_ddp"] == pytest.approx(0.2 / 10.1)  # the largest per-step relative difference
    assert len(jsonl.read_text().splitlines()) == 2
    text = md.read_text()
    assert "deepspeed:zero2" in text and "0.90" in text and "**>** 0.02" not in text  # 180k / 200k, within tol
    far = dict(zero2, name="gpt2__zero3", label=p.steps[1].rows[4].spec, losses={"1": 10.9, "2": 11.5, "3": 12.0})
    log.add({"kind": "run", **driver.bench_row(p.steps[1].rows[4], far, ddp_bench, 0.02)})
    assert "**>** 0.02" in md.read_text()
    # a row logging every 5th step is compared at the steps both have
    sparse = dict(zero2, name="gpt2__log5", label=p.steps[1].rows[3].spec, losses={"3": 10.1})
    assert driver.bench_row(p.steps[1].rows[3], sparse, ddp_bench, 0.02)["vs_ddp"] == 0.0


@pytest.mark.fast
def test_chain_schedule_and_smoke_chains(driver, tmp_path):
    assert driver.chain_schedule([100, 40, 40, 40], 2) == 120
    p = driver.smoke_part("smoke-bf16", "bf16", args(tmp_path))
    chains = driver.smoke_chains(p)
    heads = [c[0] for c in chains[:2]]
    assert [type(h).__name__ for h in heads] == ["Build", "Build"]
    gemini = next(c for c in chains if c[0].name == "colossalai-kernels")
    assert {l.label for l in gemini[1:]} == {"colossal:gemini"}
    assert [l.role for l in gemini[1:]] == ["main", "resume-1", "resume-2"]


@pytest.mark.fast
def test_estimate_rows_from_measured_runs(driver, tmp_path):
    """(d): each measured peak against its backend's `engine estimate` row (answers cached: no process)."""
    bench = {"name": "gpt2__z2", "label": "deepspeed:zero2@model.config.resid_pdrop=0.0", "model": "gpt2",
             "outcome": "ok", "gpus": 1, "seq": 1024, "micro_batch": 16, "precision": "bf16",
             "estimate": {"row": "deepspeed:zero2"}, "memory": {"max_over_ranks": {"gpu_alloc_mb": 18000.0}}}
    gc = dict(bench, name="gpt2__ddpgc", label="ddp+gc", estimate={"row": "ddp"})
    failed = dict(bench, name="gpt2__x", outcome="oom")
    (tmp_path / "headline.json").write_text(json.dumps({"part": "headline", "kind": "bench",
                                                        "runs": [bench, gc, failed]}))
    measured = driver.collect_measured(tmp_path)
    assert [(m["label"].split("@")[0], m["row"], m["gc"]) for m in measured] == [
        ("deepspeed:zero2", "deepspeed:zero2", False), ("ddp+gc", "ddp", True)]
    cache = {("gpt2", 1, 1024, 16, "bf16", None): {"command": "estimate gpt2", "rows": [
        {"backend": "deepspeed:zero2", "total_full": 19000 * 2**20, "total_ckpt": 1},
        {"backend": "ddp", "total_full": 1, "total_ckpt": 9000 * 2**20}]}}
    rows, checks = driver.estimate_measured(measured, {}, cache)
    assert rows[0]["predicted_mib"] == pytest.approx(19000) and checks[0]["pass"]   # +5.6%
    assert rows[1]["predicted_mib"] == pytest.approx(9000) and not checks[1]["pass"]  # checkpointed row, -50%


@pytest.mark.fast
def test_estimate_is_within_target_of_every_peak_measured_on_the_h200(driver):
    """engine/estimate.py's activation constants were fitted to the first H200 headline (GPT-2 at 16 x
    1024 and GPT-2-XL at 8 x 1024, bf16): every measured peak allocated on the H200 (the headline's
    engine rows and baselines, the profile part's, every smoke-bf16 backend) is predicted within the
    driver's target (15%). The old constants (Korthikanti's 34 bytes per s*b*h per layer) were 12-32%
    under."""
    from engine.estimate import estimate
    from engine.flops import lora_params

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "h200-x1"
    # eager runs: torch.compile's fused graph keeps 43% less (13.0 GiB vs 22.8 on the profile part),
    # which the estimator does not model (info only: it over-estimates, the safe side). The smoke
    # parts' 19M-parameter model measures the fixed buffers: DeepSpeed ZeRO 1-3's whole reduce bucket
    # (954 MiB in bf16; without it those rows were 60-80% under) and torch_ddp's DDP buckets on one rank.
    every = driver.collect_measured(folder)
    measured = [m for m in every if not m["info_only"]]
    assert [m["label"].split("@")[0] for m in every if m["info_only"]] == ["ddp"]  # the compiled row
    assert {m["row"] for m in measured} >= {"ddp", "deepspeed:zero0", "deepspeed:zero1", "deepspeed:zero2",
                                            "deepspeed:zero3", "deepspeed:zero2+offload", "deepspeed:zero3+offload",
                                            "colossal:torch_ddp", "colossal:zero2", "colossal:gemini", "fsdp:full"}
    assert {m["model"] for m in measured} == {"gpt2", "gpt2-xl", "gpt2:L=6,d=512,h=8,V=579,ctx=256"}
    for m in measured:
        lora = lora_params(m["model"], int(m["lora"])) if m.get("lora") else None
        [e] = estimate(m["model"], 1, seq=m["seq"], micro_batch=m["micro_batch"], precision=m["precision"],
                       rows=[m["row"]], lora_trainable=lora)
        error = e.total_full / 2**20 / m["gpu_alloc_mb"] - 1
        assert abs(error) <= driver.ESTIMATE_TARGET, (m["label"], m["row"], f"{error:+.1%}")


@pytest.mark.fast
def test_profile_part_profiles_a_measured_step_and_brings_the_tables_back(driver, tmp_path):
    p = driver.build("profile", args(tmp_path))
    specs = [r.spec.split("@model.config")[0] for b in p.benches for r in b.rows]
    assert specs == ["ddp@train.profile_step=5", "deepspeed:zero3@train.profile_step=5", "ddp@train.compile=true",
                     "ddp@train.profile_step=5"]
    assert driver.PROFILE_STEP > driver.HEADLINE_SMALL.warmup  # a measured step, not a warm-up one
    # rank 0's summary of each run (not the traces, which also end in .json), named by its run directory
    folder = tmp_path / "runs" / "gpt2" / "20261127T000000Z" / "gpt2__ddp-x" / "run" / "profile"
    folder.mkdir(parents=True)
    summary = {"step": 5, "wall_s": 0.2, "device": "cuda:0", "time": "device", "total_self_ms": 150.0,
               "ops": [{"name": "aten::mm", "self_ms": 90.0, "share": 0.6, "calls": 100}]}
    (folder / "step-5.json").write_text(json.dumps(summary))
    (folder / "step-5-rank0.trace.json").write_text('{"traceEvents": []}')
    [got] = driver.collect_profiles(tmp_path / "runs")
    assert got["run"] == "gpt2__ddp-x" and got["ops"][0]["name"] == "aten::mm"
    md = "\n".join(driver.profiles_md([got]))
    assert "### profile: gpt2__ddp-x, step 5 (200 ms" in md and "| `aten::mm` | 90.00 | 60.0% | 100 |" in md
