"""Megatron checkpoint directories: layout on disk, our metadata, and loading into a model.

A save directory is laid out as Megatron-LM does::

    SAVE/latest_checkpointed_iteration.txt      "0" (written last)
    SAVE/iter_0000000/                          torch_dist: metadata.json common.pt .metadata *.distcp
                                                (megatron-core >= 0.17's own save: no common.pt, the
                                                same state as a common_state entry in the .distcp)
                                                torch:      mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt
    SAVE/iter_0000000/hf_assets/                config.json, generation_config.json, tokenizer files

Our metadata (``ATTNEDIT_KEY``) travels inside the checkpoint -- in the common state for torch_dist,
in every rank file for the legacy format -- so a checkpoint converts back to HF with no other
input: the HF config, the model family, the attention ``target`` (None for the teacher), the
padded vocabulary and the parallel layout it was written for.

Training code uses ``save_mcore_checkpoint`` / ``load_mcore_checkpoint_into_model`` /
``read_checkpoint_metadata``; the converters use the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from typing import Optional, Tuple

import torch

from megatron_attnedit import families
from megatron_attnedit.convert.hf_io import reason
from megatron_attnedit.errors import CheckpointError

ATTNEDIT_KEY = "attnedit"
TRACKER = "latest_checkpointed_iteration.txt"
ASSETS = "hf_assets"
FORMAT_VERSION = 1
# What the HF side needs besides weights; carried through the megatron checkpoint unchanged.
HF_ASSET_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "chat_template.jinja",
    "chat_template.json",
)
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def legacy_rank_dir(tp_rank: int, pp_rank: int, ep_rank: int, pp: int, ep: int) -> str:
    """Megatron-LM's ``get_checkpoint_name``: the PP part only when PP > 1, the EP part only when EP > 1."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp > 1:
        name += f"_{pp_rank:03d}"
    if ep > 1:
        name += f"_{ep_rank:03d}"
    return name


def conversion_metadata(cfg: dict, tp: int, pp: int, ep: int, padded_vocab: int, ckpt_format: str, dtype: torch.dtype, target=None) -> dict:
    families.check_hf_config(cfg)
    return {
        "format_version": FORMAT_VERSION,
        "model_family": families.family_of(cfg).model_type,
        "target": target,  # None: the teacher's own attention; else the attention target's name
        "hf_config": cfg,
        "padded_vocab_size": int(padded_vocab),
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "expert_model_parallel_size": ep,
        "ckpt_format": ckpt_format,
        "dtype": str(dtype).replace("torch.", ""),
    }


def megatron_args(meta: dict) -> argparse.Namespace:
    """The ``args`` Megatron-LM stores in a checkpoint (and reads with --use-checkpoint-args)."""

    cfg = meta["hf_config"]
    dtype = getattr(torch, meta["dtype"])
    moe = any(families.moe_layer_pattern(cfg))
    ns = argparse.Namespace(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_attention_heads"],
        group_query_attention=cfg["num_key_value_heads"] != cfg["num_attention_heads"],
        num_query_groups=cfg["num_key_value_heads"],
        kv_channels=families.head_dim(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        seq_length=int(cfg.get("max_position_embeddings", 4096)),
        position_embedding_type="rope",
        rotary_base=int(families.rope_theta(cfg)),
        rotary_percent=1.0,
        normalization="RMSNorm",
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        swiglu=True,
        qk_layernorm=families.family_of(cfg).qk_norm,
        add_bias_linear=False,
        add_qkv_bias=bool(cfg.get("attention_bias", False)),
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        vocab_size=cfg["vocab_size"],
        padded_vocab_size=meta["padded_vocab_size"],
        make_vocab_size_divisible_by=128,
        tokenizer_type="HuggingFaceTokenizer",
        tensor_model_parallel_size=meta["tensor_model_parallel_size"],
        pipeline_model_parallel_size=meta["pipeline_model_parallel_size"],
        expert_model_parallel_size=meta["expert_model_parallel_size"],
        expert_tensor_parallel_size=meta["tensor_model_parallel_size"],
        num_experts=families.num_experts(cfg) if moe else None,
        moe_router_topk=int(cfg["num_experts_per_tok"]) if moe else None,
        moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]) if moe else None,
        moe_layer_freq=families.moe_layer_pattern(cfg) if moe else 1,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        ckpt_format=meta["ckpt_format"],
        use_dist_ckpt=meta["ckpt_format"] == "torch_dist",
        iteration=0,
        consumed_train_samples=0,
        consumed_valid_samples=0,
    )
    return ns


# --------------------------------------------------------------------------------------------
# Finding and reading a checkpoint
# --------------------------------------------------------------------------------------------


def _is_iter_dir(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "metadata.json")) or any(_RANK_DIR.match(x) for x in _listdir(d))


def _listdir(d: str):
    try:
        return os.listdir(d)
    except OSError:
        return []


def resolve_iter_dir(load_dir: str) -> Tuple[str, Optional[int]]:
    """(iteration directory, iteration) of a save directory (through its tracker file) or of an
    iteration directory given directly."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"{load_dir} is not a directory; --load-dir must be a megatron checkpoint directory")
    if _is_iter_dir(load_dir):
        m = re.match(r"^iter_(\d+)$", os.path.basename(os.path.normpath(load_dir)))
        return load_dir, int(m.group(1)) if m else None
    tracker = os.path.join(load_dir, TRACKER)
    if not os.path.isfile(tracker):
        raise CheckpointError(f"{load_dir} has no {TRACKER} and is not an iteration directory; is it a megatron checkpoint?")
    with open(tracker, errors="replace") as f:
        text = f.read().strip()
    if text == "release":
        it_dir, it = os.path.join(load_dir, "release"), None
    else:
        try:
            it = int(text)
        except ValueError:
            raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number") from None
        it_dir = os.path.join(load_dir, iter_dir_name(it))
    if not os.path.isdir(it_dir) or not _is_iter_dir(it_dir):
        raise CheckpointError(f"{tracker} points at {it_dir}, which is missing or incomplete")
    return it_dir, it


def detect_format(iter_dir: str) -> str:
    md = os.path.join(iter_dir, "metadata.json")
    if os.path.isfile(md):
        try:
            with open(md) as f:
                backend = json.load(f).get("sharded_backend")
        except (ValueError, AttributeError):
            raise CheckpointError(f"{md} is damaged (not a JSON mapping); re-copy the checkpoint or save it again") from None
        if backend != "torch_dist":
            raise CheckpointError(f"{iter_dir} is a {backend!r} distributed checkpoint; only torch_dist is supported")
        return "torch_dist"
    if any(_RANK_DIR.match(x) for x in _listdir(iter_dir)):
        return "torch"
    raise CheckpointError(f"{iter_dir} is neither a torch_dist nor a legacy (mp_rank_*) megatron checkpoint")


def safe_load(path, allow_pickle: bool = False, mmap: bool = False, label: Optional[str] = None):
    """torch.load that unpickles only tensors, containers and argparse.Namespace unless allowed.
    ``path``: a file name, or a binary file object named by ``label`` in messages."""
    label = label or path
    try:
        if allow_pickle:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except __import__("pickle").UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{label} holds Python objects beyond tensors ({first[:120]}); pass --allow-pickle if you trust the source"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        # a truncated or damaged archive (zip reader, unpickling errors); a missing file is checked by callers
        raise CheckpointError(
            f"cannot read {label} ({reason(e)}); "
            "the file is damaged or truncated: re-copy the checkpoint or save it again"
        ) from None


# megatron-core >= 0.17 saves the non-tensor state as this object inside the torch_dist checkpoint
# (ShardedObject("common_state", ..., (1,), (0,)).unique_key), no longer as common.pt.
COMMON_STATE_KEY = "common_state/shard_0_1"


def read_common_state(iter_dir: str, allow_pickle: bool = False) -> dict:
    """The non-tensor state of a torch_dist checkpoint: ``common.pt`` (megatron-core 0.16's save and
    this project's converter, loadable by every supported megatron-core) or, failing that, the
    ``common_state`` object that megatron-core >= 0.17's save stores among the tensors. Unpickled
    as ``safe_load`` does (never through DCP's own loader, which unpickles anything)."""
    common = os.path.join(iter_dir, "common.pt")
    if os.path.isfile(common):
        return safe_load(common, allow_pickle)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.utils import _create_file_view

    incomplete = f"{iter_dir} has neither common.pt nor a common_state entry; the checkpoint is incomplete"
    if not os.path.isfile(os.path.join(iter_dir, ".metadata")):
        raise CheckpointError(incomplete)
    try:
        storage = FileSystemReader(iter_dir).read_metadata().storage_data
    except Exception as e:  # a truncated or overwritten pickle: EOFError, UnpicklingError, ...
        raise CheckpointError(f"cannot read {iter_dir}/.metadata ({reason(e)}); the file is damaged: re-copy the checkpoint or save it again") from None
    info = next((v for k, v in storage.items() if k.fqn == COMMON_STATE_KEY), None)
    if info is None:
        raise CheckpointError(incomplete)
    path = os.path.join(iter_dir, info.relative_path)
    if not os.path.isfile(path) or os.path.getsize(path) < info.offset + info.length:
        raise CheckpointError(f"{path} is missing or truncated (it holds the checkpoint's common state); re-copy the checkpoint or save it again")
    with open(path, "rb") as f:
        state = safe_load(_create_file_view(f, info.offset, info.length), allow_pickle, label=f"the common state in {path}")
    if not (isinstance(state, list) and len(state) == 1):
        raise CheckpointError(f"the common state in {path} is not one object; the file is damaged: re-copy the checkpoint or save it again")
    return state[0]


def legacy_rank_files(iter_dir: str) -> dict:
    """{(tp, pp, ep): path} of a legacy checkpoint, the layout taken from a rank file's args."""
    dirs = sorted(x for x in _listdir(iter_dir) if _RANK_DIR.match(x))
    return {d: os.path.join(iter_dir, d, "model_optim_rng.pt") for d in dirs}


def read_checkpoint_metadata(load_dir: str, allow_pickle: bool = False) -> dict:
    """Our metadata of a megatron checkpoint, plus ``format``, ``iter_dir``, ``iteration`` and
    ``hf_assets_dir`` (None when the checkpoint carries no HF files)."""
    iter_dir, it = resolve_iter_dir(load_dir)
    fmt = detect_format(iter_dir)
    if fmt == "torch_dist":
        state = read_common_state(iter_dir, allow_pickle)
    else:
        files = legacy_rank_files(iter_dir)
        first = files[sorted(files)[0]]
        if not os.path.isfile(first):
            raise CheckpointError(f"{first} is missing; the checkpoint is incomplete")
        state = safe_load(first, allow_pickle, mmap=True)
    meta = state.get(ATTNEDIT_KEY) if isinstance(state, dict) else None
    if not meta:
        raise CheckpointError(
            f"{iter_dir} carries no megatron-attnedit metadata ('{ATTNEDIT_KEY}' in common.pt / rank files); "
            "it was not written by this project's converter or save_mcore_checkpoint"
        )
    meta = dict(meta)
    if not isinstance(meta.get("hf_config"), dict) or not all(
        isinstance(meta.get(k), int) for k in ("padded_vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")
    ):
        raise CheckpointError(f"{iter_dir}: its megatron-attnedit metadata lacks the HF config or the vocabulary / parallel sizes; it is damaged")
    assets = os.path.join(iter_dir, ASSETS)
    meta.update(format=fmt, iter_dir=iter_dir, iteration=it if it is not None else state.get("iteration"),
                hf_assets_dir=assets if os.path.isdir(assets) else None)
    return meta


# --------------------------------------------------------------------------------------------
# Training-side save / load (megatron's own dist_checkpointing)
# --------------------------------------------------------------------------------------------


def copy_hf_assets(src_dir: Optional[str], iter_dir: str) -> None:
    if not src_dir or not os.path.isdir(src_dir):
        return
    dst = os.path.join(iter_dir, ASSETS)
    os.makedirs(dst, exist_ok=True)
    for name in HF_ASSET_FILES:
        p = os.path.join(src_dir, name)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(dst, name))


def save_mcore_checkpoint(model, save_dir: str, meta: dict, iteration: int = 0, hf_assets_dir: Optional[str] = None) -> str:
    """Save ``model`` (this rank's model) as a torch_dist checkpoint with megatron's own
    ``dist_checkpointing.save``, our metadata in common.pt; collective over all ranks.
    Returns the iteration directory. (No ``args`` Namespace in common.pt: megatron's load
    unpickles it with ``weights_only`` and would refuse it.)"""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    iter_dir = os.path.join(save_dir, iter_dir_name(iteration))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        os.makedirs(iter_dir, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    meta = {k: v for k, v in meta.items() if k not in ("format", "iter_dir", "iteration", "hf_assets_dir")}
    meta["ckpt_format"] = "torch_dist"
    state = {
        "model": model.sharded_state_dict(),
        "checkpoint_version": 3.0,
        "iteration": iteration,
        ATTNEDIT_KEY: meta,
    }
    dist_checkpointing.save(state, iter_dir)
    if rank == 0:
        copy_hf_assets(hf_assets_dir, iter_dir)
        with open(os.path.join(save_dir, TRACKER), "w") as f:
            f.write(str(iteration))
    if dist.is_initialized():
        dist.barrier()
    return iter_dir


def load_mcore_checkpoint_into_model(model, load_dir: str, strict: bool = True, allow_pickle: bool = False) -> dict:
    """Fill this rank's megatron model from a checkpoint of either format; returns the metadata.

    torch_dist loads at any TP/PP/EP through megatron's ``dist_checkpointing.load`` of
    ``model.sharded_state_dict()``. The legacy format is bound to the layout it was written
    for: each rank reads its own ``mp_rank_*`` file.
    """
    from megatron.core import dist_checkpointing, parallel_state

    meta = read_checkpoint_metadata(load_dir, allow_pickle)
    if meta["format"] == "torch_dist":
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, meta["iter_dir"])
        model.load_state_dict(loaded["model"], strict=strict)
        return meta
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    want = (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"], meta["expert_model_parallel_size"])
    if (tp, pp, ep) != want:
        raise CheckpointError(
            f"legacy checkpoint written for TP/PP/EP={want[0]}/{want[1]}/{want[2]}, model built at {tp}/{pp}/{ep}; "
            "legacy checkpoints are layout-bound: convert again with those sizes or use --ckpt-format torch_dist"
        )
    name = legacy_rank_dir(parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(),
                           parallel_state.get_expert_model_parallel_rank(), pp, ep)
    state = safe_load(os.path.join(meta["iter_dir"], name, "model_optim_rng.pt"), allow_pickle)
    from megatron_attnedit.models.layers import from_gpt_layout

    model.load_state_dict(from_gpt_layout(model, state["model"]), strict=strict)  # written in GPTModel's names
    return meta
