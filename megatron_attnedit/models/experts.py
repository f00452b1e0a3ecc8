"""Grouped-GEMM routed experts for the local (no transformer-engine) spec.

``GroupedExperts`` is a drop-in ``experts`` submodule of megatron-core's ``MoELayer``: the same
interface as ``SequentialMLP`` (``forward(permuted_hidden, tokens_per_expert, permuted_probs) ->
(output, None)``), the same math (SwiGLU, router probabilities applied after the activation), the
same initial weights from the same seed, and the same checkpoints. What differs is the storage --
one stacked parameter per projection -- and the compute: two ``torch._grouped_mm`` calls per layer
instead of two small GEMMs per expert (DESIGN.md section 6: 5.68 ms vs 0.655 ms for expert FC1 at
Qwen3-30B-A3B shape on one H100).

Storage (this rank's experts, expert-TP shard; the per-expert slices are exactly SequentialMLP's
``linear_fc1.weight`` / ``linear_fc2.weight``):
  fc1_weight  [E_local, 2 * ffn / tp, hidden]   rows [gate_r; up_r] per expert, as megatron shards GLU
  fc2_weight  [E_local, hidden, ffn / tp]

Compute paths:
  grouped_mm  ``torch._grouped_mm(x, w.transpose(-2, -1), offs=cumsum(tokens_per_expert))``; used on
              CUDA (sm90+) with bf16 weights and activations. No host sync: the offsets are computed
              where ``tokens_per_expert`` lives (the allgather / alltoall dispatchers hand it over on
              the CPU; it is copied through pinned memory without waiting on the GPU).
  loop        one matmul pair per expert (what SequentialMLP does); CPU, fp32, other accelerators.
  A layer that received no token at all takes the loop (every weight still gets a zero gradient,
  so DDP sees every parameter); experts with no token are empty groups of the grouped GEMM.
  Known limit: pytorch#172439 reports wrong weight gradients for empty groups on Blackwell (sm100)
  GPUs; H100/H200 (sm90) are not affected. ``impl`` forces a path (tests run ``grouped_mm`` on
  CPU, where torch 2.13 implements it in fp32 too).

Checkpoints and names (so that nothing outside this file needs to know which experts a model has):
  * ``sharded_state_dict`` writes exactly SequentialMLP's entries -- per global expert, same keys,
    global shapes and offsets (expert axis, TP axis, the [gate; up] split), same replica ids, same
    ``_extra_state`` objects -- so a torch_dist checkpoint from either loads into the other, at any
    TP/EP. Weights go through one ``ShardedTensorFactory`` per stacked parameter whose data is the
    parameter itself, so megatron's (non-distributed) optimizer finds its state and writes it in
    the same per-expert layout too. The distributed optimizer's ``dp_reshardable`` state is laid
    out by gradient buckets, so it resumes only into the same implementation (as for GroupedMLP).
  * ``state_dict()`` presents SequentialMLP's names (``local_experts.{i}.linear_fc1.weight`` as a
    view of ``fc1_weight[i]``, ``_extra_state`` entries), and ``load_state_dict`` accepts them as
    well as the stacked names; so HF loading (``hf_io.load_into_model`` writes into those views),
    the converters' tables, legacy per-rank checkpoints and the colocation's equality checks work
    unchanged. ``named_parameters()`` gives the stacked parameters (what DDP and the optimizer
    see), with SequentialMLP's attributes: ``allreduce=False`` under expert parallelism (expert
    gradient buckets), ``tensor_model_parallel``, ``partition_dim``, ``partition_stride``.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch.nn.parameter import Parameter

from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.utils import divide
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_object_for_checkpoint
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

from megatron_attnedit.kernels import fusions

IMPLS = ("auto", "grouped_mm", "loop")
# (stacked parameter, SequentialMLP submodule, TP axis of one expert's weight)
_PARAMS = (("fc1_weight", "linear_fc1", 0), ("fc2_weight", "linear_fc2", 1))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``_grouped_mm``'s backward
    rejects expanded (stride-0) gradients such as the one of ``y.sum()``."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class GroupedExperts(MegatronModule):
    """Routed experts as two grouped GEMMs over stacked weights (see the module docstring)."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, submodules=None, pg_collection=None, impl: str = "auto", name=None):
        # name: the module path megatron-core >= 0.17 hands its submodules (unused here)
        super().__init__(config=config)
        if impl not in IMPLS:
            raise ValueError(f"GroupedExperts impl {impl!r} unknown; use one of {', '.join(IMPLS)}")
        if config.add_bias_linear:
            raise ValueError("grouped-GEMM experts have no bias; set add_bias_linear=False (Qwen3 has none)")
        if config.fp8 or config.fp4 or config.moe_latent_size:
            raise ValueError("grouped-GEMM experts support neither fp8/fp4 nor moe_latent_size; use SequentialMLP or the TE spec")
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        self.impl = impl
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp  # expert tensor parallelism
        self.dp_group = pg_collection.expt_dp
        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
        hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
        glu = 2 if config.gated_linear_unit else 1
        self.ffn_per_partition = divide(ffn, tp_size)

        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.fc1_weight = Parameter(torch.empty(num_local_experts, glu * self.ffn_per_partition, hidden, device=device, dtype=config.params_dtype))
        self.fc2_weight = Parameter(torch.empty(num_local_experts, hidden, self.ffn_per_partition, device=device, dtype=config.params_dtype))
        # SequentialMLP's attributes (for a stacked tensor the TP dim is one further in).
        # GLU: fc1 is [gate; up] per shard, megatron's stride 2 (which also makes the CPU init layout-free).
        fc1_stride = 2 if config.gated_linear_unit and not config.use_kitchen else 1
        set_tensor_model_parallel_attributes(self.fc1_weight, True, 1, fc1_stride)
        set_tensor_model_parallel_attributes(self.fc2_weight, True, 2, 1)
        for p in (self.fc1_weight, self.fc2_weight):
            p.allreduce = not config.expert_model_parallel_size > 1
        if config.perform_initialization:
            self._initialize(glu * ffn, hidden, ffn, fc1_stride, tp_rank, tp_size)

        self.register_state_dict_post_hook(_per_expert_state_dict)
        self.register_load_state_dict_pre_hook(_stack_per_expert_state_dict)

    @torch.no_grad()
    def _initialize(self, fc1_out: int, hidden: int, ffn: int, fc1_stride: int, tp_rank: int, tp_size: int) -> None:
        """Expert by expert, fc1 then fc2, with SequentialMLP's calls: the same RNG draws, so the same
        weights from the same seed."""
        c = self.config
        for i in range(self.num_local_experts):
            w1, w2 = self.fc1_weight.data[i], self.fc2_weight.data[i]
            if c.use_cpu_initialization:
                _initialize_affine_weight_cpu(w1, fc1_out, hidden, w1.shape[0], 0, c.init_method, stride=fc1_stride,
                                              rank=tp_rank, world_size=tp_size, skip_set_tensor_parallel_attributes=True)
                _initialize_affine_weight_cpu(w2, hidden, ffn, w2.shape[1], 1, c.output_layer_init_method, params_dtype=c.params_dtype,
                                              rank=tp_rank, world_size=tp_size, skip_set_tensor_parallel_attributes=True)
            else:
                _initialize_affine_weight_gpu(w1, c.init_method, partition_dim=0, stride=fc1_stride, is_expert=True)
                _initialize_affine_weight_gpu(w2, c.output_layer_init_method, partition_dim=1, is_expert=True)

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            if self.config.moe_router_topk != 1:
                raise ValueError("moe_apply_probs_on_input only works with moe_router_topk=1")
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        probs = probs.unsqueeze(-1)
        if x.shape[0] > 0 and self.uses_grouped_mm(x):
            offs = self._offsets(tokens_per_expert, x.device)
            h = torch._grouped_mm(x.contiguous(), self.fc1_weight.transpose(-2, -1), offs=offs)
            h = self._activation(h, probs)
            out = torch._grouped_mm(h, self.fc2_weight.transpose(-2, -1), offs=offs)
            return _ContiguousGrad.apply(out), None
        counts = tokens_per_expert.tolist()  # what SequentialMLP does (a host sync if on the GPU)
        outs = []
        for i, (xi, pi) in enumerate(zip(torch.split(x, counts), torch.split(probs, counts))):
            hi = self._activation(torch.matmul(xi, self.fc1_weight[i].t()), pi)
            outs.append(torch.matmul(hi, self.fc2_weight[i].t()))
        return torch.cat(outs, dim=0), None

    def uses_grouped_mm(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` on ``x`` takes the grouped-GEMM path (a layer with tokens)."""
        if self.impl != "auto":
            return self.impl == "grouped_mm"
        return (
            hasattr(torch, "_grouped_mm")
            and x.is_cuda
            and x.dtype == torch.bfloat16
            and self.fc1_weight.dtype == torch.bfloat16
            and _cuda_capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) >= (9, 0)
        )

    @staticmethod
    def _offsets(tokens_per_expert: torch.Tensor, device: torch.device) -> torch.Tensor:
        """int32 end offsets of the groups on ``device``, without waiting on the device."""
        offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        if offs.device != device:
            if device.type == "cuda":
                offs = offs.pin_memory()
            offs = offs.to(device, non_blocking=True)
        return offs

    def _activation(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """megatron MLP's unfused activation (GLU with its clamp and offset), times the router
        probability in the probability dtype, back to the activation dtype. With the config's
        ``bias_activation_fusion`` (``model.kernel_fusion``), one compiled kernel on CUDA."""
        c = self.config
        if c.gated_linear_unit:
            fn = fusions.compiled(fusions.glu_times_probs) if c.bias_activation_fusion and fusions.compiles(h) else fusions.glu_times_probs
            return fn(h, probs, c.activation_func, c.activation_func_clamp_value, c.glu_linear_offset)
        a = c.activation_func(h)
        return (a * probs).to(a.dtype)

    def backward_dw(self):
        """Nothing deferred (MoELayer calls this on every experts module)."""

    # ------------------------------------------------------------------------------------------
    # Distributed checkpoint: SequentialMLP's entries
    # ------------------------------------------------------------------------------------------

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = bool(metadata.get("singleton_local_shards", False))
        e_local = self.num_local_experts
        e_first = self.ep_group.rank() * e_local
        e_global = self.ep_group.size() * e_local
        tp_rank, dp_rank = self.tp_group.rank(), self.dp_group.rank()
        out = {}
        for pname, sub, _ in _PARAMS:
            out[f"{prefix}{pname}"] = ShardedTensorFactory(
                f"{prefix}experts.{sub}.weight",
                getattr(self, pname),
                functools.partial(self._build_expert_shards, sub=sub, sharded_offsets=sharded_offsets, metadata=metadata),
                _merge_expert_shards,
                (0, 0, dp_rank),  # SequentialMLP's: TP-sharded, replicated over the expert-DP group
            )
        for i in range(e_local):
            g = e_first + i
            for _, sub, _ in _PARAMS:
                key = f"{prefix}experts.{g}.{sub}._extra_state" if singleton else f"{prefix}experts.{sub}._extra_state"
                offsets = sharded_offsets if singleton else (*sharded_offsets, (len(sharded_offsets), g, e_global))
                out[f"{prefix}local_experts.{i}.{sub}._extra_state"] = make_sharded_object_for_checkpoint(
                    None, key, offsets, replica_id=(0, tp_rank, dp_rank)
                )
        return out

    @torch.no_grad()
    def _build_expert_shards(self, key: str, t: torch.Tensor, replica_id, flattened_range, *, sub: str, sharded_offsets: tuple, metadata: dict):
        """One global expert at a time, the ShardedTensors SequentialMLP's expert ``i`` writes for
        ``sub`` (built by the same megatron helpers). ``key`` ends in ``experts.<sub>.weight``; it
        may carry an optimizer prefix and the layer prefix megatron rewrote after the call."""
        if flattened_range is not None:
            raise NotImplementedError("grouped-GEMM experts do not support the fully_sharded_model_space optimizer format; use dp_reshardable")
        singleton = bool(metadata.get("singleton_local_shards", False))
        tp_axis = dict((s, a) for _, s, a in _PARAMS)[sub]
        e_local = self.num_local_experts
        e_first = self.ep_group.rank() * e_local
        e_global = self.ep_group.size() * e_local
        stem = key[: -len(f"{sub}.weight")]
        shards = []
        for i in range(e_local):
            g = e_first + i
            if singleton:
                k, offsets = f"{stem}{g}.{sub}.weight", sharded_offsets
            else:
                k, offsets = key, (*sharded_offsets, (len(sharded_offsets), g, e_global))
            sh = make_tp_sharded_tensor_for_checkpoint(
                t[i], k, tp_axis, replica_id=replica_id, prepend_offsets=offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]
            )
            if sub == "linear_fc1" and self.config.gated_linear_unit:
                sh = apply_swiglu_sharded_factory(sh, offsets, singleton).build()  # [gate_r, up_r]
            shards.append(sh)
        return shards


def _merge_expert_shards(loaded: List) -> torch.Tensor:
    """Inverse of ``_build_expert_shards``: per expert a tensor, or its [gate, up] pair."""
    return torch.stack([torch.cat(x) if isinstance(x, (list, tuple)) else x for x in loaded])


# ----------------------------------------------------------------------------------------------
# Module state dict under SequentialMLP's names
# ----------------------------------------------------------------------------------------------


def _per_expert_state_dict(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    """Replace the stacked entries by per-expert views (``keep_vars`` is respected: a view of the
    parameter or of its detached tensor) and SequentialMLP's ``_extra_state`` entries."""
    stacked = {pname: state_dict.pop(f"{prefix}{pname}") for pname, _, _ in _PARAMS if f"{prefix}{pname}" in state_dict}
    if not stacked:
        return
    for i in range(module.num_local_experts):
        for pname, sub, _ in _PARAMS:
            if pname in stacked:
                state_dict[f"{prefix}local_experts.{i}.{sub}.weight"] = stacked[pname][i]
                state_dict[f"{prefix}local_experts.{i}.{sub}._extra_state"] = None


def _stack_per_expert_state_dict(module: GroupedExperts, state_dict: dict, prefix: str, *args) -> None:
    """Accept SequentialMLP's names: stack ``local_experts.{i}.<sub>.weight`` into the stacked entry
    and drop the ``_extra_state`` entries. Stacked names pass through unchanged. An incomplete set
    of experts is left alone, so that a strict load reports it."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}local_experts.") and k.endswith("._extra_state")]:
        del state_dict[key]
    for pname, sub, _ in _PARAMS:
        keys = [f"{prefix}local_experts.{i}.{sub}.weight" for i in range(module.num_local_experts)]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{pname}"] = torch.stack([state_dict.pop(k) for k in keys])
