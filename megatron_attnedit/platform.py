"""One call at start-up picks the accelerator: ``cuda``, ``npu`` (Ascend) or ``cpu``.

megatron-core 0.16.1 assumes CUDA in a handful of places (DESIGN.md section 3). On Ascend,
``mindspeed.megatron_adaptor`` patches those; on the CPU -- which is where development and CI
live -- we do the equivalent ourselves. Every change to torch and megatron-core is a named fix in
``fixes.py``; ``init_platform`` applies those of its platform, once.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron_attnedit import fixes

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
        plat = Platform("cpu", "gloo")
    else:
        raise SystemExit(f"error: unknown platform {name!r}; use auto, cuda, npu or cpu")
    fixes.apply(plat.name)
    _ACTIVE = plat
    return plat


def active() -> Platform:
    if _ACTIVE is None:
        return init_platform("auto")
    return _ACTIVE


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
