"""Run several training scenarios inside ONE launched multi-process job.

Importing torch + transformers costs 5-18 s per process on the CI machines, so parity tests
launch this once under torchrun (`python -m torch.distributed.run --nproc_per_node 2
tests/drivers/run_many.py SCENARIOS.json`) instead of launching one job per scenario.
SCENARIOS.json is a list of resolved config dicts (each with its own output_dir); each runs
through the real per-rank entry point, engine.worker.run, on the same process group.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import torch.distributed as dist

    from backends.base import backend_class

    scenarios = json.loads(Path(sys.argv[1]).read_text())
    # the first scenario's backend joins the process group (DeepSpeed/ColossalAI want to own it)
    backend_class(scenarios[0].get("backend", {}).get("name", "ddp")).init_distributed()
    from engine.worker import run
    for cfg in scenarios:
        run(cfg)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
