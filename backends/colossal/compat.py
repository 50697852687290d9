"""Every patch the engine applies to ColossalAI 0.5.0, in one place, each with its reason.

ColossalAI 0.5.0 pins torch<=2.5.1 and transformers==4.51.3; the engine runs it (installed
`--no-deps`) on the modern stack and, for tests, on CPU with gloo. The patches below fill the
gaps that stand between ColossalAI and that stack. They are applied once per process by
`apply()` (idempotent), only touch code paths that would otherwise raise on CPU (on CUDA they
leave behaviour unchanged), and `tests/test_colossal.py::test_compat_gaps_still_exist` fails
when an upstream release closes a gap, so a patch never outlives its reason.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

_APPLIED = False
ORIGINALS: dict = {}  # upstream objects as they were before apply(): the gap tests inspect these

# name -> one-line reason (docs/colossal.md prints this table)
PATCHES = {
    "cpu_accelerator.synchronize":
        "CpuAccelerator.synchronize raises; ZeRO's backward and checkpoint IO call it -> torch.cpu.synchronize",
    "cpu_accelerator.streams":
        "CpuAccelerator.Stream/current_stream/stream/Event raise; ZeRO's bucket store makes a comm stream "
        "-> torch.cpu's no-op stream objects",
    "cpu_accelerator.rng":
        "CpuAccelerator.get_rng_state passes a device to torch.get_rng_state (which takes none) and "
        "manual_seed raises; shardformer's dropout seeding calls both -> torch CPU generator",
    "cpu_accelerator.current_device":
        "CpuAccelerator.current_device raises; pipeline p2p builds tensors on it -> 'cpu'",
    "low_level_zero.sanity_check":
        "LowLevelZeroOptimizer._sanity_checks asserts accelerator in (cuda, npu); ZeRO 1/2 work on CPU "
        "with gloo -> keep its dtype check, drop the device assert",
    "pipeline.p2p.hccl":
        "pipeline/p2p.py calls dist.is_hccl_available, removed from torch -> report False",
    "hybrid.__del__":
        "HybridParallelPlugin.__del__ prints a TypeError at interpreter exit (its stage manager is gone) "
        "-> guarded",
    "checkpoint.tp_partition_dim":
        "search_tp_partition_dim asserts original == tp * shard, false for a padded vocabulary (GPT-2: "
        "50257 -> 50304 under TP) though its callers unpad right after -> accept padded shards",
    "hybrid.grad_norm_fused_qkv":
        "the hybrid optimizers' grad norm treats fused-QKV/c_fc shards (customized distributed tensors) as "
        "replicated and divides their norm by tp_size, so clipping differs from DDP -> count them as sharded",
    "padded_tensor.unpad_copy":
        "to_unpadded_tensor on the detached copy the checkpoint sharder makes of a padded parameter (vocab "
        "padding under PP) raises AttributeError: the copy lacks the saved methods -> restore only those present",
    "llama.static_cache_import":
        "shardformer/modeling/llama.py imports StaticCache from transformers' modeling_llama (gone in "
        "transformers 5), so the stock Llama policy the engine's tensor-parallel Llama policy builds on cannot be "
        "imported -> the name points to transformers.cache_utils.StaticCache (used by 4.51 forwards the engine "
        "does not run)",
    "qkv_fused.gather_cuda":
        "shardformer's fused-QKV gather (save_model after TP) calls .cuda() -> stays on the tensor's device "
        "without CUDA",
}


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    _patch_cpu_accelerator()
    _patch_low_level_zero()
    _patch_pipeline_p2p()
    _patch_hybrid_plugin()
    _patch_qkv_gather()
    _patch_tp_partition_dim()
    _patch_grad_norm_sharded()
    _patch_padded_unpad()
    _patch_llama_static_cache()


# --------------------------------------------------------------------------------------------
def _patch_cpu_accelerator() -> None:
    from colossalai.accelerator.cpu_accelerator import CpuAccelerator

    ORIGINALS["CpuAccelerator"] = dict(vars(CpuAccelerator))
    CpuAccelerator.synchronize = lambda self, device=None: torch.cpu.synchronize()
    CpuAccelerator.Stream = lambda self, device=None, priority=0, **kw: torch.cpu.Stream()
    CpuAccelerator.current_stream = lambda self, device=None: torch.cpu.current_stream()
    CpuAccelerator.default_stream = lambda self, device=None: torch.cpu.current_stream()
    CpuAccelerator.stream = lambda self, stream_: torch.cpu.stream(stream_)
    CpuAccelerator.set_stream = lambda self, stream_: None
    CpuAccelerator.Event = lambda self, enable_timing=False, blocking=False, interprocess=False: torch.cpu.Event()
    CpuAccelerator.get_rng_state = lambda self, device=None: torch.get_rng_state()
    CpuAccelerator.set_rng_state = lambda self, new_state, device=None: torch.set_rng_state(new_state)
    CpuAccelerator.manual_seed = lambda self, seed: torch.manual_seed(seed)
    CpuAccelerator.manual_seed_all = lambda self, seed: torch.manual_seed(seed)
    CpuAccelerator.initial_seed = lambda self: torch.initial_seed()
    CpuAccelerator.current_device = lambda self: "cpu"
    CpuAccelerator.empty_cache = lambda self: None


def _patch_low_level_zero() -> None:
    from colossalai.accelerator import get_accelerator
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    original = ORIGINALS["LowLevelZeroOptimizer._sanity_checks"] = LowLevelZeroOptimizer._sanity_checks

    @functools.wraps(original)
    def sanity_checks(self):
        if get_accelerator().name in ("cuda", "npu"):
            return original(self)
        for group in self.optim.param_groups:
            for param in group["params"]:
                if not getattr(param, "skip_zero_check", False) and param.dtype != self._dtype:
                    raise AssertionError(f"Parameters are expected to have the same dtype `{self._dtype}`, "
                                         f"but got `{param.dtype}`")

    LowLevelZeroOptimizer._sanity_checks = sanity_checks


def _patch_pipeline_p2p() -> None:
    ORIGINALS["dist.is_hccl_available"] = getattr(dist, "is_hccl_available", None)
    if not hasattr(dist, "is_hccl_available"):
        dist.is_hccl_available = lambda: False


def _patch_hybrid_plugin() -> None:
    from colossalai.booster.plugin.hybrid_parallel_plugin import HybridParallelPlugin

    original_del = ORIGINALS["HybridParallelPlugin.__del__"] = HybridParallelPlugin.__del__

    def quiet_del(self):
        with contextlib.suppress(Exception):
            original_del(self)

    HybridParallelPlugin.__del__ = quiet_del


def _patch_qkv_gather() -> None:
    if torch.cuda.is_available():
        return
    import colossalai.shardformer.layer.qkv_fused_linear as qkv

    original = ORIGINALS["gather_fused_qkv_in_gpt2_style"] = qkv.gather_fused_qkv_in_gpt2_style

    @functools.wraps(original)
    def gather(*args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self  # only for the duration of this call
        try:
            return original(*args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    qkv.gather_fused_qkv_in_gpt2_style = gather


def _padded_search_tp_partition_dim(current_shape, original_shape, tp_size):
    for dim, length in enumerate(original_shape):
        if length > current_shape[dim]:
            if not (tp_size - 1) * current_shape[dim] < length <= tp_size * current_shape[dim]:
                raise AssertionError(f"The parameter isn't evenly distributed among tensor parallel group: "
                                     f"shape before sharding {original_shape}, after sharding {current_shape}")
            return dim
    return None


def _patch_tp_partition_dim() -> None:
    import colossalai.checkpoint_io.hybrid_parallel_checkpoint_io as hpio
    import colossalai.checkpoint_io.utils as utils

    ORIGINALS["search_tp_partition_dim"] = utils.search_tp_partition_dim
    utils.search_tp_partition_dim = _padded_search_tp_partition_dim
    hpio.search_tp_partition_dim = _padded_search_tp_partition_dim


def _patch_grad_norm_sharded() -> None:
    import colossalai.booster.plugin.hybrid_parallel_plugin as hpp
    from colossalai.tensor.d_tensor.api import is_customized_distributed_tensor, is_distributed_tensor

    ORIGINALS["hybrid_parallel_plugin.is_distributed_tensor"] = hpp.is_distributed_tensor
    hpp.is_distributed_tensor = lambda t: is_distributed_tensor(t) or is_customized_distributed_tensor(t)


def _patch_padded_unpad() -> None:
    import colossalai.tensor.padded_tensor.api as padded

    original = ORIGINALS["_hijack_back_detach_and_clone"] = padded._hijack_back_detach_and_clone

    @functools.wraps(original)
    def hijack_back(ptensor):
        if not hasattr(ptensor, "_unpad_detach"):
            return ptensor  # a detached copy: it uses Tensor's own detach/clone already
        return original(ptensor)

    padded._hijack_back_detach_and_clone = hijack_back


def _patch_llama_static_cache() -> None:
    import transformers.models.llama.modeling_llama as modeling_llama
    from transformers.cache_utils import StaticCache

    ORIGINALS["modeling_llama.StaticCache"] = getattr(modeling_llama, "StaticCache", None)
    if ORIGINALS["modeling_llama.StaticCache"] is None:
        modeling_llama.StaticCache = StaticCache
