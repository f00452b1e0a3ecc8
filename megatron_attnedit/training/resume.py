"""Which checkpoint a run resumes from, and whether a checkpoint fits the run that wants to load it.

Decided before anything is loaded, so that a refusal is one line and nothing is overwritten:

* a checkpoint directory with iterations but no ``latest_checkpointed_iteration.txt`` is refused
  (a run started there from iteration 0 would overwrite them one save at a time);
* the iteration named there is taken when its manifest (training/manifest.py) says it is complete,
  else the newest complete older one, and the iterations passed over are named in one line;
* a checkpoint whose attention target or model shape differs from the run's, or one saved at
  another TP/PP/EP than the run's (the distributed optimizer's state cannot move between them), is
  refused naming what it holds, what the run has and what to do.

Functions here are local (no collectives); training/checkpoint.py runs them on rank 0 and shares
the outcome.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Tuple

from megatron_attnedit.errors import CheckpointError, ConfigError
from megatron_attnedit.training import manifest

LATEST = "latest_checkpointed_iteration.txt"
# HF config fields that fix the shapes of a checkpoint's tensors
SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                "vocab_size", "num_experts", "moe_intermediate_size", "tie_word_embeddings")


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def iterations(root: str) -> List[int]:
    """The iterations that have a directory ``iter_XXXXXXX`` in ``root`` (no ``.tmp``), ascending."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(int(n[5:]) for n in names if n.startswith("iter_") and n[5:].isdigit() and os.path.isdir(os.path.join(root, n)))


def read_latest(root: str) -> Optional[int]:
    """The iteration written in ``root``'s latest file; None when there is no readable number."""
    try:
        text = open(os.path.join(root, LATEST)).read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@dataclasses.dataclass
class ResumePoint:
    iteration: int
    path: str
    skipped: List[Tuple[int, str]]  # newer iterations passed over, with why

    def note(self) -> Optional[str]:
        if not self.skipped:
            return None
        passed = "; ".join(f"{os.path.basename(iter_dir('', it))}: {why}" for it, why in self.skipped)
        return f"warning: skipped {passed} -- resuming from {self.path}, the newest complete checkpoint"


def _names(its: List[int]) -> str:
    shown = [os.path.basename(iter_dir("", i)) for i in its[-4:]]
    return ", ".join(shown) if len(its) <= 4 else f"{len(its)} iterations up to {shown[-1]}"


def refuse_unnamed_iterations(root: str, role: str) -> None:
    """A directory holding iterations without a latest file: refused (see the module docstring)."""
    its = iterations(root)
    if its and not os.path.isfile(os.path.join(root, LATEST)):
        raise CheckpointError(
            f"{role} {root} holds checkpoints ({_names(its)}) but no {LATEST}, so which one to resume is unknown and a new run "
            f"would overwrite them; recreate it with the iteration to resume (echo {its[-1]} > {os.path.join(root, LATEST)}), "
            "or choose a new checkpoint directory (training.run_dir or checkpoint.save)")


def choose(root: str) -> Optional[ResumePoint]:
    """Where a run resuming from ``root`` starts; None when ``root`` holds no checkpoint."""
    if not os.path.isdir(root):
        return None
    refuse_unnamed_iterations(root, "checkpoint directory")
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    its = iterations(root)
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text[:40]!r}, not an iteration number; write the iteration to resume into it "
                              f"({_names(its) or 'no iterations here'}), or choose a new checkpoint directory")
    latest, skipped = int(text), []
    for it in [latest] + [i for i in reversed(its) if i < latest]:
        why = manifest.problem(iter_dir(root, it))
        if why is None:
            return ResumePoint(it, iter_dir(root, it), skipped)
        skipped.append((it, why))
    listed = "; ".join(f"{os.path.basename(iter_dir('', it))}: {why}" for it, why in skipped)
    raise CheckpointError(f"no complete checkpoint in {root} ({listed}); restore the damaged files, or use another checkpoint "
                          "directory (training.run_dir or checkpoint.save to start afresh)")


# ------------------------------------------------------------------------------------------------
# Does a checkpoint fit this run?
# ------------------------------------------------------------------------------------------------


def describe_target(name: Optional[str]) -> str:
    return f"target {name}" if name else "the teacher's own attention (no target)"


def check_model(meta: Optional[dict], where: str, cfg, hf: dict, pretrained: bool) -> None:
    """``meta`` (the converters' metadata of a checkpoint) describes the model this run trains:
    the same attention target and the same tensor shapes. ``pretrained``: loaded for its weights
    (checkpoint.pretrained_checkpoint), else resumed."""
    if not meta:
        return  # written before the metadata travelled in training checkpoints: nothing to compare
    have, want = meta.get("target"), cfg.target.name
    if have != want:
        if pretrained:
            todo = (f"point checkpoint.pretrained_checkpoint at a checkpoint of {describe_target(want)} (stage 2 starts from "
                    "stage 1 of the same target; the teacher comes from model.hf_dir)")
        else:
            todo = f"resume with target.name={have or 'null'}, or train {describe_target(want)} in a new training.run_dir / checkpoint.save"
        raise ConfigError(f"{where} holds a model with {describe_target(have)} and this run trains {describe_target(want)}; {todo}")
    saved_hf = meta.get("hf_config") or {}
    diff = [f"{k} {saved_hf[k]} vs {hf[k]}" for k in SHAPE_FIELDS if k in saved_hf and k in hf and saved_hf[k] != hf[k]]
    if diff:
        raise ConfigError(f"{where} holds a model of another shape than this run's ({', '.join(diff)}; checkpoint vs model.hf_dir/"
                          "preset with model.overrides); use the model it was trained from, or another checkpoint")


def option_diff(meta: Optional[dict], cfg) -> str:
    """'; its target options differ: ...' when the checkpoint's target options are not the run's."""
    have = (meta or {}).get("target_options")
    if have is None:
        return ""
    want = dict(cfg.target.options)
    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    return f"; its target options differ from this run's: {', '.join(f'{k} {have.get(k)} vs {want.get(k)}' for k in keys)}" if keys else ""


def check_layout(layout: dict, where: str, root: str, cfg) -> None:
    """A resume keeps TP, PP and EP: the distributed optimizer's state is laid out for them (a
    resume at another data-parallel size is fine)."""
    p = cfg.parallel
    names = ("TP", "PP", "EP")
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")
    saved = tuple(layout.get(k) for k in keys)
    run = tuple(getattr(p, k) for k in keys)
    if None in saved or saved == run:
        return
    fmt = lambda sizes: ", ".join(f"{n}={s}" for n, s in zip(names, sizes))  # noqa: E731
    raise ConfigError(
        f"{where} was saved at {fmt(saved)} and this run has {fmt(run)}: megatron reshards the model weights but not the "
        f"distributed optimizer's state to another TP/PP/EP; resume with {' '.join(f'parallel.{k}={s}' for k, s in zip(keys, saved))}, "
        f"or start a new run (another training.run_dir) from its weights with checkpoint.pretrained_checkpoint={root} "
        "(optimizer and data position start fresh)")
