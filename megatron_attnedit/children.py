"""Child processes that do not outlive the process that started them.

The benchmark and the scale study run every training, export and evaluation step as a child
process. Stopped by a time limit, the parent goes and a child it started in its own session -- or
any child, when the parent is killed with SIGKILL and nothing forwards the signal -- keeps running,
holding the GPU's memory: the next job on that GPU then runs out of it (this happened:
launch/results/bench_stacks_qwen3_30b_a3b_4l_mbs2_gbs16_mcore0.16.1_oom_h100.json).
"""

from __future__ import annotations

import signal
import sys


def die_with_parent() -> None:
    """``preexec_fn`` of ``subprocess.Popen``: the child gets SIGTERM when its parent dies, however
    it dies (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing). Runs in the child before exec. The
    signal follows the thread that forked: start the child from a thread that waits for it (the main
    thread, or a pool thread that runs the step to its end, as the scale study's chains do)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
