#!/usr/bin/env python3
"""Builds one JIT-compiled op ahead of the runs that need it, so its minutes are recorded on their own
and no measured run pays them (benchmarks/gpu/README.md, "JIT builds").

    python benchmarks/gpu/build_kernels.py colossalai-cpu-adam | colossalai-fused-optim | deepspeed-cpu-adam

The driver starts the two ColossalAI ops side by side (Gemini's HybridAdam loads both).
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path


def colossalai_op(which: str) -> None:
    """ColossalAI imports a prebuilt `colossalai._C.<op>` before it falls back to its JIT build
    (colossalai/kernel/extensions/cpp_extension.py, `load`). Build the op with ColossalAI's own sources
    and flags into that place, with two changes that only save time: its own build directory (so the
    two ops build in parallel; ColossalAI's JIT shares one folder and one lock between ops) and only this
    GPU's architecture (ColossalAI adds -gencode for every architecture torch was built for up to this
    GPU's, four on an H100; torch adds this GPU's by itself)."""
    import colossalai
    import torch
    from torch.utils.cpp_extension import load

    if which == "cpu-adam":
        from colossalai.kernel.extensions.pybind.cpu_adam.cpu_adam_x86 import CpuAdamX86Extension as Ext
    else:
        from colossalai.kernel.extensions.pybind.optimizer.fused_optimizer_cuda import FusedOptimizerCudaExtension as Ext
    ext = Ext()
    ext.assert_compatible()  # CUDA_HOME found, nvcc's major version = torch's
    flags, skip = [], False
    for f in ext.nvcc_flags():
        if skip:
            skip = False
        elif f == "-gencode":
            skip = True
        else:
            flags.append(f)
    build = Path(tempfile.mkdtemp(prefix=f"colossalai-{ext.name}-"))
    load(name=ext.name, sources=ext.strip_empty_entries(ext.sources_files()),
         extra_include_paths=ext.strip_empty_entries(ext.include_dirs()), extra_cflags=ext.cxx_flags(),
         extra_cuda_cflags=flags, build_directory=str(build))
    target = Path(colossalai.__file__).parent / "_C"
    target.mkdir(exist_ok=True)
    (target / "__init__.py").touch()
    shutil.copy2(build / f"{ext.name}.so", target / f"{ext.name}.so")
    # not imported here under its second name (pybind11 refuses a second registration in one process):
    # only checked to be where ColossalAI's loader looks
    if importlib.util.find_spec(f"colossalai._C.{ext.name}") is None:
        raise SystemExit(f"error: colossalai._C.{ext.name} not importable from {target}")
    print(f"built colossalai._C.{ext.name} for sm_{''.join(map(str, torch.cuda.get_device_capability()))} "
          f"-> {target / (ext.name + '.so')}")


def deepspeed_cpu_adam() -> None:
    """DeepSpeed's own JIT build (into TORCH_EXTENSIONS_DIR), as DeepSpeedCPUAdam does it: the later
    runs find it built (ninja has nothing to do)."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("CPUAdamBuilder")
    # a build stopped by an earlier call's time budget (a warm machine keeps its files) leaves torch's
    # lock behind, and torch would wait on it for ever; nothing else builds this op while this runs
    lock = Path(_get_build_directory(builder.name, verbose=False)) / "lock"
    if lock.exists():
        print(f"removing a stale {lock}")
        lock.unlink()
    builder.load()
    print("built deepspeed cpu_adam")


def main(name: str) -> None:
    t0 = time.time()
    if name == "colossalai-cpu-adam":
        colossalai_op("cpu-adam")
    elif name == "colossalai-fused-optim":
        colossalai_op("fused-optim")
    elif name == "deepspeed-cpu-adam":
        deepspeed_cpu_adam()
    else:
        raise SystemExit(f"unknown op {name!r}: colossalai-cpu-adam, colossalai-fused-optim, deepspeed-cpu-adam")
    print(f"{name}: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
