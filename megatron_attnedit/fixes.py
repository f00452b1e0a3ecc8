"""Every change this project makes to torch and megatron-core, in one place.

Each fix is named, says which version and which bug (or missing piece) it answers, and names the
platforms it is applied on. ``platform.init_platform`` applies the fixes of its platform once, at
start-up; nothing else in the project reassigns an attribute of torch or megatron-core, and
building a config or a model patches nothing. ``tests/test_fixes.py`` lists them.

Pinned: megatron-core 0.16.1 and torch 2.13 (requirements.txt). A fix whose condition no longer
holds (transformer-engine installed, apex installed) leaves the library as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_attnedit.kernels import fusions, wgrad
from megatron_attnedit.kernels.wgrad import WgradAccumulation

ALL = ("cpu", "cuda", "npu")


@dataclasses.dataclass(frozen=True)
class Fix:
    name: str
    platforms: Tuple[str, ...]
    why: str  # the version and the bug, or what is missing
    apply: Callable[[], None]


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------
# megatron-core 0.16.1 without transformer-engine
# ------------------------------------------------------------------------------------------------


def _mla_have_te() -> None:
    if _have_te():
        return
    from megatron.core.transformer import multi_latent_attention as mla_mod

    # megatron builds its TE classes on a MagicMock when TE is absent: TELinear is then a mock
    # instance or None, never a class, while HAVE_TE stays True
    if mla_mod.HAVE_TE and not isinstance(mla_mod.TELinear, type):
        mla_mod.HAVE_TE = False


def _moe_te_general_gemm() -> None:
    if _have_te():
        return
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _checkpoint_without_output_fp8() -> None:
    if _have_te():
        return
    from megatron.core.tensor_parallel import random as mrandom

    cls = mrandom.CheckpointWithoutOutput
    if hasattr(mrandom, "FP8GlobalStateManager") or getattr(cls.__init__, "no_fp8", False):
        return
    init = cls.__init__

    def __init__(self, fp8=False):
        init(self, fp8)
        self.fp8 = False

    __init__.no_fp8 = True
    cls.__init__ = __init__


def _recompute_without_grad() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    cls = mrandom.CheckpointWithoutOutput
    if getattr(cls.checkpoint, "skips_without_grad", False):
        return
    checkpoint, discard = cls.checkpoint, cls.discard_output_and_register_recompute

    def needs_grad(run_function, args) -> bool:
        params = run_function.parameters() if isinstance(run_function, torch.nn.Module) else ()
        return torch.is_grad_enabled() and (any(torch.is_tensor(a) and a.requires_grad for a in args) or any(p.requires_grad for p in params))

    def checkpoint_if_needed(self, run_function, *args):
        self.skipped = not needs_grad(run_function, args)
        return run_function(*args) if self.skipped else checkpoint(self, run_function, *args)

    def discard_if_checkpointed(self, hook_tensor):
        if not getattr(self, "skipped", False):
            discard(self, hook_tensor)

    checkpoint_if_needed.skips_without_grad = True
    cls.checkpoint, cls.discard_output_and_register_recompute = checkpoint_if_needed, discard_if_checkpointed


# ------------------------------------------------------------------------------------------------
# What apex / TE would bring: weight-gradient accumulation, the linear backward, fused RoPE
# ------------------------------------------------------------------------------------------------


def _wgrad_accumulation() -> None:
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "_grad_accum_fusion_available", False) and getattr(layers, "fused_weight_gradient_mlp_cuda", None) is not None:
        return  # a real apex install stays
    layers.fused_weight_gradient_mlp_cuda = WgradAccumulation
    layers._grad_accum_fusion_available = True


def _dgrad_skip() -> None:
    from megatron.core.tensor_parallel.layers import (
        LinearWithGradAccumulationAndAsyncCommunication as F,
    )

    if wgrad.MEGATRON_BACKWARD.get("linear") is None:
        wgrad.MEGATRON_BACKWARD["linear"] = F.backward
        F.backward = staticmethod(wgrad.weight_grads_only)


def _rope_fusion() -> None:
    from megatron.core.models.common.embeddings import rope_utils

    # One graph per variant that a run meets: dtype x grad mode (the teacher's no_grad forward,
    # the student's training one, evaluation) x layout (GQA q and k, MLA's strided RoPE part and
    # its shared key) -- more than dynamo's default of 8 recompiles of one function, past which
    # a fullgraph compile raises.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if rope_utils._apply_rotary_pos_emb_bshd is not fusions.rope_dispatch:
        fusions.UNFUSED["rope"] = rope_utils._apply_rotary_pos_emb_bshd
        rope_utils._apply_rotary_pos_emb_bshd = fusions.rope_dispatch


# ------------------------------------------------------------------------------------------------
# CPU: CUDA requests redirected to the CPU (the same idea as torch_npu.contrib.transfer_to_npu)
# ------------------------------------------------------------------------------------------------


def _is_cuda_device(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, int) and not isinstance(d, bool)


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites ``device='cuda'`` arguments and ``Tensor.cuda()`` calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and kwargs["device"] is not None and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a)) else a for i, a in enumerate(args))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda") else name
        return func(*args, **kwargs)


class _VirtualCudaRng:
    """A generator that stands in for the CUDA default generator's state on CPU."""

    def __init__(self) -> None:
        self.gen = torch.Generator()

    def get_rng_state(self, device="cuda"):
        return self.gen.get_state()

    def set_rng_state(self, state, device="cuda"):
        self.gen.set_state(state)

    def manual_seed(self, seed):
        self.gen.manual_seed(int(seed))


class _Stream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *a, **k):
        return None


_CPU_MODE: Optional[_CudaToCpu] = None
_CPU_RNG = _VirtualCudaRng()


def _cuda_functions_on_cpu() -> None:
    cuda, rng = torch.cuda, _CPU_RNG
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _Stream
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = rng.get_rng_state
    cuda.set_rng_state = rng.set_rng_state
    cuda.manual_seed = rng.manual_seed
    cuda.manual_seed_all = rng.manual_seed
    cuda.random.get_rng_state = rng.get_rng_state
    cuda.random.set_rng_state = rng.set_rng_state
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.empty_cache = lambda: None


def _megatron_cuda_rng_on_cpu() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: _CPU_RNG.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: _CPU_RNG.set_rng_state(new_state)


def _cuda_devices_on_cpu() -> None:
    global _CPU_MODE
    if _CPU_MODE is not None:
        return
    _CPU_MODE = _CudaToCpu()
    _CPU_MODE.__enter__()  # stays active for the life of the process
    # The autograd engine runs custom backward functions with an empty mode stack (megatron's
    # linear backward allocates on torch.cuda.current_device(), its MoE gather on "cuda").
    from torch.autograd.function import BackwardCFunction

    run_backward = BackwardCFunction.apply

    def apply(self, *args):
        if torch.overrides._get_current_function_mode_stack():
            return run_backward(self, *args)
        with _CPU_MODE:
            return run_backward(self, *args)

    BackwardCFunction.apply = apply


# ------------------------------------------------------------------------------------------------
# The list
# ------------------------------------------------------------------------------------------------

FIXES: List[Fix] = [
    Fix("cuda_functions_on_cpu", ("cpu",),
        "megatron-core 0.16.1 calls torch.cuda.current_device (rotary embedding, MoE router and experts), "
        "torch.cuda.Stream (alltoall dispatcher) and the CUDA RNG functions unconditionally: CPU stand-ins",
        _cuda_functions_on_cpu),
    Fix("megatron_cuda_rng_on_cpu", ("cpu",),
        "megatron-core 0.16.1's CUDA RNG tracker (local DotProductAttention, tensor_parallel.random) reads and sets "
        "the CUDA generator's state: a CPU generator stands in", _megatron_cuda_rng_on_cpu),
    Fix("cuda_devices_on_cpu", ("cpu",),
        "megatron-core 0.16.1 creates tensors with device='cuda' (optimizer wrappers, grad clipping, pipeline p2p) "
        "and checks param.type() == 'torch.cuda.FloatTensor' (distributed optimizer, clip_grads): a TorchFunctionMode "
        "sends them to the CPU and reports CPU tensors' types in their CUDA form", _cuda_devices_on_cpu),
    Fix("mla_have_te", ALL,
        "megatron-core 0.16.1 without transformer-engine: multi_latent_attention.HAVE_TE stays True while TELinear is "
        "None or a MagicMock stand-in, so building MLASelfAttention raises TypeError from isinstance", _mla_have_te),
    Fix("moe_te_general_gemm", ALL,
        "megatron-core 0.16.1 without transformer-engine: moe_utils.te_general_gemm is never defined, and the router "
        "raises NameError where it tests it for None", _moe_te_general_gemm),
    Fix("checkpoint_without_output_fp8", ALL,
        "megatron-core 0.16.1 without transformer-engine: CheckpointWithoutOutput (selective recompute of layernorm, "
        "mla_up_proj) sets fp8 from `fp8 is not None`, True for its default False, then reads TE's "
        "FP8GlobalStateManager (NameError); without TE there is no fp8", _checkpoint_without_output_fp8),
    Fix("recompute_without_grad", ALL,
        "megatron-core 0.16.1: CheckpointWithoutOutput on inputs that need no gradient (distillation's first layer, "
        "the shared norms) records no backward node yet frees its output and 'recomputes' it from missing inputs "
        "(TypeError in the backward); there the output is kept instead", _recompute_without_grad),
    Fix("dgrad_skip", ALL,
        "megatron-core 0.16.1's linear backward computes grad_output @ weight whether or not the input needs a "
        "gradient (TE's linears check): stage 1 threw away 13% of the student's FLOPs at Qwen3-8B MLA shape; "
        "kernels/wgrad.weight_grads_only skips it", _dgrad_skip),
    Fix("wgrad_accumulation", ("cpu", "cuda"),
        "megatron-core 0.16.1's gradient_accumulation_fusion needs apex's fused_weight_gradient_mlp_cuda; "
        "kernels/wgrad.WgradAccumulation is that interface on torch ops (used only with "
        "model.gradient_accumulation_fusion; a real apex stays)", _wgrad_accumulation),
    Fix("rope_fusion", ("cuda",),
        "megatron-core 0.16.1 without TE runs RoPE op by op (_apply_rotary_pos_emb_bshd, 8.5% of a stage-1 step's "
        "kernel time on an H100): CUDA tensors take kernels/fusions.rope_bshd compiled into one kernel each way, "
        "other tensors megatron's own code", _rope_fusion),
]

_APPLIED: Dict[str, bool] = {}


def apply(platform_name: str) -> List[str]:
    """Apply the fixes of ``platform_name`` (idempotent); the names of those applied so far."""
    for fix in FIXES:
        if platform_name in fix.platforms and fix.name not in _APPLIED:
            fix.apply()
            _APPLIED[fix.name] = True
    return applied()


def apply_one(name: str) -> None:
    """One fix by name, on any platform: for tests that exercise a fix where it is not applied
    by default (the RoPE fusion on the CPU)."""
    fix = {f.name: f for f in FIXES}[name]
    if name not in _APPLIED:
        fix.apply()
        _APPLIED[name] = True


def applied() -> List[str]:
    return list(_APPLIED)
