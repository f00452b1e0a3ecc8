"""Every change this project makes to torch and megatron-core, in one place.

Each fix is named, says which megatron-core versions have the bug (or lack the piece) it answers
and what that bug is, and names the platforms it is applied on. ``platform.init_platform`` applies
the fixes of its platform that the installed megatron-core needs, once, at start-up; nothing else
in the project reassigns an attribute of torch or megatron-core, and building a config or a model
patches nothing. Each fix carries a probe -- does the library, with the fixes listed before it
applied, still show the bug? -- and ``tests/test_fixes.py`` checks on every supported stack that
the probe agrees with the version range (a fix whose bug megatron-core fixed fails that test) and
that the fix removes what the probe sees.

Supported: megatron-core 0.16.1 and 0.19.x (compat.py), torch 2.13. A fix whose condition no
longer holds (transformer-engine installed, apex installed) leaves the library as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_attnedit import compat
from megatron_attnedit.kernels import fusions, wgrad
from megatron_attnedit.kernels.wgrad import WgradAccumulation

ALL = ("cpu", "cuda", "npu")


@dataclasses.dataclass(frozen=True)
class Fix:
    name: str
    platforms: Tuple[str, ...]
    mcore: Tuple[Optional[str], Optional[str]]  # [since, before): the megatron-core versions that need it (None: open)
    why: str  # the versions checked and the bug, or what is missing
    apply: Callable[[], None]
    # True while the library (with the fixes listed before this one applied) shows the bug; False
    # once this fix is applied, or where megatron-core no longer has the bug. CPU, no GPU visible.
    probe: Callable[[], bool]

    def needed(self, version: compat.Version = compat.MCORE) -> bool:
        return compat.mcore_in(*self.mcore, v=version)


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
# Probes: does the library (as patched so far) still show the bug? Behaviour where it is cheap to
# run, the broken module state otherwise.
# ------------------------------------------------------------------------------------------------


def _raises(fn, *errors) -> bool:
    try:
        fn()
    except errors or (Exception,):
        return True
    return False


def _probe_cuda_functions() -> bool:
    from megatron.core.tensor_parallel import random as mrandom

    # megatron's RNG bookkeeping reads the state through torch.cuda.random.get_rng_state
    return _raises(mrandom._get_cuda_rng_state, RuntimeError, AssertionError)


def _probe_megatron_cuda_rng() -> bool:
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(6)

    def restore():
        mrandom._set_cuda_rng_state(state)
        mrandom._get_cuda_rng_state(graph_safe=True)

    return _raises(restore) or not torch.equal(torch.cuda.get_rng_state(), state)


def _probe_cuda_devices() -> bool:
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler

    return _raises(lambda: ConstantGradScaler(1.0), RuntimeError, AssertionError)  # a device='cuda' tensor


def _probe_mla_have_te() -> bool:
    from megatron.core.transformer import multi_latent_attention as mla_mod

    return not _have_te() and bool(mla_mod.HAVE_TE) and not isinstance(mla_mod.TELinear, type)


def _probe_moe_te_general_gemm() -> bool:
    from megatron.core.transformer.moe import moe_utils

    return not _have_te() and not hasattr(moe_utils, "te_general_gemm")


def _probe_checkpoint_fp8() -> bool:
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    return _raises(lambda: CheckpointWithoutOutput().checkpoint(torch.nn.functional.silu, torch.ones(2, requires_grad=True)), NameError)


def _probe_recompute_without_grad() -> bool:
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    # a frozen norm on an input that needs no gradient, recomputed for a trainable linear after it
    # (TransformerLayer's layernorm recompute in distillation's first layer)
    gen = torch.Generator().manual_seed(0)
    norm, lin, x = torch.nn.RMSNorm(4), torch.nn.Linear(4, 4), torch.randn(3, 4, generator=gen)
    norm.weight.requires_grad_(False)
    lin(norm(x)).sum().backward()
    want, lin.weight.grad = lin.weight.grad.clone(), None
    ckpt = CheckpointWithoutOutput()
    out = lin(ckpt.checkpoint(norm, x))
    ckpt.discard_output_and_register_recompute(out)
    return _raises(lambda: out.sum().backward()) or not torch.equal(lin.weight.grad, want)


def _probe_dgrad() -> bool:
    from torch.utils._python_dispatch import TorchDispatchMode
    from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce

    class CountMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountMatmuls.count += func.__name__.split(".")[0] in ("mm", "addmm", "bmm", "matmul")
            return func(*args, **(kwargs or {}))

    w = torch.randn(4, 4, requires_grad=True)
    y = linear_with_grad_accumulation_and_async_allreduce(
        torch.randn(2, 3, 4), w, None, gradient_accumulation_fusion=False, allreduce_dgrad=False, sequence_parallel=False)
    with CountMatmuls():
        y.sum().backward()
    return CountMatmuls.count > 1  # an input gradient was computed for an input that needs none


def _probe_wgrad_accumulation() -> bool:
    from megatron.core.tensor_parallel import layers

    return not getattr(layers, "_grad_accum_fusion_available", False)


def _probe_rope_fusion() -> bool:
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is None and rope_utils._apply_rotary_pos_emb_bshd is not fusions.rope_dispatch


# ------------------------------------------------------------------------------------------------
# The list (in the order they are applied and probed)
# ------------------------------------------------------------------------------------------------

ANY_VERSION = (None, None)  # the bug is in every supported version (0.16.1 and 0.19.2 checked)
BEFORE_019 = (None, "0.19.0")  # the bug is in 0.16.1 and gone in 0.19.2 (0.17 and 0.18 not checked)

FIXES: List[Fix] = [
    Fix("cuda_functions_on_cpu", ("cpu",), ANY_VERSION,
        "megatron-core 0.16.1 and 0.19.2 call torch.cuda.current_device (rotary embedding, MoE router and experts), "
        "torch.cuda.Stream (alltoall dispatcher) and the CUDA RNG functions unconditionally: CPU stand-ins",
        _cuda_functions_on_cpu, _probe_cuda_functions),
    Fix("megatron_cuda_rng_on_cpu", ("cpu",), ANY_VERSION,
        "megatron-core 0.16.1 and 0.19.2: the CUDA RNG tracker (local DotProductAttention, tensor_parallel.random) "
        "reads and sets the CUDA generator's state through torch.cuda.default_generators and lazy CUDA calls: a CPU "
        "generator stands in", _megatron_cuda_rng_on_cpu, _probe_megatron_cuda_rng),
    Fix("cuda_devices_on_cpu", ("cpu",), ANY_VERSION,
        "megatron-core 0.16.1 and 0.19.2 create tensors with device='cuda' (optimizer wrappers, grad scaler, grad "
        "clipping, pipeline p2p) and check param.type() == 'torch.cuda.FloatTensor' (distributed optimizer, "
        "clip_grads): a TorchFunctionMode sends them to the CPU and reports CPU tensors' types in their CUDA form",
        _cuda_devices_on_cpu, _probe_cuda_devices),
    Fix("mla_have_te", ALL, BEFORE_019,
        "megatron-core 0.16.1 without transformer-engine (gone in 0.19.2): multi_latent_attention.HAVE_TE stays True "
        "while TELinear is None or a MagicMock stand-in, so building MLASelfAttention raises TypeError from isinstance",
        _mla_have_te, _probe_mla_have_te),
    Fix("moe_te_general_gemm", ALL, BEFORE_019,
        "megatron-core 0.16.1 without transformer-engine (gone in 0.19.2): moe_utils.te_general_gemm is never "
        "defined, and the router raises NameError where it tests it for None", _moe_te_general_gemm, _probe_moe_te_general_gemm),
    Fix("checkpoint_without_output_fp8", ALL, ANY_VERSION,
        "megatron-core 0.16.1 and 0.19.2 without transformer-engine: CheckpointWithoutOutput (selective recompute of "
        "layernorm, mla_up_proj) sets fp8 from `fp8 is not None`, True for its default False, then reads TE's "
        "FP8GlobalStateManager (NameError); without TE there is no fp8", _checkpoint_without_output_fp8, _probe_checkpoint_fp8),
    Fix("recompute_without_grad", ALL, ANY_VERSION,
        "megatron-core 0.16.1 and 0.19.2: CheckpointWithoutOutput on inputs that need no gradient (distillation's "
        "first layer, the shared norms) records no backward node yet frees its output and 'recomputes' it from "
        "missing inputs (TypeError in the backward); there the output is kept instead",
        _recompute_without_grad, _probe_recompute_without_grad),
    Fix("dgrad_skip", ALL, ANY_VERSION,
        "megatron-core 0.16.1 and 0.19.2: the linear backward computes grad_output @ weight whether or not the input "
        "needs a gradient (TE's linears check): stage 1 threw away 13% of the student's FLOPs at Qwen3-8B MLA shape; "
        "kernels/wgrad.weight_grads_only skips it", _dgrad_skip, _probe_dgrad),
    Fix("wgrad_accumulation", ("cpu", "cuda"), ANY_VERSION,
        "megatron-core 0.16.1 and 0.19.2: gradient_accumulation_fusion needs apex's fused_weight_gradient_mlp_cuda; "
        "kernels/wgrad.WgradAccumulation is that interface on torch ops (used only with "
        "model.gradient_accumulation_fusion; a real apex stays)", _wgrad_accumulation, _probe_wgrad_accumulation),
    Fix("rope_fusion", ("cuda",), ANY_VERSION,
        "megatron-core 0.16.1 and 0.19.2 without TE run RoPE op by op (_apply_rotary_pos_emb_bshd, 8.5% of a stage-1 "
        "step's kernel time on an H100 with 0.16.1): CUDA tensors take kernels/fusions.rope_bshd compiled into one "
        "kernel each way, other tensors megatron's own code", _rope_fusion, _probe_rope_fusion),
]

_APPLIED: Dict[str, bool] = {}


def apply(platform_name: str) -> List[str]:
    """Apply the fixes of ``platform_name`` that the installed megatron-core needs (idempotent);
    the names of those applied so far."""
    for fix in FIXES:
        if platform_name in fix.platforms and fix.needed() and fix.name not in _APPLIED:
            fix.apply()
            _APPLIED[fix.name] = True
    return applied()


def apply_one(name: str) -> None:
    """One fix by name, on any platform and version: for tests that exercise a fix where it is not
    applied by default (the RoPE fusion on the CPU) and for the probes."""
    fix = {f.name: f for f in FIXES}[name]
    if name not in _APPLIED:
        fix.apply()
        _APPLIED[name] = True


def applied() -> List[str]:
    return list(_APPLIED)
