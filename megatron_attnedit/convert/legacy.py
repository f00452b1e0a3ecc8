"""Legacy per-rank megatron checkpoints (``--ckpt-format torch``), as Megatron-LM and
MindSpeed-LLM tools read them.

``iter_0000000/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` holds ``{'model': module state dict
of that rank, 'checkpoint_version': 3.0, 'iteration': 0, 'args': Namespace(...)}``: layer and
expert indices local to the rank's pipeline stage / expert-parallel rank, tensors TP-sharded,
``_extra_state`` entries present (None for the local spec) so that a strict
``load_state_dict`` accepts it. Unlike torch_dist this format is bound to its layout.

Memory: the writer builds one rank's state dict at a time (so one rank's share of the model is
in memory at once, not the whole model); each full parameter is materialised, sharded, and
dropped. The reader memory-maps every rank file and assembles one parameter at a time; mapped
pages it has touched count in RSS until the reader is closed (they are page cache, not copies).
"""

from __future__ import annotations

import os
import re
from typing import Callable, Dict, Optional, Tuple

import torch

from megatron_attnedit import families
from megatron_attnedit.convert.checkpoint import ATTNEDIT_KEY, legacy_rank_dir, legacy_rank_files, safe_load
from megatron_attnedit.convert.checks import check_dtype, check_shape
from megatron_attnedit.convert.layout import ModelLayout
from megatron_attnedit.convert.outdir import torch_save
from megatron_attnedit.errors import CheckpointError
from megatron_attnedit.families import mapping

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")


class RankMap:
    """Where a global (TP=PP=EP=1) name lives in a TP/PP/EP layout, and under which local name."""

    def __init__(self, cfg: dict, tp: int, pp: int, ep: int, num_experts: int):
        self.tp, self.pp, self.ep = tp, pp, ep
        self.layers_per_stage = cfg["num_hidden_layers"] // pp
        self.experts_per_rank = num_experts // ep if num_experts else 0
        self.tied = bool(cfg.get("tie_word_embeddings", False))

    def place(self, name: str) -> Tuple[int, Optional[int], str]:
        """(pipeline stage, expert-parallel rank or None when every EP rank holds it, local name)."""
        m = _LAYER.match(name)
        if not m:
            stage = 0 if name.startswith("embedding.") else self.pp - 1
            return stage, None, name
        layer, rest = int(m.group(1)), m.group(2)
        stage, local_layer = divmod(layer, self.layers_per_stage)
        e = _EXPERT.match(rest)
        ep_rank = None
        if e:
            ep_rank, local_e = divmod(int(e.group(2)), self.experts_per_rank)
            rest = f"{e.group(1)}{local_e}{e.group(3)}"
        return stage, ep_rank, f"decoder.layers.{local_layer}.{rest}"

    def ranks(self):
        for pp_rank in range(self.pp):
            for ep_rank in range(self.ep):
                for tp_rank in range(self.tp):
                    yield tp_rank, pp_rank, ep_rank

    def dir_name(self, tp_rank, pp_rank, ep_rank) -> str:
        return legacy_rank_dir(tp_rank, pp_rank, ep_rank, self.pp, self.ep)


def total_bytes(layout: ModelLayout, table, rank_map: RankMap, dtype_of: Dict[str, torch.dtype]) -> int:
    """Bytes of tensor data ``write`` produces (TP-replicated and EP-duplicated tensors counted per copy)."""
    total = 0
    for name, shape in layout.params.items():
        rule, _, _ = table.rule_for(name)
        _, owner, _ = rank_map.place(name)
        n = torch.Size(shape).numel() * dtype_of[name].itemsize
        copies = (rank_map.tp if rule.tp_split is None else 1) * (rank_map.ep if owner is None else 1)
        total += n * copies
    return total


def write(
    iter_dir: str,
    layout: ModelLayout,
    table,
    rank_map: RankMap,
    materialize: Callable[[str], torch.Tensor],
    header: dict,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:
    """One ``model_optim_rng.pt`` per (TP, PP, EP) rank; ``header`` holds args/iteration/metadata."""
    names = list(layout.params) + layout.extra_state
    for tp_rank, pp_rank, ep_rank in rank_map.ranks():
        sd: Dict[str, object] = {}
        for name in names:
            stage, owner, local = rank_map.place(name)
            if stage != pp_rank or (owner is not None and owner != ep_rank):
                continue
            if name.endswith("_extra_state"):
                sd[local] = None
                continue
            rule, _, _ = table.rule_for(name)
            full = materialize(name)
            shard = _own_storage(mapping.tp_shard(rule, full, tp_rank, rank_map.tp))
            del full
            sd[local] = shard
            on_bytes(shard.numel() * shard.element_size())
        if rank_map.tied and rank_map.pp > 1 and pp_rank == rank_map.pp - 1:
            # the last stage keeps its own copy of the tied embedding as the output layer
            rule, _, _ = table.rule_for("embedding.word_embeddings.weight")
            sd["output_layer.weight"] = _own_storage(mapping.tp_shard(rule, materialize("embedding.word_embeddings.weight"), tp_rank, rank_map.tp))
        d = os.path.join(iter_dir, rank_map.dir_name(tp_rank, pp_rank, ep_rank))
        os.makedirs(d, exist_ok=True)
        torch_save(dict(header, model=sd), os.path.join(d, "model_optim_rng.pt"))
        del sd


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage: give each shard its own
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t


class LegacyReader:
    """Assembles full TP=1 parameters from the rank files of a legacy checkpoint."""

    def __init__(self, iter_dir: str, meta: dict, table, allow_pickle: bool = False):
        cfg = meta["hf_config"]
        self.map = RankMap(cfg, meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"],
                           meta["expert_model_parallel_size"], families.num_experts(cfg))
        self.table = table
        self.dir = iter_dir
        files = legacy_rank_files(iter_dir)
        want = {self.map.dir_name(*r): r for r in self.map.ranks()}
        missing = sorted(set(want) - set(files))
        if missing:
            raise CheckpointError(f"{iter_dir} lacks {missing[0]}/model_optim_rng.pt (TP/PP/EP {self.map.tp}/{self.map.pp}/{self.map.ep}); the checkpoint is incomplete")
        self.states: Dict[Tuple[int, int, int], dict] = {}
        for d, r in want.items():
            if not os.path.isfile(files[d]):
                raise CheckpointError(f"{files[d]} is missing; the checkpoint is incomplete")
            state = safe_load(files[d], allow_pickle, mmap=True)
            if ATTNEDIT_KEY not in state or "model" not in state:
                raise CheckpointError(f"{files[d]} is not a rank file written by this project (no '{ATTNEDIT_KEY}' / 'model')")
            self.states[r] = state["model"]

    def _get(self, r: Tuple[int, int, int], local: str, name: str) -> torch.Tensor:
        sd = self.states[r]
        if local not in sd:
            raise CheckpointError(f"{self.dir}/{self.map.dir_name(*r)} has no {local} (global {name}); the checkpoint does not match its config")
        return sd[local]

    def file_of(self, name: str) -> str:
        stage, owner, _ = self.map.place(name)
        return os.path.join(self.dir, self.map.dir_name(0, stage, owner or 0), "model_optim_rng.pt")

    def dtype(self, name: str) -> torch.dtype:
        stage, owner, local = self.map.place(name)
        return self._get((0, stage, owner or 0), local, name).dtype

    def read(self, name: str) -> torch.Tensor:
        """The full parameter: TP shards concatenated (replicated ones: TP rank 0's copy)."""
        rule, _, _ = self.table.rule_for(name)
        stage, owner, local = self.map.place(name)
        shards = []
        for tp_rank in range(self.map.tp):
            r = (tp_rank, stage, owner or 0)
            shards.append(self._get(r, local, name))
        return mapping.tp_unshard(rule, shards)

    def check(self, layout: ModelLayout) -> None:
        """Each rank file holds exactly the entries its part of the model has (``_extra_state``
        entries may be absent), before anything is converted."""
        want: Dict[Tuple[int, int, int], set] = {r: set() for r in self.states}
        for name in list(layout.params) + layout.extra_state:
            stage, owner, local = self.map.place(name)
            for r in want:
                if r[1] == stage and (owner is None or owner == r[2]):
                    want[r].add(local)
        if self.map.tied and self.map.pp > 1:
            for r in want:
                if r[1] == self.map.pp - 1:
                    want[r].add("output_layer.weight")  # the last stage's copy of the tied embedding
        for r, sd in self.states.items():
            where = f"{self.dir}/{self.map.dir_name(*r)}"
            missing = sorted(k for k in want[r] - set(sd) if not k.endswith("_extra_state"))
            extra = sorted(set(sd) - want[r])
            if missing:
                raise CheckpointError(f"{where} lacks {', '.join(missing[:3])}; the checkpoint does not match its config")
            if extra:
                raise CheckpointError(f"{where} holds {', '.join(extra[:3])}, which the model from its config does not have; does the config match?")
        self._check_shards(layout)

    def _check_shards(self, layout: ModelLayout) -> None:
        """Every stored shard has a weight dtype and the shape its TP rank's share of the parameter
        has (a transposed shard included), from the mapped files' headers before anything is written."""
        for name, shape in layout.params.items():
            rule, _, _ = self.table.rule_for(name)
            stage, owner, local = self.map.place(name)
            full = torch.empty(shape, device="meta")
            for tp_rank in range(self.map.tp):
                r = (tp_rank, stage, owner or 0)
                t = self._get(r, local, name)
                where = os.path.join(self.dir, self.map.dir_name(*r), "model_optim_rng.pt")
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{where} holds a {type(t).__name__} as {local}; the file is damaged or not written by this project")
                check_dtype(t.dtype, local, where)
                check_shape(tuple(t.shape), tuple(mapping.tp_shard(rule, full, tp_rank, self.map.tp).shape), local, where,
                            implied_by=f"its stored config at TP rank {tp_rank} of {self.map.tp}")

    def close(self) -> None:
        self.states.clear()
