"""Run several training scenarios inside ONE launched multi-process job.

Importing torch + transformers costs 5-18 s per process on the CI machines, so parity tests
launch this once under torchrun (`python -m torch.distributed.run --nproc_per_node 2
tests/drivers/run_many.py SCENARIOS.json`) instead of launching one job per scenario.
SCENARIOS.json is a list of resolved config dicts (each with its own output_dir); each runs
through the real per-rank entry point, engine.worker.run, on the same process group.

Before each scenario rank 0 writes `[run_many] scenario OUTPUT_DIR` to stderr, so a test can
find the log lines of one scenario in the job's stderr (see scenario_log below).
"""
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


MARKER = "[run_many] scenario "
SECONDS = "[run_many] seconds "  # on stdout, so scenario_log (stderr) never sees it


def scenario_log(job_stderr: str, output_dir) -> list[list[str]]:
    """Rank 0's stderr lines of each run of the scenario(s) with this output_dir, in run order
    (a stopped-and-resumed scenario has two)."""
    runs, current = [], None
    for line in job_stderr.splitlines():
        if line.startswith(MARKER):
            current = [] if line[len(MARKER):] == str(output_dir) else None
            if current is not None:
                runs.append(current)
        elif current is not None:
            current.append(line)
    return runs


def _reuse_tokenizers() -> None:
    """Every scenario loads its tokenizer, and transformers 5 rebuilds GPT-2's BPE from its vocab and
    merges on each load (~0.4 s; a job has ~200 scenarios on 2 ranks at once). Here a folder's
    tokenizer is loaded once and each scenario gets a deep copy: runs change theirs (the pad token, an
    instruction run's chat template). The copies share the Python vocabulary and merges the tokenizer
    kept from its construction (`_vocab`, `_merges`: read only there), which were most of a copy's
    cost (0.19 s -> 0.05 s). A changed file in the folder is a new entry."""
    import copy

    import engine.modeling as modeling
    load, loaded = modeling.load_tokenizer, {}

    def load_or_copy(cfg):
        folder = Path(str(cfg.tokenizer_path)).expanduser()
        if not folder.is_dir():
            return load(cfg)
        files = tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size)
                             for f in folder.iterdir() if f.is_file()))
        key = (str(folder.resolve()), cfg.model.trust_remote_code, files)
        if key not in loaded:
            loaded[key] = load(cfg)
        tokenizer = loaded[key]
        shared = [getattr(tokenizer, name) for name in ("_vocab", "_merges") if hasattr(tokenizer, name)]
        return copy.deepcopy(tokenizer, {id(x): x for x in shared})

    modeling.load_tokenizer = load_or_copy


def main() -> None:
    import torch.distributed as dist

    from backends.base import backend_class

    scenarios = json.loads(Path(sys.argv[1]).read_text())
    # the first scenario's backend joins the process group (DeepSpeed/ColossalAI want to own it)
    backend_class(scenarios[0].get("backend", {}).get("name", "ddp")).init_distributed()
    from engine.worker import run
    _reuse_tokenizers()
    for cfg in scenarios:
        if dist.get_rank() == 0:
            print(f"{MARKER}{cfg['output_dir']}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        run(cfg)
        dist.barrier()
        # the job's heap grows with every library a scenario imports, and each full collection walks it
        # all (ColossalAI's hybrid plugin collects when it is deleted: 0.35 s a scenario late in the job):
        # what outlives a scenario is moved out of the collector's sight, after its garbage is collected
        gc.collect()
        gc.freeze()
        if dist.get_rank() == 0:  # the job's cost per scenario, for whoever trims the suite next
            print(f"{SECONDS}{time.perf_counter() - started:.2f} {cfg['output_dir']}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
