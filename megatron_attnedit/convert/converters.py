"""HF <-> megatron checkpoint conversion, end to end (the CLIs in checkpoints_tools/ are thin
wrappers over ``hf_to_mcore`` and ``mcore_to_hf``).

Both directions stream one parameter at a time and check everything they can before writing a
byte: the config (model type, parallel sizes, vocabulary rows), the input files (missing shards,
truncation, damaged headers, pickle), key coverage both ways (every HF tensor consumed, every
megatron parameter produced), and every tensor's shape and dtype against the config
(``checks.py``); values (NaN / Inf) are checked per tensor as it streams. Output goes to a hidden
sibling directory renamed into place at the end, so an error or an interrupt never leaves
anything that looks like a checkpoint; ``--overwrite`` replaces only what the same tool wrote
(``outdir.py``).

Single process, CPU; megatron is initialised at TP=PP=EP=1 here only to read the model's
checkpoint layout off a meta-device build (see ``layout.py``).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import sys
import time
from typing import Optional

import torch

from megatron_attnedit import families, platform, targets
from megatron_attnedit.convert import checkpoint as ckpt_dirs
from megatron_attnedit.convert import checks, dist_ckpt, legacy, students
from megatron_attnedit.convert.dist_ckpt import ChunkReader
from megatron_attnedit.convert.gguf_export import GGUF_NAME, check_gguf_supported, hf_to_gguf
from megatron_attnedit.convert.hf_io import HFCheckpoint, check_hf_inputs
from megatron_attnedit.convert.hf_writer import (  # noqa: F401  (parse_dtype: used by cli)
    ShardedSafetensorsWriter,
    declared_dtype,
    parse_dtype,
    parse_size,
    write_hf_config_files,
)
from megatron_attnedit.convert.layout import check_table_covers, model_layout, ordered_params
from megatron_attnedit.convert.legacy import LegacyReader
from megatron_attnedit.convert.outdir import atomic_output_dir, check_output_dir, dir_bytes, sweep_stale
from megatron_attnedit.errors import CheckpointError, ConfigError
from megatron_attnedit.families import mapping
from megatron_attnedit.families.table import ModelTable, padded_vocab_size
from megatron_attnedit.models import builder

CKPT_FORMATS = ("torch_dist", "torch")
# HF entries a Qwen3 checkpoint may carry that hold no weights of their own
_IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass
class Report:
    direction: str
    out_dir: str
    bytes_written: int
    seconds: float
    rss_before: int  # peak RSS before the first tensor was read (imports, torch, megatron, planning)
    rss_peak: int
    largest_tensor: int  # bytes of the largest single tensor converted

    def line(self) -> str:
        gb = self.bytes_written / 1e9
        return (
            f"{self.direction}: wrote {gb:.3f} GB to {self.out_dir} in {self.seconds:.2f} s "
            f"({gb / max(self.seconds, 1e-9):.3f} GB/s); peak RSS {self.rss_peak / 1e9:.3f} GB "
            f"({self.rss_before / 1e9:.3f} GB before streaming; largest tensor {self.largest_tensor / 1e9:.3f} GB)"
        )


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Shared set-up
# --------------------------------------------------------------------------------------------


def ensure_megatron_single_process() -> None:
    """CPU platform and megatron parallel state at TP=PP=EP=1, unless already set up so."""

    plat = platform._ACTIVE or platform.init_platform("cpu")  # a caller's platform choice stands
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        platform.init_distributed(plat, 1, 1, 1)
    if parallel_state.get_tensor_model_parallel_world_size() != 1 or parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("conversion runs in a single process (megatron initialised at TP=PP=1)")


def prepare_output(save_dir: str, overwrite: bool, tool: str, source: str) -> None:
    """Clear what runs killed outright left beside ``save_dir`` (one stderr line each), then
    refuse an output that is not ours to replace (``outdir``)."""
    for note in sweep_stale(save_dir):
        print(f"note: {note}", file=sys.stderr, flush=True)
    check_output_dir(save_dir, overwrite, tool, sources=[source])


def check_hf_keys(ckpt: HFCheckpoint, table) -> None:
    """Every HF tensor is consumed by the table and every table entry is in the checkpoint."""
    want = set(table.hf_names())
    have = set(ckpt.keys())
    tied = bool(table.cfg.get("tie_word_embeddings"))
    # a tied checkpoint may still store lm_head (a copy of the embedding): the embedding is the source
    extra = sorted(k for k in have - want if not k.endswith(_IGNORABLE_SUFFIXES) and not (tied and k == "lm_head.weight"))
    missing = sorted(want - have)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{ckpt.dir} lacks tensor(s) {', '.join(missing[:3])}{more} that a {table.cfg['model_type']} model needs; is config.json right for these weights?")
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise CheckpointError(f"{ckpt.dir} holds tensor(s) {', '.join(extra[:3])}{more} that no conversion rule consumes; is config.json right for these weights?")


def _table(cfg: dict, tp: int, padded_vocab: Optional[int] = None):
    table = ModelTable(cfg, tp=tp)
    if padded_vocab is not None:
        table.shapes = dataclasses.replace(table.shapes, padded_vocab_size=int(padded_vocab))
    return table


# --------------------------------------------------------------------------------------------
# HF -> megatron
# --------------------------------------------------------------------------------------------

# transforms that only place HF tensors one after another along dim 0 (then zero padding)
_PLACEMENTS = ("copy", "vocab", "gate_up")


def read_megatron_tensor(ckpt: HFCheckpoint, rule, hf_names, shapes, shape, dtype) -> torch.Tensor:
    """``mapping.to_megatron`` of the HF tensors, with one copy in memory where the transform is a
    placement (copy, vocabulary padding, [gate; up]): the HF tensors are read straight into their
    rows of the result. Other transforms (qkv interleaving) read the inputs, then transform."""
    infos = [ckpt.info(h) for h in hf_names]
    if rule.transform in _PLACEMENTS and len(shape) > 0 and all(d == dtype for d, _ in infos):
        out = torch.empty(shape, dtype=dtype)
        row = 0
        for h, (_, s) in zip(hf_names, infos):
            ckpt.get(h, out=out[row : row + s[0]])
            row += s[0]
        out[row:].zero_()  # padded vocabulary rows, as to_megatron pads
        return out
    return mapping.to_megatron(rule, [ckpt.get(h) for h in hf_names], shapes).to(dtype)


def hf_to_mcore(
    hf_dir: str,
    save_dir: str,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    ckpt_format: str = "torch_dist",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> Report:
    """Convert an HF Qwen3 / Qwen3-MoE checkpoint into a megatron checkpoint (see checkpoint.py for
    the layout). torch_dist is layout-free (TP/PP/EP are validated and recorded; TP also sets the
    vocabulary padding); torch writes one file per TP/PP/EP rank."""

    t0 = time.time()
    tp, pp, ep = tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
    if ckpt_format not in CKPT_FORMATS:
        raise ConfigError(f"unknown --ckpt-format {ckpt_format!r}; use torch_dist or torch")
    prepare_output(save_dir, overwrite, "hf_to_mcore", hf_dir)
    cfg = families.load_hf_config(hf_dir)
    builder.check_parallel(cfg, tp, pp, ep)
    ckpt = HFCheckpoint(hf_dir, allow_pickle=allow_pickle)
    table = _table(cfg, tp)
    check_hf_keys(ckpt, table)

    ensure_megatron_single_process()
    layout = model_layout(cfg, table.shapes.padded_vocab_size)
    check_table_covers(layout, table)
    entries = ordered_params(layout, table)
    dtype_of = {}
    for name, hf_names, rule in entries:
        check_hf_inputs(ckpt, table, rule, hf_names, layout.params[name])
        dtype_of[name] = ckpt.info(hf_names[0])[0]
    largest = max(torch.Size(s).numel() * d.itemsize for d, s in map(ckpt.info, table.hf_names()))

    def materialize(name: str) -> torch.Tensor:
        rule, layer, expert = table.rule_for(name)
        _, hf_names = rule.format(layer, expert)
        return read_megatron_tensor(ckpt, rule, hf_names, table.shapes, layout.params[name], dtype_of[name])

    meta = ckpt_dirs.conversion_metadata(cfg, tp, pp, ep, table.shapes.padded_vocab_size, ckpt_format, dtype_of[entries[0][0]])
    # common.pt (torch_dist) must unpickle under torch.load's weights_only default, which megatron's
    # own load uses: no argparse.Namespace there. Legacy rank files carry Megatron-LM's ``args``.
    header = {"checkpoint_version": 3.0, "iteration": 0, ckpt_dirs.ATTNEDIT_KEY: meta}
    if ckpt_format == "torch":
        header["args"] = ckpt_dirs.megatron_args(meta)
    rss_before = peak_rss()
    with atomic_output_dir(save_dir, "hf_to_mcore") as tmp:
        iter_dir = os.path.join(tmp, ckpt_dirs.iter_dir_name(0))
        if ckpt_format == "torch_dist":
            total = sum(torch.Size(layout.params[n]).numel() * dtype_of[n].itemsize for n, _, _ in entries)
            with _progress(total, "hf_to_mcore", progress) as bar:
                dist_ckpt.write(iter_dir, layout, [n for n, _, _ in entries], dtype_of.__getitem__, materialize, header, bar.update)
        else:
            rank_map = legacy.RankMap(cfg, tp, pp, ep, families.num_experts(cfg))
            with _progress(legacy.total_bytes(layout, table, rank_map, dtype_of), "hf_to_mcore", progress) as bar:
                legacy.write(iter_dir, layout, table, rank_map, materialize, header, bar.update)
        ckpt_dirs.copy_hf_assets(hf_dir, iter_dir)
        with open(os.path.join(tmp, ckpt_dirs.TRACKER), "w") as f:
            f.write("0")  # written last: its presence means the checkpoint is complete
        written = dir_bytes(tmp)
    return Report("hf_to_mcore", save_dir, written, time.time() - t0, rss_before, peak_rss(), largest)


# --------------------------------------------------------------------------------------------
# megatron -> HF
# --------------------------------------------------------------------------------------------


def mcore_to_hf(
    load_dir: str,
    save_dir: str,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    dtype: Optional[torch.dtype] = None,
    allow_pickle: bool = False,
    progress: bool = True,
    gguf: bool = False,
) -> Report:
    """Convert a megatron checkpoint (either format, any layout) written by ``hf_to_mcore`` or
    ``checkpoint.save_mcore_checkpoint`` into a sharded HF safetensors checkpoint.

    Every tensor is written in one dtype, the one config.json declares: ``dtype`` when given, else
    the dtype the stored (teacher's) config declares -- a student trained in float32 from a
    bfloat16 teacher exports in bfloat16, as the teacher was published -- else the stored dtype of
    the embedding."""

    t0 = time.time()
    max_bytes = parse_size(max_shard_size)
    prepare_output(save_dir, overwrite, "mcore_to_hf", load_dir)
    meta = ckpt_dirs.read_checkpoint_metadata(load_dir, allow_pickle)
    cfg = meta["hf_config"]
    check_family_metadata(meta, load_dir)
    check_vocab_metadata(meta, load_dir)
    # A student (the metadata names an attention target) exports in its target's HF format.

    student = students.student_export(meta, load_dir)
    if gguf:
        # the tokenizer comes from the HF files the checkpoint carries ("": it carries none)
        check_gguf_supported(cfg if student is None else student.hf_config, load_dir, tokenizer_dir=meta["hf_assets_dir"] or "")
    if student is None:
        table = _table(cfg, meta["tensor_model_parallel_size"], meta["padded_vocab_size"])
    else:
        table = student.table
        table.shapes = dataclasses.replace(table.shapes, padded_vocab_size=int(meta["padded_vocab_size"]))

    ensure_megatron_single_process()
    layout = model_layout(cfg, meta["padded_vocab_size"], None if student is None else student.target)
    check_table_covers(layout, table)
    entries = ordered_params(layout, table)
    if meta["format"] == "torch_dist":
        dist_reader = ChunkReader(meta["iter_dir"])
        stored = list(dist_reader.metadata.state_dict_metadata)
        checks_of_layout = (dist_reader.check, dist_reader.check_no_leftovers)
        read = lambda n: dist_reader.read(layout.chunks[n], layout.params[n])  # noqa: E731
        src_dtype = lambda n: dist_reader.dtype(layout.chunks[n])  # noqa: E731
        file_of = lambda n: dist_reader.file_of(layout.chunks[n])  # noqa: E731
        reader = None
    else:
        reader = LegacyReader(meta["iter_dir"], meta, table, allow_pickle)
        stored = [k for sd in reader.states.values() for k in sd]
        checks_of_layout = (reader.check,)
        read, src_dtype, file_of = reader.read, reader.dtype, reader.file_of
    try:
        for check in checks_of_layout:
            check(layout)
    except CheckpointError as e:
        raise _explain_mismatch(e, load_dir, student, students.student_weights_hint(stored)) from None

    dtype = dtype or declared_dtype(cfg, load_dir) or src_dtype(entries[0][0])
    plan = []
    for name, hf_names, rule in entries:
        for h, shape in zip(hf_names, mapping.hf_shapes_of(rule, table.shapes, layout.params[name])):
            plan.append((h, shape, dtype))
    transform = (student.transform if student else None) or (lambda h, t: t)
    zeros = [(h, shape, dtype) for h, shape in (student.zero_tensors if student else [])]
    plan += zeros
    rss_before = peak_rss()
    largest = max(torch.Size(s).numel() * d.itemsize for _, s, d in plan)
    with atomic_output_dir(save_dir, "mcore_to_hf") as tmp:
        writer = ShardedSafetensorsWriter(tmp, plan, max_bytes)
        try:
            with _progress(writer.total, "mcore_to_hf", progress) as bar:
                for name, hf_names, rule in entries:
                    full = read(name)
                    checks.check_tensor(full, layout.params[name], name, file_of(name), implied_by="its stored config")
                    if name == _EMBEDDING and not cfg.get("tie_word_embeddings"):
                        check_vocab_padding(full, cfg["vocab_size"], name, file_of(name))
                    for h, t in zip(hf_names, mapping.to_hf(rule, full, table.shapes)):
                        t = transform(h, t)
                        t = t.to(dtype)
                        writer.add(h, t)
                        bar.update(t.numel() * t.element_size())
                        del t
                    del full
                for h, shape, d in zeros:
                    writer.add(h, torch.zeros(shape, dtype=d))
        finally:
            writer.abort()  # closes a shard left open by an error
            if reader is not None:
                reader.close()
        writer.close()
        write_hf_config_files(tmp, cfg if student is None else student.hf_config, meta["hf_assets_dir"], dtype)
        for path in student.code_files if student else ():
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
        if gguf:  # inside the export's directory: renamed into place with it, listed in its manifest

            hf_to_gguf(tmp, os.path.join(tmp, GGUF_NAME), dtype=dtype, progress=progress, inside_export=save_dir)
        written = dir_bytes(tmp)
    students.print_notes(student)
    return Report("mcore_to_hf", save_dir, written, time.time() - t0, rss_before, peak_rss(), largest)


_EMBEDDING = "embedding.word_embeddings.weight"


def check_family_metadata(meta: dict, load_dir: str) -> None:
    """The metadata's model family is the stored config's (checkpoints written before families were
    recorded by model_type say "qwen3" for Qwen3-MoE too)."""

    cfg, recorded = meta["hf_config"], meta.get("model_family")
    families.check_hf_config(cfg)
    mt = cfg.get("model_type")
    if recorded != mt and not (recorded == "qwen3" and mt == "qwen3_moe"):
        raise CheckpointError(
            f"{load_dir} records model family {recorded!r} but its stored config is a {mt!r} model; the metadata is inconsistent"
        )


def check_vocab_metadata(meta: dict, load_dir: str) -> None:
    """The stored config's vocab_size pads to the embedding rows the checkpoint records."""

    vocab, rows, tp = meta["hf_config"].get("vocab_size"), meta.get("padded_vocab_size"), meta.get("tensor_model_parallel_size", 1)
    if not isinstance(vocab, int) or not isinstance(rows, int) or not isinstance(tp, int) or vocab <= 0 or tp <= 0:
        raise CheckpointError(f"{load_dir}: its metadata has vocab_size {vocab!r} / padded_vocab_size {rows!r} / TP {tp!r}; it is damaged")
    if padded_vocab_size(vocab, tp) != rows:
        raise CheckpointError(
            f"{load_dir}: its stored config has vocab_size {vocab}, which pads to {padded_vocab_size(vocab, tp)} embedding rows "
            f"at TP {tp}, but the checkpoint has {rows}; the config does not match the weights: convert again from the config "
            "that came with them"
        )


def check_vocab_padding(embedding: torch.Tensor, vocab: int, name: str, where: str) -> None:
    """The embedding rows past vocab_size, which the export drops, must be padding: zeros, as the
    converter writes them (training never changes them: an untied embedding's padding rows are never
    looked up, so they get no gradient and decay stays at zero). Values there mean vocab_size is
    smaller than the vocabulary the weights were made for."""
    dropped = embedding[vocab:]
    if dropped.numel() and bool(dropped.ne(0).any()):
        used = vocab + int(dropped.ne(0).any(dim=1).nonzero().max()) + 1
        raise CheckpointError(
            f"{name} in {where} has values in rows {vocab}..{used - 1}, past the stored config's vocab_size {vocab}; "
            f"exporting would drop them: the config does not match the weights (they use at least {used} rows)"
        )


def _a(noun: str) -> str:
    return ("an " if noun[:1].upper() in "AEFHILMNORSX" else "a ") + noun  # by sound: an MLA, a GateSWA


def _explain_mismatch(err: CheckpointError, load_dir: str, student, hint) -> CheckpointError:
    """A checkpoint whose tensors do not fit the model its metadata describes: say which part of
    the metadata is at fault when that is clear (a student's weights under teacher metadata, or
    target options that do not fit the student's tensors)."""
    if student is None and hint:
        return CheckpointError(
            f"{load_dir} holds the attention weights of {_a(targets.TARGETS[hint].title if hint in targets.TARGETS else hint)} student but its metadata names no attention target "
            "(target: null); the target metadata is missing, so the student cannot be exported: save it with the training "
            "checkpointer, which records target and target_options"
        )
    if student is not None:
        return CheckpointError(
            f"{load_dir}: its target metadata ({student.target.name} {student.target.options}) does not match its weights: {err}"
        )
    return err

