"""Distillation throughput against its references at a real model shape; one JSON line per target.

    bash launch/bench.sh                                   # usage and defaults: see its header
    python launch/bench.py --preset qwen3-8b --layers 8 --target mla --seq 4096 --nproc 1
    python launch/bench.py --preset qwen3-debug --platform cpu --layers 2 --seq 64 --iters 4   # smoke

Random weights (a preset cut to ``--layers`` layers), random tokens. Each run is the project's own
training entry point (``python -m megatron_attnedit.train``, under torchrun when ``--nproc`` > 1) on
the same model, data and parallel layout; ``--configs`` picks which:

  lm           plain next-token CE of the student, every weight trained (the baseline training step)
  teacher_fwd  the teacher's forward alone (no_grad, eval; embedding + decoder, as stage 1 runs it:
               objective ``teacher_forward``, distill/teacher_forward.py)
  stage1       teacher forward + every trained layer's attention fwd/bwd on the teacher's activations
  stage2       teacher forward (to the logits) + student forward/backward + vocab-parallel KL

Each run's metrics.jsonl gives tokens/s per step; reported: the median over steps 3.. (the first
two warm up), step time, per-GPU model TFLOP/s and MFU, rank 0's peak memory of the training steps
(``peak_mem_GiB``) and while building teacher and student (``build_peak_mem_GiB``). Ratios of step time:
``stage2_over_lm``, ``stage1_over_teacher_fwd`` (and ``stage1_over_lm``). A run is stopped once its
last step is logged: the loop's final checkpoint is of no use here and costs minutes at 8B shape.

FLOPs per token count the matmuls a step executes (Megatron-LM's way of counting: 2 per weight per
token; attention scores QK^T and PV over the mean number of keys a query sees, (s+1)/2 causal, less
in a window; MoE layers count the router and the top-k experts only). Backward: input gradients
cost one forward, weight gradients one more -- only for weights that train (frozen linears, e.g.
the MLP and output layer in stage 2 with ``trainable: attention``, skip theirs), and none for the
projections whose input needs no gradient (kernels/wgrad.py skips those GEMMs: every stage-1
attention, stage 2's first layer); attention scores backward costs twice their forward. So lm =
3 F_student, teacher_fwd = F_teacher without the output layer, stage1 = that + 3 x (trained
attention) - their input projections, stage2 = F_teacher + 2 F_student + trained weights' share +
score backward - the first layer's input projections. MFU = per-GPU model FLOP/s over ``--peak-tflops`` (dense bf16; H100/H200:
989) -- left null where the device's peak is unknown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from megatron_attnedit.children import die_with_parent  # noqa: E402
from megatron_attnedit.targets.base import mean_keys  # noqa: E402,F401  (torch only; bench.mean_keys for tests)

RUNS = ("lm", "teacher_fwd", "stage1", "stage2")
RECIPES = {  # preset -> target -> recipe whose target section (and stage overlays) the runs use
    "qwen3-8b": {"mla": "qwen3_8b_mla", "gate_swa": "qwen3_8b_gateswa"},
    "qwen3-30b-a3b": {"mla": "qwen3_30b_a3b_mla", "gate_swa": "qwen3_30b_a3b_gateswa"},
    "qwen3-debug": {"mla": "tiny_mla", "gate_swa": "tiny_gateswa"},
    "qwen3-moe-debug": {"mla": "tiny_mla", "gate_swa": "tiny_gateswa"},
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "B200": 2250.0}


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------


def preset(name: str) -> dict:
    from megatron_attnedit import families

    return families.config_for_preset(name)


class Flops:
    """Forward FLOPs per token of the pieces of a teacher/student pair (see the module docstring);
    each attention target counts its own layers (``targets/<name>.flops``)."""

    def __init__(self, hf: dict, target: dict, seq: int):
        from megatron_attnedit import families
        from megatron_attnedit.targets import get_target
        from megatron_attnedit.targets.base import gqa_layer_flops

        h, L = hf["hidden_size"], hf["num_hidden_layers"]
        self.out = 2 * h * hf["vocab_size"]
        moe, E = families.moe_layer_pattern(hf), families.num_experts(hf)
        self.mlp = [2 * h * E + hf.get("num_experts_per_tok", 0) * 6 * h * hf.get("moe_intermediate_size", 0) if m
                    else 6 * h * hf["intermediate_size"] for m in moe]
        teacher = gqa_layer_flops(hf, seq)
        self.t_proj, self.t_score = [teacher.proj] * L, [teacher.score] * L
        layers = get_target(target["name"]).flops(hf, target.get("options", {}), seq)
        self.s_proj, self.s_score = [x.proj for x in layers], [x.score for x in layers]
        self.s_input, self.trained = [x.input for x in layers], [x.trained for x in layers]

    def per_token(self, trainable: str = "attention", teacher_logits: bool = False) -> Dict[str, float]:
        """Per run; ``teacher_logits``: the teacher_fwd run goes through the output layer too."""
        t_dec = sum(self.t_proj) + sum(self.t_score) + sum(self.mlp)
        s_linear = sum(self.s_proj) + sum(self.mlp) + self.out
        s_score = sum(self.s_score)
        trained_attn = sum(p for p, t in zip(self.s_proj, self.trained) if t)
        weight_grads = s_linear if trainable == "all" else trained_attn
        # no input gradient where nothing upstream trains: stage 1's attentions read the teacher's
        # detached states; stage 2's first layer reads the frozen embedding (trainable: attention)
        first_dgrad = 0 if trainable == "all" else self.s_input[0]
        return {
            "lm": 3 * (s_linear + s_score),
            "teacher_fwd": t_dec + (self.out if teacher_logits else 0),
            "stage1": t_dec + sum(3 * (p + s) - i for p, s, i, t in zip(self.s_proj, self.s_score, self.s_input, self.trained) if t),
            "stage2": t_dec + self.out + (s_linear + s_score) + s_linear - first_dgrad + weight_grads + 2 * s_score,
        }


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------


def make_data(work: str, vocab: int, seq: int, n_docs: int) -> tuple:
    """Random-token indexed dataset + a tiny SentencePiece model (only its EOS id is used)."""
    import numpy as np
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(work, exist_ok=True)
    prefix = os.path.join(work, "random_tokens")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(n_docs):
        builder.add_document(torch.from_numpy(rng.integers(3, vocab, size=seq + 1, dtype=np.int32)), [seq + 1])
    builder.finalize(prefix + ".idx")
    text = os.path.join(work, "sp.txt")
    with open(text, "w") as f:
        for i in range(2000):
            f.write(" ".join(f"w{(i * 7 + j) % 97}" for j in range(20)) + "\n")
    spm.SentencePieceTrainer.train(input=text, model_prefix=os.path.join(work, "sp"), vocab_size=64, minloglevel=2)
    return prefix, os.path.join(work, "sp.model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip().endswith("}")]


_RUNNING: List[subprocess.Popen] = []
"""The training run in flight: stopped with the benchmark (``_stop_runs``)."""


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """Stop a run and its workers (its own session): SIGTERM, then SIGKILL after ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
        return
    except ProcessLookupError:  # already gone
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _stop_runs(signum, frame) -> None:
    """SIGTERM / SIGINT (a time limit, Ctrl-C): stop the run in flight with its workers, then exit."""
    for proc in _RUNNING:
        if proc.poll() is None:
            _stop(proc, grace_s=30)
    sys.exit(128 + signum)


def launch(name: str, args: List[str], run_dir: str, iters: int, nproc: int) -> dict:
    """One training run; stopped once its last step is logged. Returns the parsed step rows or an error."""
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    train = ["-m", "megatron_attnedit.train", *args]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", *train]
    else:
        cmd = [sys.executable, *train]
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    metrics, log_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "output.log")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent)  # a run in its own session dies with the benchmark
        _RUNNING[:] = [proc]
        stopped = False
        while proc.poll() is None:
            if any(r.get("iteration") == iters for r in _rows(metrics)):
                _stop(proc, grace_s=60)
                stopped = True
                break
            time.sleep(0.5)
    wall = round(time.time() - t0, 1)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    rows = [r for r in _rows(metrics) if "tokens_per_s" in r]
    if not stopped and (proc.returncode != 0 or len(rows) < iters):
        with open(log_path) as f:
            return {"error": f.read()[-3000:], "wall_s": wall}
    with open(log_path) as f:
        built = re.search(r"([0-9.]+) GiB peak memory while building", f.read())
    return {"rows": rows, "wall_s": wall, "build_peak_mem_GiB": float(built.group(1)) if built else None}


def summarize(rows: List[dict], tokens_per_step: int, flops_per_token: float, nproc: int, peak_tflops: Optional[float]) -> dict:
    timed = rows[2:] if len(rows) > 3 else rows[-1:]
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    tflops = tps * flops_per_token / nproc / 1e12
    return {
        "tokens_per_s": round(tps, 1),
        "tokens_per_s_per_gpu": round(tps / nproc, 1),
        "step_time_s": round(tokens_per_step / tps, 4),
        "model_tflops_per_gpu": float(f"{tflops:.4g}"),
        "mfu": round(tflops / peak_tflops, 4) if peak_tflops else None,
        "peak_mem_GiB": round(max(r.get("mem_gb") or 0.0 for r in rows), 2),
        "flops_per_token": flops_per_token,
        "loss_first_last": [rows[0].get("loss"), rows[-1].get("loss")],
        "timed_steps": len(timed),
    }


def device_name(platform: str) -> str:
    """Asked in a child process: CUDA initialised here would hold memory on GPU 0 during the runs."""
    if platform != "cuda":
        return platform
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"], capture_output=True, text=True)
    return out.stdout.strip() or "cuda (unknown)"


def default_peak(device: str) -> Optional[float]:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3-8b", choices=sorted(RECIPES))
    ap.add_argument("--layers", type=int, default=8, help="decoder layers kept of the preset")
    ap.add_argument("--target", default="mla", help="mla, gate_swa, or both comma-separated (one JSON line each)")
    ap.add_argument("--recipe", default=None, help="recipe for the target section and stage overlays (default: the preset's)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--gbs", type=int, default=4)
    ap.add_argument("--iters", type=int, default=8, help="steps per run; the median of steps 3.. is reported")
    ap.add_argument("--configs", default=",".join(RUNS), help=f"runs, comma-separated, of {', '.join(RUNS)}")
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs); > 1 runs under torchrun")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size (sequence parallel on when > 1)")
    ap.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE presets)")
    ap.add_argument("--platform", default="cuda", choices=["cuda", "npu", "cpu"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per device (default: by device name)")
    ap.add_argument("--work", default="/tmp/attnedit_bench")
    ap.add_argument("--profile", action="store_true", help="profile steps 3-4 of each run (tables in <work>/<run>/profile/)")
    ap.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="override for every run")
    for r in RUNS:
        ap.add_argument(f"--set-{r}", dest=f"set_{r}", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=f"override for {r} only")
    a = ap.parse_args(argv)
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in a.configs if c not in RUNS]
    if bad or not a.configs:
        ap.error(f"--configs {','.join(bad) or '(empty)'}: choose from {', '.join(RUNS)}")
    a.targets = [t.strip() for t in a.target.split(",") if t.strip()]
    if any(t not in ("mla", "gate_swa") for t in a.targets):
        ap.error(f"--target {a.target}: use mla, gate_swa or mla,gate_swa")
    if a.nproc % a.tp:
        ap.error(f"--tp {a.tp} must divide --nproc {a.nproc}")
    if a.gbs % (a.mbs * (a.nproc // a.tp)):
        ap.error(f"--gbs {a.gbs} must be a multiple of micro batch x data-parallel size ({a.mbs} x {a.nproc // a.tp})")
    return a


def run_settings(a, recipe: str, name: str, prefix: str, sp: str) -> tuple:
    """(stage, --set list) of one run; validated by loading the config here first."""
    from megatron_attnedit.config import load_config

    stage = {"lm": None, "teacher_fwd": None, "stage1": "stage1", "stage2": "stage2"}[name]
    sets = [
        "model.hf_dir=null", f"model.preset={a.preset}", f"model.overrides={{num_hidden_layers: {a.layers}}}",
        f"parallel.tensor_model_parallel_size={a.tp}", "parallel.pipeline_model_parallel_size=1",
        f"parallel.expert_model_parallel_size={a.ep}", f"parallel.sequence_parallel={str(a.tp > 1).lower()}",
        f"data.data_path=[{prefix}]", f"data.tokenizer_dir={sp}", f"data.seq_length={a.seq}", 'data.split="100,0,0"',
        f"data.micro_batch_size={a.mbs}", f"data.global_batch_size={a.gbs}",
        f"training.train_iters={a.iters}", "training.log_interval=1", "training.eval_interval=0", f"training.platform={a.platform}",
        # the recipe's warmup and peak lr over a schedule far longer than the run: the logged losses are
        # those of a real run's first steps (with a one-step warmup to peak lr the 48-layer 30B-A3B
        # stage-1 loss went 0.158 -> 16.0 in five steps on random weights)
        "optimizer.lr_decay_iters=1000000", "checkpoint.save_interval=0", "monitor.wandb_mode=disabled", "checkpoint.pretrained_checkpoint=null",
    ]
    sets += {"lm": ["objective.name=lm"], "teacher_fwd": ["objective.name=teacher_forward"]}.get(name, [])
    if a.profile:
        sets.append("training.profile_steps=[3,4]")
    sets += a.sets + getattr(a, f"set_{name}")
    cfg = load_config(recipe, sets, stage)
    return stage, sets, cfg


def software() -> Dict[str, str]:
    """The stack that ran: Python, torch, megatron-core and the model class it builds."""
    import platform as _platform

    import torch

    from megatron_attnedit import compat

    return {"python": _platform.python_version(), "torch": torch.__version__, "megatron_core": ".".join(map(str, compat.MCORE)),
            "model_class": "HybridModel" if compat.HYBRID_MODEL else "GPTModel"}


def main(argv=None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_runs)
    signal.signal(signal.SIGINT, _stop_runs)
    from megatron_attnedit.errors import ConfigError
    from megatron_attnedit import families

    hf = families.config_for_preset(a.preset)
    hf["num_hidden_layers"] = a.layers
    prefix, sp = make_data(a.work, hf["vocab_size"], a.seq, a.gbs * (a.iters + 2) * 2)
    device = device_name(a.platform)
    peak = a.peak_tflops or default_peak(device)
    tokens_per_step = a.gbs * a.seq
    done: Dict[str, dict] = {}  # runs that do not depend on the target (teacher_fwd), reused
    for target_name in a.targets:
        recipe = a.recipe or RECIPES[a.preset][target_name]
        try:
            settings = {name: run_settings(a, recipe, name, prefix, sp) for name in a.configs}
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        any_cfg = next(iter(settings.values()))[2]
        target = {"name": any_cfg.target.name, "options": dict(any_cfg.target.options)}
        trainable = settings["stage2"][2].objective.options.get("trainable", "attention") if "stage2" in settings else "attention"
        logits = bool(settings["teacher_fwd"][2].objective.options.get("output_layer")) if "teacher_fwd" in settings else False
        flops = Flops(hf, target, a.seq).per_token(trainable, logits)
        result = {"device": device, "software": software(), "nproc": a.nproc, "platform": a.platform, "preset": a.preset, "layers": a.layers, "seq": a.seq,
                  "global_batch": a.gbs, "micro_batch": a.mbs, "tp": a.tp, "ep": a.ep, "recipe": recipe, "target": target,
                  "stage2_trainable": trainable, "peak_tflops": peak, "overrides": a.sets,
                  "overrides_per_run": {r: getattr(a, f"set_{r}") for r in RUNS if getattr(a, f"set_{r}")}}
        for name, (stage, sets, _) in settings.items():
            if name == "teacher_fwd" and name in done:
                result[name] = done[name]
                continue
            args = ["--recipe", recipe] + (["--stage", stage] if stage else [])
            r = launch(name, args + ["--set", *sets, f"training.run_dir={os.path.join(a.work, name)}"], os.path.join(a.work, name), a.iters, a.nproc)
            if "rows" in r:
                r = {**summarize(r["rows"], tokens_per_step, flops[name], a.nproc, peak), "build_peak_mem_GiB": r["build_peak_mem_GiB"], "wall_s": r["wall_s"]}
            result[name] = r
            if name == "teacher_fwd":
                done[name] = r
            print(f"[bench] {target_name} {name}: {r}", file=sys.stderr, flush=True)
        for num, den in (("stage2", "lm"), ("stage1", "teacher_fwd"), ("stage1", "lm")):
            if "step_time_s" in result.get(num, {}) and "step_time_s" in result.get(den, {}):
                result[f"step_time_ratio_{num}_over_{den}"] = round(result[num]["step_time_s"] / result[den]["step_time_s"], 3)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
