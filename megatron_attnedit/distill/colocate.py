"""Teacher and student on the same ranks, with the same TP/PP/EP layout, sharing frozen weights.

The teacher is built and loaded like any model, then frozen (eval mode, ``requires_grad=False``).
The student is built by the attention target (``models.student.build_student``) and initialised
from the teacher (``init_student_from_teacher``). Then every student module that

* lies outside the attention (``self_attention`` is always the student's own), and
* holds no trainable parameter, and
* has exactly the teacher's structure and values (same class, names, shapes, dtypes, tensors)

is replaced by the teacher's module object: the student's attribute points at the teacher's
module, the student's own copy is freed. Embedding, norms, MLP/MoE, the final norm and the
output layer then exist once in memory -- what lets a 30B teacher and its student share a node.
Sharing is decided by value equality, so it can never change what the student computes.

When a stage trains those modules (stage 2 with ``trainable="all"``) nothing is shared: the
student keeps the copies ``build_student`` made. Megatron's DDP and optimizer only see parameters
with ``requires_grad``, so shared (frozen) teacher weights get no gradient buffer and no optimizer
state. Tied embeddings: the output layer uses the (shared, frozen) word embedding; under PP the
last stage's copy is a separate frozen parameter whose gradient is None, which megatron's
embedding all-reduce skips.

The MLP/MoE modules -- most of the weights -- are not even built twice: with ``"attention"`` and
a student config equal to the teacher's, the student's layers are built around the teacher's MLP
objects (``build_student(borrow_mlp_from=teacher)``). Embedding, output layer and norms are built,
initialised from the teacher and then shared as above, so building holds only those twice for a
moment.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Dict, Iterable, List, Optional

import torch

from megatron_attnedit.convert import hf_io
from megatron_attnedit.errors import ConfigError
from megatron_attnedit.families.table import ModelTable
from megatron_attnedit.models import builder
from megatron_attnedit.models.layers import local_layers
from megatron_attnedit.targets import get_target
from megatron_attnedit.targets.student import build_student, capture_attention_inputs, init_student_from_teacher
from megatron_attnedit.training import objective as obj
from megatron_attnedit.training.data import calibration_tokens as read_calibration_tokens

TRAINABLE_SETS = ("attention", "all")
_NEVER_SHARED = "self_attention"


@dataclasses.dataclass
class Colocated:
    """This rank's teacher and student, and what they share."""

    teacher: torch.nn.Module
    student: torch.nn.Module
    shared: List[str]  # student module paths that are the teacher's module objects
    trainable: str  # "attention" | "all"
    vocab_size: Optional[int] = None  # the real (unpadded) vocabulary size, for the losses
    fingerprint: Optional[torch.Tensor] = None  # of the shared weights, taken when they were shared

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def shared_fingerprint(self) -> Optional[torch.Tensor]:
        """A float64 checksum per shared module (one pass over the shared weights)."""
        if not self.shared:
            return None
        s = _unwrap(self.student)
        sums = [torch.stack([t.detach().double().sum() for t in _tensors(s.get_submodule(path))]).sum() for path in self.shared]
        return torch.stack(sums)

    def check_shared_unchanged(self) -> None:
        """A checkpoint loaded into the student writes into the weights it shares with the teacher
        (they are the same tensors). From a checkpoint of this pairing that writes equal values;
        from one where those weights trained (``trainable: all``) it would silently change the
        teacher -- refuse that with one line."""
        if self.fingerprint is None:
            return
        now = self.shared_fingerprint()
        changed = [p for p, a, b in zip(self.shared, self.fingerprint.tolist(), now.tolist()) if a != b]
        if changed:
            raise ConfigError(
                f"the checkpoint loaded into the student changed weights it shares with the frozen teacher "
                f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); it was trained with more than the "
                "attention, so continue from it with objective.options.trainable=all"
            )


# ----------------------------------------------------------------------------------------------
# Building the pair
# ----------------------------------------------------------------------------------------------


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _without_recompute(opts: builder.BuildOptions) -> builder.BuildOptions:
    return dataclasses.replace(opts, recompute_granularity=None, recompute_modules=None, recompute_method=None, recompute_num_layers=None)


def build_teacher(hf_cfg: dict, opts: builder.BuildOptions, load: Callable[[torch.nn.Module], None]) -> torch.nn.Module:
    """This rank's teacher shard, filled by ``load(model)`` and frozen."""
    teacher = builder.build_model(hf_cfg, opts)
    load(teacher)
    return freeze(teacher)


def hf_loader(hf_dir: str, hf_cfg: dict, opts: builder.BuildOptions) -> Callable[[torch.nn.Module], None]:
    """A ``load`` for ``build_teacher`` reading a Hugging Face checkpoint directory."""

    def load(model):
        hf_io.load_into_model(model, hf_io.HFCheckpoint(hf_dir), ModelTable(hf_cfg, tp=opts.tensor_model_parallel_size))

    return load


def teacher_loader(cfg, hf_cfg: dict, opts: builder.BuildOptions) -> Callable[[torch.nn.Module], None]:
    """The ``load`` of the run config's teacher: HF weights from ``model.hf_dir``, or none (random
    weights) for a preset or with ``model.random_init`` -- benchmarks and plumbing tests."""
    if cfg.model.hf_dir and not cfg.model.random_init:
        return hf_loader(cfg.model.hf_dir, hf_cfg, opts)
    return lambda model: None


def colocate(
    hf_cfg: dict,
    target,
    opts: builder.BuildOptions,
    load_teacher: Callable[[torch.nn.Module], None],
    trainable: str = "attention",
    student_hf_cfg: Optional[dict] = None,
    calibration_tokens: Optional[torch.Tensor] = None,
) -> Colocated:
    """Build the teacher (loaded, frozen) and the student (initialised from it) on this rank.

    ``target`` is the attention target (``attention.targets.TargetConfig``); ``trainable`` is
    ``"attention"`` (only the target's new attention trains; everything else is shared with the
    teacher) or ``"all"`` (the student owns and trains every weight). ``student_hf_cfg`` defaults
    to the teacher's config.
    """
    if trainable not in TRAINABLE_SETS:
        raise ConfigError(f"trainable set {trainable!r} unknown; use one of {', '.join(TRAINABLE_SETS)}")
    student_hf_cfg = student_hf_cfg or hf_cfg
    check_configs(hf_cfg, student_hf_cfg)
    # The teacher never trains: no activation recomputation. (megatron's layernorm recompute would
    # also free the normalised inputs that stage 1 and the calibration take from the teacher.)
    teacher = build_teacher(hf_cfg, _without_recompute(opts), load_teacher)
    borrow = trainable == "attention" and student_hf_cfg == hf_cfg
    student = build_student(student_hf_cfg, target, opts, borrow_mlp_from=teacher if borrow else None)
    if borrow:  # a borrowed MoE layer decides its own recompute from its config, the teacher's
        moe_recompute = opts.recompute_granularity == "selective" and "moe" in (opts.recompute_modules or ())
        for layer in local_layers(student):
            if hasattr(layer.mlp, "moe_layer_recompute"):
                layer.mlp.moe_layer_recompute = moe_recompute
    check_pair(teacher, student)
    calibration = None
    if calibration_tokens is not None:
        device = next(_unwrap(teacher).parameters()).device
        calibration = capture_attention_inputs(teacher, calibration_tokens.to(device), max_tokens=calibration_tokens.numel())
    init_student_from_teacher(student, teacher, student_hf_cfg, target, calibration=calibration)
    set_trainable(student, target, trainable)  # a pipeline stage may hold no trained layer (MLA pattern G)
    shared = share_frozen_modules(teacher, student) if trainable == "attention" else []
    pair = Colocated(teacher=teacher, student=student, shared=shared, trainable=trainable, vocab_size=int(hf_cfg["vocab_size"]))
    pair.fingerprint = pair.shared_fingerprint()
    return pair


def check_configs(teacher_cfg: dict, student_cfg: dict) -> None:
    """Teacher and student must agree on what they exchange: vocabulary and hidden size."""
    for key, what in (("vocab_size", "vocabulary size"), ("hidden_size", "hidden size")):
        if teacher_cfg.get(key) != student_cfg.get(key):
            raise ConfigError(
                f"teacher and student {what} differ ({teacher_cfg.get(key)} vs {student_cfg.get(key)}); "
                "distillation needs the student built from the teacher's config"
            )


def check_pair(teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """The built models agree on vocabulary, hidden size and layer layout (one clear line if not)."""
    t, s = _unwrap(teacher), _unwrap(student)
    if t.vocab_size != s.vocab_size:
        raise ConfigError(
            f"teacher and student vocabulary size differ ({t.vocab_size} vs {s.vocab_size}); "
            "distillation needs the student built from the teacher's config"
        )
    if t.config.hidden_size != s.config.hidden_size:
        raise ConfigError(
            f"teacher and student hidden size differ ({t.config.hidden_size} vs {s.config.hidden_size}); "
            "distillation needs the student built from the teacher's config"
        )
    n_t, n_s = len(local_layers(t)), len(local_layers(s))
    if n_t != n_s:
        raise ConfigError(
            f"teacher and student hold {n_t} vs {n_s} layers on this rank; "
            "build both with the same layer count and pipeline layout"
        )


def set_trainable(student: torch.nn.Module, target, trainable: str) -> List[torch.nn.Parameter]:
    """requires_grad on the student: the target's attention parameters (and everything for "all").
    Returns the attention parameters."""
    s = _unwrap(student)
    attention: Dict[int, torch.nn.Parameter] = {}
    for layer in local_layers(s):
        for p in _params(get_target(target.name).trainable_attention_params(layer)):
            attention[id(p)] = p
    for p in s.parameters():
        p.requires_grad_(trainable == "all" or id(p) in attention)
    return list(attention.values())


def share_frozen_modules(teacher: torch.nn.Module, student: torch.nn.Module) -> List[str]:
    """Point every shareable student module at the teacher's (see the module docstring)."""
    shared: List[str] = []
    _share(_unwrap(teacher), _unwrap(student), "", shared)
    return shared


def _share(t: torch.nn.Module, s: torch.nn.Module, prefix: str, shared: List[str]) -> None:
    for name, s_child in list(s.named_children()):
        t_child = getattr(t, name, None)
        if name == _NEVER_SHARED or not isinstance(t_child, torch.nn.Module):
            continue
        path = f"{prefix}{name}"
        if s_child is t_child:  # borrowed at build time
            shared.append(path)
        elif _identical_frozen(t_child, s_child):
            setattr(s, name, t_child)
            shared.append(path)
        else:
            _share(t_child, s_child, path + ".", shared)


def _identical_frozen(t: torch.nn.Module, s: torch.nn.Module) -> bool:
    if type(t) is not type(s) or any(p.requires_grad for p in s.parameters()):
        return False
    # any module containing the attention is never shared as a whole
    if any(n.split(".")[-1] == _NEVER_SHARED for n, _ in s.named_modules()):
        return False
    ts, ss = t.state_dict(keep_vars=True), s.state_dict(keep_vars=True)
    ts = {k: v for k, v in ts.items() if isinstance(v, torch.Tensor)}
    ss = {k: v for k, v in ss.items() if isinstance(v, torch.Tensor)}
    if not ss or ts.keys() != ss.keys():
        return False
    return all(ts[k].shape == ss[k].shape and ts[k].dtype == ss[k].dtype and torch.equal(ts[k], ss[k]) for k in ss)


def build_pair(cfg, plat, trainable: str = "attention") -> Colocated:
    """The co-located pair described by a run config: teacher = ``cfg.model`` (HF weights from
    ``model.hf_dir``, random for a preset or with ``model.random_init``), student = ``cfg.target``."""
    if not cfg.target.name:
        raise ConfigError("distillation needs a student attention target: set target.name (e.g. mla, gate_swa)")
    hf = obj.hf_config(cfg)
    opts = obj.build_options(cfg, plat)
    target = cfg.target
    _warn_if_nothing_to_learn(target, cfg.data.seq_length, hf)
    n_calib = get_target(target.name).calibration_tokens(hf, target.options)
    calib = None
    # A student that starts from a checkpoint (stage 2 after stage 1) is initialised only to be overwritten.
    if n_calib and cfg.data.data_path and not cfg.checkpoint.pretrained_checkpoint:
        calib = read_calibration_tokens(list(cfg.data.data_path), n_calib, cfg.data.seq_length)
    return colocate(hf, target, opts, teacher_loader(cfg, hf, opts), trainable=trainable, calibration_tokens=calib)


# ----------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------


def storages(*models: torch.nn.Module) -> set:
    """Unique storages (data pointers) of all parameters and buffers of ``models``."""
    out = set()
    for m in models:
        for t in list(m.parameters()) + list(m.buffers()):
            out.add(t.untyped_storage().data_ptr())
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model (GPTModel / HybridModel) inside megatron wrappers (DDP, Float16Module)."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def _tensors(module: torch.nn.Module) -> List[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def _params(items: Iterable) -> Iterable[torch.nn.Parameter]:
    """Accept parameters or (name, parameter) pairs."""
    for x in items:
        yield x[1] if isinstance(x, tuple) else x


def _warn_if_nothing_to_learn(target, seq_length: int, hf_cfg: dict) -> None:
    """What the target says is worth knowing before training at ``seq_length`` (GateSWA on sequences
    no longer than its window learns nothing: allowed -- benchmarks time it -- but said once, on rank 0)."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    for line in get_target(target.name).run_warnings(hf_cfg, target.options, seq_length):
        print(f"warning: {line}", file=sys.stderr, flush=True)
