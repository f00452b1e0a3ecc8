"""PNG plots for the report (matplotlib, Agg backend): training curves, KV bytes vs context, loss by
position in the window and the retrieval probe against distance.

Training curves come from the run directories the training loop writes (training/monitor.py):
``metrics.jsonl`` (one JSON object per logged iteration) when present -- the plain file is
preferred -- else the newest W&B offline run under the directory (read without network or
account). A directory given to ``--run-dir`` may be one run or hold several (searched three
levels down, e.g. runs/tiny_mla/ with stage1/ and stage2/). A run is stage 1 when it logs
``stage1/layer_XX`` losses, stage 2 when it logs ``stage2/*`` terms.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Dict, List

from megatron_attnedit.errors import EvalError
from megatron_attnedit.training import monitor

CONTEXT_GRID = [2**k for k in range(8, 18)]  # 256 .. 131072


@dataclasses.dataclass
class Run:
    label: str
    path: str
    source: str  # metrics.jsonl | wandb
    rows: Dict[int, Dict[str, float]]  # iteration -> metrics

    def keys(self) -> List[str]:
        return sorted({k for r in self.rows.values() for k in r})

    def series(self, key: str):
        its = sorted(i for i, r in self.rows.items() if key in r)
        return its, [self.rows[i][key] for i in its]

    @property
    def stage(self) -> str:
        ks = self.keys()
        if any(k.startswith("stage1/layer_") for k in ks):
            return "stage1"
        if any(k.startswith("stage2/") for k in ks):
            return "stage2"
        return "other"


def find_runs(root: str, label: str = "") -> List[Run]:
    """Every run under ``root`` (itself or up to three levels down)."""

    if not os.path.isdir(root):
        raise EvalError(f"--run-dir {root} is not a directory")
    label = label or os.path.basename(os.path.normpath(root))
    dirs = []
    for depth in range(4):
        for f in sorted(glob.glob(os.path.join(root, *(["*"] * depth), "metrics.jsonl"))):
            dirs.append(os.path.dirname(f))
    runs = []
    for d in dirs:
        rel = os.path.relpath(d, root)
        runs.append(Run(label if rel == "." else f"{label}/{rel}", d, "metrics.jsonl", read_jsonl(os.path.join(d, "metrics.jsonl"))))
    if not runs:
        try:
            history = monitor.read_wandb_history(root)
        except (FileNotFoundError, ValueError):
            history = []
        rows = merge_rows((int(r.pop("_step")), r) for r in history if "_step" in r)
        if rows:
            runs.append(Run(label, root, "wandb", rows))
    runs = [r for r in runs if r.rows]
    if not runs:
        raise EvalError(f"--run-dir {root} holds no training metrics (metrics.jsonl or a W&B offline run); give a run directory (training.run_dir)")
    return runs


def merge_rows(pairs) -> Dict[int, Dict[str, float]]:
    """iteration -> metrics, merging the records of one iteration: the loop logs training and
    validation metrics as separate records at the same iteration; after a resume a repeated
    iteration's values replace the earlier ones key by key."""
    out: Dict[int, Dict[str, float]] = {}
    for it, rec in pairs:
        out.setdefault(it, {}).update(rec)
    return out


def read_jsonl(path: str) -> Dict[int, Dict[str, float]]:
    def records():
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by a killed run: skip it, the rest is good
                    continue
                if isinstance(rec, dict) and "iteration" in rec:
                    yield int(rec.pop("iteration")), rec

    return merge_rows(records())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stage1(runs: List[Run], path: str) -> None:
    """One panel per stage-1 run: each layer's normalized-MSE loss over iterations (log scale)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        layers = [k for k in run.keys() if k.startswith("stage1/layer_")]
        cmap = plt.get_cmap("viridis", max(2, len(layers)))
        for i, k in enumerate(layers):
            its, vals = run.series(k)
            ax.plot(its, vals, color=cmap(i), lw=1.2, label=k.split("/")[-1].replace("layer_", "layer "))
        ax.set_yscale("log")
        ax.set_title(f"stage 1: {run.label}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("normalized MSE (per layer)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(layers) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stage2(runs: List[Run], path: str) -> None:
    """One panel per stage-2 quantity (KL, feature, CE, total loss, validation loss), runs overlaid."""
    plt = _pyplot()
    wanted = ["stage2/kl", "stage2/feature", "stage2/ce", "loss", "val_loss"]
    keys = [k for k in wanted if any(k in r.keys() for r in runs)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for run in runs:
            its, vals = run.series(k)
            if its:
                ax.plot(its, vals, marker="." if len(its) < 30 else None, lw=1.2, label=run.label)
        ax.set_title(k)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("stage 2 (model-level distillation)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kv(models: List[dict], path: str, bytes_fn) -> None:
    """KV cache of one sequence (left) and per token (right) against context length.
    ``bytes_fn(model, context) -> whole-model bytes per token``."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for m in models:
        per_tok = [bytes_fn(m, c) for c in CONTEXT_GRID]
        style = dict(lw=2 if m["role"] == "teacher" else 1.4, ls="-" if m["role"] == "teacher" else "--", marker="o", ms=3)
        left.plot(CONTEXT_GRID, [b * c / 2**20 for b, c in zip(per_tok, CONTEXT_GRID)], label=m["name"], **style)
        line, = right.plot(CONTEXT_GRID, per_tok, label=m["name"], **style)
        kv = m["kv"]  # the measured point: cache tensors after the decode
        right.plot([kv["positions"]], [kv["measured_bytes_per_token"]], "x", color=line.get_color(), ms=9, mew=2)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("KV cache per sequence (MiB)")
    right.set_ylabel("KV bytes per token (all layers)")
    right.set_ylim(bottom=0)
    elem = models[0]["kv"]["bytes_per_elem"] if models else 2
    fig.suptitle(f"KV cache from the config formula ({elem} B per element); x: measured after the decode")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mark_windows(ax, windows: Dict[str, int]) -> None:
    for i, (name, w) in enumerate(sorted(windows.items(), key=lambda kv: kv[1])):
        ax.axvline(w, color="grey", ls=":", lw=1)
        ax.annotate(f"W={w} ({name})", (w, 1), xycoords=("data", "axes fraction"), xytext=(3, -12 - 11 * i),
                    textcoords="offset points", fontsize=7, color="dimgrey")


def plot_by_position(by_position: dict, path: str) -> None:
    """Mean loss per context bucket (left) and students' loss / the teacher's (right), against the
    bucket's upper end; sliding windows marked."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for k, (name, rows) in enumerate(by_position["models"].items()):
        xs = [r["hi"] for r in rows if r["mean_nll"] is not None]
        teacher = k == 0
        style = dict(lw=2 if teacher else 1.4, ls="-" if teacher else "--", marker="o", ms=3, label=name)
        left.plot(xs, [r["mean_nll"] for r in rows if r["mean_nll"] is not None], **style)
        if not teacher:
            right.plot([r["hi"] for r in rows if r["ratio"] is not None], [r["ratio"] for r in rows if r["ratio"] is not None], **style)
    right.axhline(1.0, color="black", lw=0.8)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens of context (bucket upper end)")
        ax.grid(alpha=0.3, which="both")
        _mark_windows(ax, by_position["windows"])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    left.set_ylabel("mean loss (nats / token)")
    right.set_ylabel("student loss / teacher loss")
    fig.suptitle(f"Loss by position in the {by_position['seq_len']}-token window (same tokens for every model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_probe(models: List[dict], probe: dict, windows: Dict[str, int], path: str) -> None:
    """Retrieval probe: exact-match (solid) and per-character accuracy (dotted) against distance;
    chance levels and sliding windows marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in models:
        rows = m["probe"]["per_distance"]
        d = [r["distance"] for r in rows]
        line, = ax.plot(d, [r["exact"] for r in rows], marker="o", ms=4, lw=2 if m["role"] == "teacher" else 1.4, label=f"{m['name']} exact")
        ax.plot(d, [r["per_char"] for r in rows], ls=":", marker=".", color=line.get_color(), label=f"{m['name']} per character")
    ax.axhline(probe["chance"]["per_char"], color="grey", lw=0.8, ls="--")
    ax.annotate("chance per character", (1, probe["chance"]["per_char"]), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                textcoords="offset points", ha="right", fontsize=7, color="dimgrey")
    _mark_windows(ax, windows)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("distance from the key to the question (tokens)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"Retrieval probe: {probe['trials']} prompts of {probe['context']} tokens per distance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
