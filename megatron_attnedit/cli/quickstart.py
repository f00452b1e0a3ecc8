"""The quickstart: the whole pipeline on the bundled tiny teacher, on a CPU, in minutes.

  python -m megatron_attnedit.quickstart [--run-dir runs/quickstart] [--quick] [--skip-stage1]
      [--ablation mla,gateswa|none] [--targets mla,gateswa] [--nproc N] [--teacher dense|moe|HF_DIR]
      [--stage1-iters N] [--stage2-iters N] [--set section.key=value ...]

Per target (recipes launch/recipes/quickstart_<target>.yaml): stage 1 -> stage 2 (from stage 1) ->
export to Hugging Face (checkpoints_tools/mcore_to_hf.py); then one evaluation of the teacher and all
students (python -m megatron_attnedit.evaluate). The ablation students skip stage 1: stage 2 starts
from the initialised student (``checkpoint.pretrained_checkpoint: null``), same stage-2 steps.
The summary printed at the end sets each student against the teacher -- perplexity ratio, KV cache
share, loss on the tokens beyond a sliding window next to the teacher's on the same tokens, keys
recalled by the retrieval probe -- and leaves the judgement to the reader; report.md has the rest.
Every step is the command a user would type, run as a subprocess; its output goes to
RUN/logs/<step>.log and one line per step is printed here. The teacher's HF weights are read into
megatron by each training run (the conversion tables of checkpoints_tools/hf_to_mcore.py).

Data: this interpreter's standard library, split by file, tokenized with the teacher's tokenizer
(``python -m megatron_attnedit.teacher datasets``; reused on a rerun). Training runs use
``torchrun --nproc-per-node N`` with one thread each (on 2 cores, stage 1 at seq 512: 2 data-parallel
ranks ~2,100 tokens/s, stage 2 ~1,150; at seq 256 one process with 2 threads was ~1,400 against ~2,600). The run directories of the stages are
recreated on every call; the datasets are kept.

Measured on this project's 2-core CPU machine (with the test suite running beside it): the full
default run (MLA, GateSWA, MLA without stage 1; 100 + 100 steps each) 14.4 min alone, ``--quick`` 2.6 min.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

from megatron_attnedit.cli import args
from megatron_attnedit.errors import StepFailed, run_cli, strip_debug

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
TARGETS = {"mla": "quickstart_mla", "gateswa": "quickstart_gateswa"}
QUICK = dict(stage1_iters=6, stage2_iters=6, warmup=2, max_tokens=2048, decode_tokens=16, probe_trials=2, probe_context=256,
             sets=["data.seq_length=128", "data.micro_batch_size=2", "data.global_batch_size=4"])
"""--quick: the pipeline's every step, briefly (start-up, checkpointing and export dominate its time)."""
FULL = dict(max_tokens=16384, decode_tokens=64, probe_trials=4, probe_context=512)
"""Retrieval probe: trials per distance and prompt length (its cost is trials x distances x context
tokens of prefill per model; see the module docstring for the time it adds)."""



def parse_args(argv: Optional[List[str]]):
    ap = args.parser("attnedit quickstart", __doc__.splitlines()[0],
                     "  attnedit quickstart                 # the full run on the bundled teacher (~15 min on 2 CPU cores)\n"
                     "  attnedit quickstart --quick         # every step, a few iterations each\n"
                     "  (same as: python -m megatron_attnedit.quickstart ...; bash launch/quickstart.sh installs first)")
    ap.add_argument("--run-dir", default="runs/quickstart", help="everything goes here (default runs/quickstart)")
    ap.add_argument("--quick", action="store_true", help=f"short variant for CI: {QUICK['stage1_iters']} steps per stage, "
                    f"{QUICK['max_tokens']} held-out tokens")
    ap.add_argument("--skip-stage1", action="store_true", help="ablation: the main students skip stage 1 (stage 2 from the initialised student)")
    ap.add_argument("--ablation", default=None, help="targets that also get a no-stage-1 student, comma-separated, or none "
                    "(default: mla, where stage 1 matters most; none with --quick or --skip-stage1)")
    ap.add_argument("--targets", default="mla,gateswa", help="comma-separated: mla, gateswa")
    ap.add_argument("--teacher", default="dense", help="dense or moe (bundled teachers) or an HF directory of a Qwen3 teacher of the same shape")
    ap.add_argument("--nproc", type=int, default=None, help="training processes (data-parallel ranks); default min(2, CPU cores)")
    ap.add_argument("--stage1-iters", type=int, default=None, help="stage-1 steps (default: the recipe's)")
    ap.add_argument("--stage2-iters", type=int, default=None, help="stage-2 steps (default: the recipe's)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides for every training run")
    args.debug(ap)
    a = ap.parse_args(argv)
    a.targets = _names(a.targets, "--targets")
    if a.ablation is None:
        a.ablation = [] if (a.quick or a.skip_stage1) else a.targets[:1]
    else:
        a.ablation = [] if a.ablation.strip() == "none" else _names(a.ablation, "--ablation")
    if a.skip_stage1 and a.ablation:
        ap.error("--skip-stage1 already trains without stage 1; leave --ablation out")
    if not set(a.ablation) <= set(a.targets):
        ap.error(f"--ablation {','.join(a.ablation)} names a target not in --targets {','.join(a.targets)}")
    return a


def _names(s: str, flag: str) -> List[str]:
    out = [t.strip() for t in s.split(",") if t.strip()]
    bad = [t for t in out if t not in TARGETS]
    if not out or bad:
        raise SystemExit(f"error: {flag} {s!r}: use a comma-separated list of {', '.join(TARGETS)}")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    """Runs the steps as subprocesses, logs each to RUN/logs/NAME.log, times them."""

    def __init__(self, run_dir: str):
        self.logs = os.path.join(run_dir, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.times: Dict[str, float] = {}
        self.t0 = time.time()

    def __call__(self, name: str, cmd: List[str], env: Optional[Dict[str, str]] = None) -> None:
        log = os.path.join(self.logs, f"{name}.log")
        full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
                        WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"), TOKENIZERS_PARALLELISM="false", **(env or {}))
        print(f"[quickstart {time.time() - self.t0:6.0f}s] {name} ...", flush=True)
        start = time.time()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            rc = subprocess.call(cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT)
        self.times[name] = time.time() - start
        if rc != 0:
            with open(log) as f:
                tail = f.read().splitlines()[-15:]
            print("\n".join("    " + line for line in tail), file=sys.stderr)
            raise StepFailed(f"{name} failed (exit {rc}); full output in {log}")
        print(f"[quickstart {time.time() - self.t0:6.0f}s] {name} done in {self.times[name]:.0f}s", flush=True)


def teacher_dir(spec: str) -> str:
    from megatron_attnedit import teacher

    if spec in teacher.NAMES:
        d = teacher.bundled_teacher(spec)
        if d is None:
            raise StepFailed(f"the bundled {spec} teacher is not in this checkout ({teacher.ASSETS_DIR}); use --teacher HF_DIR")
        return d
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise StepFailed(f"--teacher {spec} is neither dense, moe nor an HF model directory (no config.json)")
    return os.path.abspath(spec)


def train_cmd(a, nproc: int, recipe: str, stage: str, run_dir: str, sets: List[str]) -> List[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
                "--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
    return launcher + ["-m", "megatron_attnedit.train", "--recipe", recipe, "--stage", stage,
                       "--set", f"training.run_dir={run_dir}", "training.platform=cpu", *sets, *a.set]


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(strip_debug(argv))
    t_start = time.time()

    def body():
        summary = run(a)
        summary["wall_s"] = time.time() - t_start
        with open(os.path.join(a.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print_summary(summary)

    return run_cli(body, argv)  # a failed step: one line naming its log, exit 1


def run(a) -> dict:
    run_dir = os.path.abspath(a.run_dir)
    teacher = teacher_dir(a.teacher)
    nproc = a.nproc or max(1, min(2, os.cpu_count() or 1))
    steps = Runner(run_dir)
    py = sys.executable

    data_dir = os.path.join(run_dir, "data")
    steps("data", [py, "-m", "megatron_attnedit.teacher", "datasets", "--tokenizer-dir", teacher, "--out", data_dir])
    with open(os.path.join(data_dir, "datasets.json")) as f:
        prefixes = json.load(f)["prefixes"]

    common = [f"model.hf_dir={teacher}", f"data.data_path=[{prefixes['train']}]", f"data.valid_data_path=[{prefixes['valid']}]"]
    iters = {"stage1": a.stage1_iters or (QUICK["stage1_iters"] if a.quick else None),
             "stage2": a.stage2_iters or (QUICK["stage2_iters"] if a.quick else None)}
    train_env = {"OMP_NUM_THREADS": "1" if nproc > 1 else str(os.cpu_count() or 1)}

    def stage_sets(stage: str) -> List[str]:
        out = list(common) + (QUICK["sets"] if a.quick else [])
        if iters[stage]:
            out.append(f"training.train_iters={iters[stage]}")
            if iters[stage] <= 20:
                out += [f"optimizer.lr_warmup_iters={QUICK['warmup']}", f"training.log_interval={QUICK['warmup']}"]
        return out

    students = []  # (name, hf dir, run dir)
    for target in a.targets:
        recipe, tdir = TARGETS[target], os.path.join(run_dir, target)
        shutil.rmtree(tdir, ignore_errors=True)
        variants = [(target, not a.skip_stage1)] + ([(f"{target}_no_stage1", False)] if target in a.ablation else [])
        if a.skip_stage1:
            variants = [(f"{target}_no_stage1", False)]
        s1_ckpt = os.path.join(tdir, "stage1", "checkpoints")
        for name, with_stage1 in variants:
            if with_stage1:
                steps(f"{target}_stage1", train_cmd(a, nproc, recipe, "stage1", os.path.join(tdir, "stage1"), stage_sets("stage1")), train_env)
            s2_dir = os.path.join(tdir, "stage2" if with_stage1 else "stage2_no_stage1")
            init = f"checkpoint.pretrained_checkpoint={s1_ckpt if with_stage1 else 'null'}"
            steps(f"{name}_stage2", train_cmd(a, nproc, recipe, "stage2", s2_dir, stage_sets("stage2") + [init]), train_env)
            hf = os.path.join(run_dir, "hf", name)
            # MLA students also as GGUF (hf/<name>/model.gguf), the file llama.cpp runs; GateSWA has no llama.cpp form
            gguf = ["--gguf"] if target == "mla" else []
            steps(f"{name}_export", [py, os.path.join(ROOT, "checkpoints_tools", "mcore_to_hf.py"), "--load-dir", os.path.join(s2_dir, "checkpoints"),
                                     "--save-dir", hf, "--overwrite", "--no-progress", *gguf])
            students.append((name, hf))

    report_dir = os.path.join(run_dir, "report")
    knobs = QUICK if a.quick else FULL
    cmd = [py, "-m", "megatron_attnedit.evaluate", "--teacher", teacher, "--data", prefixes["valid"], "--report-dir", report_dir,
           "--device", "cpu", "--max-tokens", str(knobs["max_tokens"]), "--decode-tokens", str(knobs["decode_tokens"]),
           "--probe-trials", str(knobs["probe_trials"]), "--probe-context", str(knobs["probe_context"])]
    for name, hf in students:
        cmd += ["--student", f"{name}={hf}"]
    for target in a.targets:
        cmd += ["--run-dir", f"{target}={os.path.join(run_dir, target)}"]
    steps("evaluate", cmd, {"OMP_NUM_THREADS": str(os.cpu_count() or 1)})

    with open(os.path.join(report_dir, "results.json")) as f:
        results = json.load(f)
    return summarize(results, report_dir, steps.times, nproc, a)


def _probe_hits(m: dict) -> Optional[dict]:
    rows = m.get("probe", {}).get("per_distance")
    if not rows:
        return None
    return dict(exact=sum(round(r["exact"] * r["trials"]) for r in rows), trials=sum(r["trials"] for r in rows),
                per_distance={r["distance"]: r["exact"] for r in rows})


def summarize(results: dict, report_dir: str, times: Dict[str, float], nproc: int, a) -> dict:
    """Each student against the teacher: perplexity ratio, KV saved, loss beyond the window,
    retrieval probe; no verdicts (the reader judges)."""
    models = results["models"]
    teacher = models[0]
    ctx = results["data"]["seq_len"]
    probe = results.get("probe", {})
    out = dict(report=os.path.join(report_dir, "report.md"), quick=a.quick, nproc=nproc, eval_seq_len=ctx,
               scored_tokens=results["data"]["scored_tokens"], teacher_ppl=teacher["ppl"], teacher_probe=_probe_hits(teacher),
               probe=dict(context=probe.get("context"), distances=probe.get("distances"), skipped=probe.get("skipped")),
               students={}, step_seconds=times)
    t_ctx = teacher["kv"]["per_context_bytes"]
    beyond = results.get("by_position", {}).get("beyond_window", {})
    for m in models[1:]:
        kv = m["kv"]
        out["students"][m["name"]] = dict(
            ppl=m["ppl"], ratio=m["ppl"] / teacher["ppl"],
            kv_fraction={c: kv["per_context_bytes"][c] / t_ctx[c] for c in t_ctx},
            beyond_window=beyond.get(m["name"]), probe=_probe_hits(m))
    return out


def print_summary(s: dict) -> None:
    print()
    print(f"quickstart {'(--quick) ' if s['quick'] else ''}done in {s['wall_s'] / 60:.1f} min ({s['nproc']} training process(es))")
    print(f"report: {s['report']}")
    print(f"held-out perplexity ({s['scored_tokens']} tokens, windows of {s['eval_seq_len']}): teacher {s['teacher_ppl']:.3f}")
    tp = s["teacher_probe"]
    for name, m in s["students"].items():
        kv = m["kv_fraction"]
        print(f"  {name:<18} ppl {m['ppl']:8.3f} = {m['ratio']:.3f}x the teacher's; KV cache {100 * kv['4096']:5.1f}% of the teacher's "
              f"at 4K tokens, {100 * kv['131072']:5.1f}% at 128K")
        b = m["beyond_window"]
        if b and b["tokens"]:
            print(f"  {'':<18} loss on tokens with more than W={b['window']} tokens of context: {b['student_nll']:.3f} nats, "
                  f"the teacher's {b['teacher_nll']:.3f} on the same tokens ({b['ratio']:.3f}x)")
    if tp:
        p = s["probe"]
        cells = ", ".join(f"{n} {m['probe']['exact']}/{m['probe']['trials']}" for n, m in s["students"].items() if m["probe"])
        print(f"retrieval probe (key recalled exactly, {p['context']}-token prompts, distances {', '.join(map(str, p['distances']))}): "
              f"teacher {tp['exact']}/{tp['trials']}" + (f", {cells}" if cells else "") + "; per distance in the report")
    elif s["probe"].get("skipped"):
        print(f"retrieval probe not run: {s['probe']['skipped']}")
    if not all(math.isfinite(m["ppl"]) for m in s["students"].values()):
        print("warning: a student's perplexity is not finite", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
