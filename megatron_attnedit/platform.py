"""One call at start-up picks the accelerator: ``cuda``, ``npu`` (Ascend) or ``cpu``.

megatron-core 0.16.1 assumes CUDA in a handful of places (DESIGN.md section 3). On Ascend,
``mindspeed.megatron_adaptor`` patches those; on the CPU -- which is where development and CI
live -- we do the equivalent ourselves: CUDA device requests are redirected to the CPU, CPU
tensors report their type in CUDA form for megatron's ``param.type()`` checks, and the few
``torch.cuda`` functions megatron calls get CPU stand-ins. Two module flags that are wrong
without transformer-engine are corrected on every platform.

Nothing here changes behaviour on a real CUDA machine except the two flag corrections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

_ACTIVE: Optional["Platform"] = None


@dataclasses.dataclass(frozen=True)
class Platform:
    """What the rest of the code needs to know about the accelerator."""

    name: str  # "cuda" | "npu" | "cpu"
    backend: str  # torch.distributed backend: nccl | hccl | gloo

    @property
    def device(self) -> torch.device:
        if self.name == "cpu":
            return torch.device("cpu")
        return torch.device(self.name, torch_device_index())

    def synchronize(self) -> None:
        if self.name == "cuda":
            torch.cuda.synchronize()
        elif self.name == "npu":
            torch.npu.synchronize()  # type: ignore[attr-defined]

    def reset_peak_memory(self) -> None:
        """Start ``max_memory_allocated`` over (the CPU's resident-set figure has no peak to reset)."""
        if self.name == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif self.name == "npu":
            torch.npu.reset_peak_memory_stats()  # type: ignore[attr-defined]

    def max_memory_allocated(self) -> int:
        if self.name == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.name == "npu":
            return torch.npu.max_memory_allocated()  # type: ignore[attr-defined]
        import psutil

        return psutil.Process().memory_info().rss


def torch_device_index() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def detect() -> str:
    """The best platform present: npu if torch_npu imports, cuda if a GPU is visible, else cpu."""
    try:
        import torch_npu  # noqa: F401

        if torch.npu.is_available():  # type: ignore[attr-defined]
            return "npu"
    except ImportError:
        pass
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def init_platform(name: str = "auto") -> Platform:
    """Prepare torch and megatron-core for ``name``; idempotent. Call before building models."""
    global _ACTIVE
    if name == "auto":
        name = detect()
    if _ACTIVE is not None:
        if _ACTIVE.name != name:
            raise RuntimeError(f"platform already initialised as {_ACTIVE.name}, cannot switch to {name}")
        return _ACTIVE
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --platform cuda asked for, but torch sees no GPU; use --platform cpu")
        torch.cuda.set_device(torch_device_index())
        plat = Platform("cuda", "nccl")
    elif name == "npu":
        try:
            import torch_npu  # noqa: F401
            import mindspeed.megatron_adaptor  # noqa: F401  (patches megatron for Ascend)
        except ImportError as e:
            raise SystemExit(
                f"error: --platform npu needs torch_npu and MindSpeed ({e}); see README 'Ascend'"
            ) from None
        torch.npu.set_device(torch_device_index())  # type: ignore[attr-defined]
        plat = Platform("npu", "hccl")
    elif name == "cpu":
        _install_cpu_redirect()
        plat = Platform("cpu", "gloo")
    else:
        raise SystemExit(f"error: unknown platform {name!r}; use auto, cuda, npu or cpu")
    _fix_megatron_without_te()
    _fix_recompute_without_grad()
    _ACTIVE = plat
    return plat


def active() -> Platform:
    if _ACTIVE is None:
        return init_platform("auto")
    return _ACTIVE


def _fix_megatron_without_te() -> None:
    """megatron-core 0.16.1 bugs when transformer-engine is absent (DESIGN.md section 3)."""
    try:
        import transformer_engine  # noqa: F401

        return
    except ImportError:
        pass
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    # HAVE_TE stays True there while TELinear is None or a mock stand-in (megatron builds its TE
    # classes on a MagicMock when TE is absent): isinstance(x, TELinear) then raises TypeError.
    if not isinstance(multi_latent_attention.TELinear, type):
        multi_latent_attention.HAVE_TE = False
    # The router calls te_general_gemm when it is not None, but without TE it is never defined.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # CheckpointWithoutOutput (selective recompute of layernorm, mla_up_proj) sets its fp8 flag
    # from `fp8 is not None`, True for its default False, and then reads TE's FP8GlobalStateManager,
    # never imported without TE (NameError). Without TE there is no fp8: the flag is False.
    from megatron.core.tensor_parallel import random as mrandom

    cls = mrandom.CheckpointWithoutOutput
    if not hasattr(mrandom, "FP8GlobalStateManager") and not getattr(cls.__init__, "no_fp8", False):
        init = cls.__init__

        def __init__(self, fp8=False):
            init(self, fp8)
            self.fp8 = False

        __init__.no_fp8 = True
        cls.__init__ = __init__


def _fix_recompute_without_grad() -> None:
    """megatron's CheckpointWithoutOutput (selective recompute of layernorm / mla_up_proj) on inputs
    that need no gradient: its autograd function then records no backward node and keeps no saved
    inputs, yet the output is still freed and "recomputed" from those missing inputs (TypeError in
    the backward). It happens in distillation, where the first layer's input (the frozen embedding's
    output) and the shared norms need no gradient. There the output is not needed for any gradient
    but the next GEMM's weight gradient, so it is simply kept: no checkpoint, nothing freed."""
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


# --------------------------------------------------------------------------------------------
# CPU: redirect CUDA requests (the same idea as torch_npu.contrib.transfer_to_npu on Ascend)
# --------------------------------------------------------------------------------------------


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


_CPU_MODE: Optional[_CudaToCpu] = None


def _install_cpu_redirect() -> None:
    global _CPU_MODE
    if _CPU_MODE is not None:
        return
    rng = _VirtualCudaRng()

    class _Stream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, *a, **k):
            pass

        def synchronize(self):
            pass

        def record_event(self, *a, **k):
            return None

    cuda = torch.cuda
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

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: rng.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: rng.set_rng_state(new_state)

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


# --------------------------------------------------------------------------------------------
# Distributed start-up
# --------------------------------------------------------------------------------------------


def init_distributed(
    plat: Platform,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    timeout_minutes: int = 30,
) -> None:
    """torch.distributed from torchrun's environment (single process if absent), then megatron's
    parallel state. Sizes that do not divide the world give one clear error line."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            # A lone process (converters, single-process tools): an in-process store, no port to
            # pick -- a free port chosen now can be taken by another program before we bind it.
            dist.init_process_group(backend=plat.backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group(
                backend=plat.backend,
                rank=int(os.environ.get("RANK", "0")),
                world_size=world_size,
                timeout=timeout,
            )
    world = dist.get_world_size()
    tp, pp, ep = tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
    if world % (tp * pp) != 0:
        raise SystemExit(f"error: world size {world} is not divisible by TP*PP = {tp}*{pp}; change the parallel sizes")
    dp = world // (tp * pp)
    if dp % ep != 0 and ep % dp != 0 or (tp * dp) % ep != 0:
        raise SystemExit(f"error: EP={ep} must divide TP*DP={tp * dp} (world {world}); change the parallel sizes")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
