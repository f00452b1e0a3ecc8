"""Metrics out: one stdout line every log interval, W&B (offline by default), metrics.jsonl.

Only global rank 0 writes. W&B runs offline unless asked otherwise, so training never needs a
network; ``wandb sync <run_dir>/wandb/offline-run-*`` uploads a run later. ``read_wandb_history``
reads the logged rows back from a run's ``.wandb`` file without any network or W&B account.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
from typing import Dict, List, Optional


def format_line(iteration: int, total: int, metrics: Dict[str, float]) -> str:
    parts = [f"iter {iteration}/{total}"]
    for k, v in metrics.items():
        if k in ("lr",):
            parts.append(f"{k} {v:.3e}")
        elif k in ("tokens_per_s", "samples"):
            parts.append(f"{k} {v:,.0f}")
        elif k.startswith("mem"):
            parts.append(f"{k} {v:.2f}")
        else:
            parts.append(f"{k} {v:.5g}" if math.isfinite(v) else f"{k} {v}")
    return " | ".join(parts)


class Monitor:
    def __init__(self, cfg, rank: int):
        self.cfg, self.enabled = cfg, rank == 0
        self.run = None
        self.bar = None
        if not self.enabled:
            return
        os.makedirs(cfg.run_dir, exist_ok=True)
        self.jsonl = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a")
        m = cfg.monitor
        mode = m.wandb_mode or os.environ.get("WANDB_MODE") or "offline"
        if mode != "disabled":
            import wandb

            wandb_dir = m.wandb_save_dir or cfg.run_dir
            os.makedirs(wandb_dir, exist_ok=True)
            self.run = wandb.init(
                project=m.wandb_project,
                name=m.wandb_exp_name or cfg.name.replace("/", "-"),
                mode=mode,
                dir=wandb_dir,
                config=cfg.to_dict(),
                settings=wandb.Settings(console="off", silent=True),
            )

    def start_progress(self, start: int, total: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            # disable=None: a progress bar on terminals only; logs get the plain lines.
            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, disable=None)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def log(self, iteration: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self.print(format_line(iteration, self.cfg.training.train_iters, metrics))
        self.jsonl.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            self.run.log(metrics, step=iteration)

    def close(self, exit_code: int = 0) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


# ------------------------------------------------------------------------------------------------
# Reading an offline run back (.wandb is a LevelDB-style log of protobuf Records)
# ------------------------------------------------------------------------------------------------

_BLOCK = 32768
_HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte); records: crc32, length (2), type (1)


def _wandb_records(path: str):
    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk
        elif kind == 0 and length == 0:
            break


def read_wandb_history(run_dir: str) -> List[Dict[str, float]]:
    """The rows logged to the newest W&B run under ``run_dir`` (each with its ``_step``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(glob.glob(os.path.join(run_dir, "**", "run-*.wandb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no W&B run file under {run_dir}")
    rows = []
    for raw in _wandb_records(files[-1]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def read_metrics(run_dir: str) -> Dict[int, Dict[str, float]]:
    """metrics.jsonl of a run dir: iteration -> metrics (records of one iteration merge; after a
    resume, the later value of a metric wins)."""
    out: Dict[int, Dict[str, float]] = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        for line in open(path):
            if line.strip():
                rec = json.loads(line)
                out.setdefault(int(rec.pop("iteration")), {}).update(rec)
    return out


def memory_gb(plat) -> Optional[float]:
    try:
        return plat.max_memory_allocated() / 2**30
    except Exception:
        return None
