"""Markdown table + PNG chart + estimate-vs-measured from a directory of `engine bench` result JSONs.

    python -m benchmarks.report benchmarks/results/cpu-2proc
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

REPORT = "RESULTS.md"
CHART = "chart.png"


def load_results(directory: Path) -> list[dict]:
    out = []
    for p in sorted(Path(directory).glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except ValueError:
            continue
        if isinstance(r, dict) and r.get("schema") and "label" in r:
            out.append(r)
    return out


def group_key(r: dict) -> tuple:
    """One table per bench invocation (session) and job: ratios to the Trainer and the hand loop are
    only ever taken between runs of one invocation, never across a folder's older results."""
    return (r["model"], r["procs"], r["precision"], r["seq"], r["micro_batch"], r.get("session", ""))


def _plain(r: dict) -> bool:
    """No overrides besides `model.config.*` and `model.name_or_path`: those set the architecture and the
    initial weights, which every row of such a run shares (e.g. dropout off and one saved random init in
    benchmarks/gpu), so the row still is the plain reference."""
    return not [k for k in r.get("overrides") or {} if not k.startswith("model.config.") and k != "model.name_or_path"]


def _baseline(rows: list[dict], system: str) -> dict | None:
    ok = [r for r in rows if r["system"] == system and r["outcome"] == "ok" and _plain(r)]
    return ok[0] if ok else None


def _mb(v) -> str:
    return "" if v is None else f"{v:,.0f}"


def _ratio(a: dict, b: dict | None) -> str:
    if b is None or a["outcome"] != "ok" or a is b:
        return ""
    return f"{a['tokens_per_s']['median'] / b['tokens_per_s']['median']:.2f}"


def _order(r: dict) -> tuple:
    """Engine runs first, backends in registry order, then the HF Trainer and the hand loop."""
    from backends.base import backend_names
    names = backend_names()
    backend = names.index(r["backend"]) if r.get("backend") in names else len(names)
    return ({"engine": 0, "hf-trainer": 1, "hand-loop": 2}[r["system"]], backend, r["label"])


def _reference(rows: list[dict], key: str) -> dict | None:
    """The run the estimate-vs-measured deltas are taken against: the engine run whose spec is the
    replicated estimate row's own name (plain DDP, no modifiers or overrides)."""
    return next((r for r in rows if r["system"] == "engine" and r["label"].split("@")[0] == key and _plain(r)),
                None)


def measured_peak_mb(r: dict) -> tuple[float | None, str]:
    """The measured figure an estimate is compared with: GPU allocated peak on CUDA, else what the
    host RSS grew by from just before the model was built (model states + activations + temporaries)."""
    mem = r.get("memory", {}).get("max_over_ranks", {})
    if "gpu_alloc_mb" in mem:
        return mem["gpu_alloc_mb"], "GPU allocated peak"
    return mem.get("host_rss_delta_mb"), "host RSS growth from model build to end of training"


def _predicted_mb(r: dict) -> float:
    """On CPU everything is host memory: device share + offloaded share per rank; on GPUs the device part."""
    e = r["estimate"]
    if r["device"]["kind"] == "cpu":
        return e["predicted_per_rank_mb"]
    return (e["total_ckpt"] if e["gradient_checkpointing"] else e["total_full"]) / 2**20


def markdown(results: list[dict]) -> str:
    if not results:
        return "No results.\n"
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[group_key(r)].append(r)
    first = results[0]
    dev = first["device"]
    device = (f"{dev.get('gpu_count', 1)} x {dev['gpu_name']} ({dev.get('gpu_memory_gb')} GB)" if dev["kind"] == "cuda"
              else f"CPU: {dev['cpu_model']}, {dev['cpu_cores']} cores, no GPU")
    sw = first["software"]
    sessions = sorted({r.get("session", "") for r in results})
    loads = [r.get("load_average", {}).get("before", [None])[0] for r in results]
    loads = [x for x in loads if x is not None]
    lines = [f"# Benchmark results: {device}", "",
             f"Software: " + ", ".join(f"{k} {v}" for k, v in sw.items() if v) + ".",
             f"Sessions: {', '.join(sessions)}. Load average (1 min) when runs started: "
             + (f"{min(loads):.1f} to {max(loads):.1f}" if loads else "n/a")
             + (f" on {dev['cpu_cores']} cores" if dev["kind"] == "cpu" else "") + ".", "",
             "tok/s = tokens per second over all ranks, median over the measured steps (warm-up excluded), "
             "p10-p90 beside it; each step timed between device synchronisations. wall tok/s = measured steps "
             "/ wall time between their ends (adds logging and data loading between steps). "
             "x Trainer / x hand = engine tok/s divided by the HF Trainer's / the hand loop's in the same table. "
             "Memory is the peak over ranks: GPU allocated/reserved (torch caching allocator) and host RSS; "
             "RSS growth = peak RSS minus RSS just before the model was built. MFU = achieved model TFLOP/s per "
             "device (6N + 12 L d s FLOPs per token) / the device's dense peak (both stated).", ""]
    for key in sorted(groups):
        rows = sorted(groups[key], key=_order)
        model, procs, precision, seq, mb, session = key
        trainer, hand = _baseline(rows, "hf-trainer"), _baseline(rows, "hand-loop")
        lines += [f"## {model} ({rows[0]['params'] / 1e6:,.1f}M params), {procs} process{'es' if procs > 1 else ''}, "
                  f"{precision}, seq {seq}, micro-batch {mb} per rank (global {rows[0]['global_batch']})"
                  + (f", session {session}" if len(sessions) > 1 else ""), "",
                  "| run | outcome | tok/s median (p10-p90) | samples/s | step ms | wall tok/s | x Trainer | x hand "
                  "| MFU (achieved / peak TFLOP/s) | GPU alloc / reserved MiB | host RSS MiB | RSS growth MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            mem = r.get("memory", {}).get("max_over_ranks", {})
            if r["outcome"] == "ok":
                t = r["tokens_per_s"]
                m = r.get("mfu", {})
                mfu = (f"{m['mfu']:.1%} ({m['achieved_tflops_per_device']:.1f} / {m['peak_tflops_per_device']:.0f})"
                       if m.get("mfu") else f"n/a ({m.get('achieved_tflops_per_device', 0) * 1000:.1f} GFLOP/s, no peak)")
                wall = r.get("wall_tokens_per_s")
                cells = [f"{t['median']:,.0f} ({t['p10']:,.0f}-{t['p90']:,.0f})",
                         f"{r['samples_per_s']['median']:,.2f}", f"{r['step_s']['median'] * 1000:,.0f}",
                         f"{wall:,.0f}" if wall else "", _ratio(r, trainer), _ratio(r, hand), mfu]
            else:
                msg = r["message"].replace("|", "/")[:160]
                cells = [msg, "", "", "", "", "", ""]
            gpu = (f"{_mb(mem.get('gpu_alloc_mb'))} / {_mb(mem.get('gpu_reserved_mb'))}"
                   if "gpu_alloc_mb" in mem else "")
            lines.append(f"| {r['label']} | {r['outcome']} | " + " | ".join(cells)
                         + f" | {gpu} | {_mb(mem.get('host_rss_mb'))} | {_mb(mem.get('host_rss_delta_mb'))} |")
        lines.append("")
        est_rows = [r for r in rows if r["outcome"] == "ok" and r.get("estimate")]
        if est_rows:
            what = measured_peak_mb(est_rows[0])[1]
            from engine.estimate import replicated_row
            refname = replicated_row().key
            ref = _reference(est_rows, refname)
            ref_pred = _predicted_mb(ref) if ref else None
            ref_meas = measured_peak_mb(ref)[0] if ref else None
            lines += [f"Estimate vs measured (per rank; measured = {what}; estimate row = the `engine estimate` "
                      f"row used). The last two columns difference each run against {refname}'s, which cancels "
                      "what every process pays whatever the backend (lazily imported code, allocator arenas):", "",
                      "| run | estimate row | params+grads+optim+buffers MiB | activations MiB | offloaded (host) MiB "
                      f"| predicted MiB | measured MiB | measured / predicted | predicted - {refname} "
                      f"| measured - {refname} |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in est_rows:
                e = r["estimate"]
                measured, _ = measured_peak_mb(r)
                act = e["act_ckpt"] if e["gradient_checkpointing"] else e["act_full"]
                pred = _predicted_mb(r)
                dp = f"{pred - ref_pred:+,.1f}" if ref_pred is not None else ""
                dm = f"{measured - ref_meas:+,.0f}" if ref_meas is not None and measured is not None else ""
                lines.append(f"| {r['label']} | {e['row']} | {e['model_states'] / 2**20:,.1f} | {act / 2**20:,.1f} | "
                             f"{e['host_per_node'] / 2**20:,.1f} | {pred:,.1f} | {_mb(measured)} | "
                             + (f"{measured / pred:.2f}" if measured and pred else "") + f" | {dp} | {dm} |")
            lines.append("")
    return "\n".join(lines)


def chart(results: list[dict], path: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[group_key(r)].append(r)
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 2, figsize=(14, 0.45 * max(len(g) for g in groups.values()) * len(groups)
                                                      + 2.5 * len(groups)), squeeze=False)
    for (key, rows), (ax_t, ax_m) in zip(sorted(groups.items()), axes):
        rows = sorted(rows, key=_order)
        labels = [r["label"] for r in rows]
        ypos = range(len(rows))
        colors = [{"engine": "tab:blue", "hf-trainer": "tab:orange", "hand-loop": "tab:green"}[r["system"]]
                  for r in rows]
        tps = [r["tokens_per_s"]["median"] if r["outcome"] == "ok" else 0 for r in rows]
        err = [[(t - r["tokens_per_s"]["p10"]) if r["outcome"] == "ok" else 0 for t, r in zip(tps, rows)],
               [(r["tokens_per_s"]["p90"] - t) if r["outcome"] == "ok" else 0 for t, r in zip(tps, rows)]]
        ax_t.barh(list(ypos), tps, xerr=err, color=colors)
        for y, r in zip(ypos, rows):
            if r["outcome"] != "ok":
                ax_t.text(0, y, f" {r['outcome']}", va="center", color="red")
        ax_t.set_yticks(list(ypos), labels)
        ax_t.invert_yaxis()
        ax_t.set_xlabel("tokens/s (median, p10-p90 bars)")
        from matplotlib.patches import Patch
        ax_t.legend(handles=[Patch(color="tab:blue", label="engine"), Patch(color="tab:orange", label="HF Trainer"),
                             Patch(color="tab:green", label="hand loop")], loc="best", fontsize=8, framealpha=0.9)
        model, procs, precision, seq, mb, session = key
        ax_t.set_title(f"{model}, {procs} proc, {precision}, seq {seq}, micro-batch {mb}, {session}")
        gpu = any("gpu_alloc_mb" in r.get("memory", {}).get("max_over_ranks", {}) for r in rows)
        mems = []
        for r in rows:
            m = r.get("memory", {}).get("max_over_ranks", {})
            mems.append(m.get("gpu_alloc_mb" if gpu else "host_rss_delta_mb") or 0)
        ax_m.barh(list(ypos), mems, color=colors)
        if not gpu:
            ax_m.barh(list(ypos), [r.get("memory", {}).get("max_over_ranks", {}).get("host_rss_mb", 0) for r in rows],
                      color="none", edgecolor="gray", linestyle="--")
        ax_m.set_yticks(list(ypos), [""] * len(rows))
        ax_m.invert_yaxis()
        ax_m.set_xlabel("peak GPU allocated per rank, MiB" if gpu else
                        "per-rank peak host RSS growth, MiB (dashed: whole peak RSS)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(directory: Path) -> list[Path]:
    directory = Path(directory)
    results = load_results(directory)
    md = directory / REPORT
    md.write_text(markdown(results) + f"\n![throughput and memory]({CHART})\n")
    png = chart(results, directory / CHART)
    return [md] + ([png] if png else [])


if __name__ == "__main__":
    for p in write_report(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")):
        print(p)
