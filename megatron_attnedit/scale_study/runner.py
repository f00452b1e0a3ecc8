"""Steps of the study as subprocesses: one log per step, one line per step, timings, several at once.

A training step's wall time is split from its output, timestamped line by line as it arrives:
start-up (process start, imports, building the models, reading the teacher, the datasets' index)
until the loop's "starting at iteration" line; training until the last "iter N/N" line; the rest
(checkpoint save, exit). Those start-ups repeat for every stage, so they are reported apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

from megatron_attnedit.children import die_with_parent
from megatron_attnedit.errors import StepFailed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_MARK = "starting at iteration"
ITER_MARK = "iter "




class Runner:
    def __init__(self, out_dir: str, prefix: str = "study"):
        self.logs = os.path.join(out_dir, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.prefix = prefix
        self.times: Dict[str, dict] = {}
        self.t0 = time.time()
        self._lock = threading.Lock()

    def say(self, line: str) -> None:
        with self._lock:
            print(f"[{self.prefix} {time.time() - self.t0:6.0f}s] {line}", flush=True)

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
                    PYTHONUNBUFFERED="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", **(extra or {}))

    def __call__(self, name: str, cmd: List[str], env: Optional[Dict[str, str]] = None) -> dict:
        """Run ``cmd``; returns (and records) {wall_s, startup_s, train_s, finish_s} (the last three for
        training runs). A non-zero exit raises StepFailed after printing the log's tail."""
        log = os.path.join(self.logs, f"{name}.log")
        self.say(f"{name} ...")
        start = time.time()
        marks: Dict[str, float] = {}
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1, errors="replace", preexec_fn=die_with_parent)
            for line in proc.stdout:
                now = time.time()
                f.write(line)
                if START_MARK in line and "started" not in marks:
                    marks["started"] = now
                elif line.startswith(ITER_MARK):
                    marks["last_iter"] = now
            rc = proc.wait()
        end = time.time()
        rec = {"wall_s": round(end - start, 1)}
        if "started" in marks:
            rec["startup_s"] = round(marks["started"] - start, 1)
            if "last_iter" in marks:
                rec["train_s"] = round(marks["last_iter"] - marks["started"], 1)
                rec["finish_s"] = round(end - marks["last_iter"], 1)
        with self._lock:
            self.times[name] = rec
        if rc != 0:
            with open(log) as fh:
                tail = fh.read().splitlines()[-15:]
            with self._lock:
                print("\n".join("    " + line for line in tail), file=sys.stderr, flush=True)
            raise StepFailed(f"{name} failed (exit {rc}); full output in {log}")
        detail = "".join(f", {k[:-2]} {rec[k]:.0f}s" for k in ("startup_s", "train_s", "finish_s") if k in rec)
        self.say(f"{name} done in {rec['wall_s']:.0f}s{detail}")
        return rec

    def record(self, name: str, seconds: float) -> None:
        """A step that ran in this process (the data phase)."""
        with self._lock:
            self.times[name] = {"wall_s": round(seconds, 1)}
        self.say(f"{name} done in {seconds:.0f}s")
