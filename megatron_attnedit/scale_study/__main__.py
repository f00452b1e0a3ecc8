"""The scale study: a long-context teacher trained here, converted to MLA and GateSWA, evaluated.

  python -m megatron_attnedit.scale_study [--out runs/scale_study] [--tiny] [--jobs N] [--budget-s S]
      [--dry-run] [--reuse-teacher] [--summary-only] [--teacher-iters N] [--stage1-iters N] [--stage2-iters N]
      [--recall-share F] [--set section.key=value ...] [--set-mla ...] [--set-gateswa ...]

Phases (one line each with its wall time; everything under --out):
  data         Python sources of the installed packages (data/packages.py), bundled tokenizer,
               megatron datasets: corpus/, tokenizer/, datasets/
  teacher      a Qwen3 (scale_study/plan.py) trained from random weights with the lm objective at
               sequence length 4096 (launch/recipes/study_teacher.yaml), exported: teacher/, hf/teacher/
  conversions  MLA and GateSWA (stage 1 -> stage 2 -> export) and MLA without stage 1 (stage 2 from
               the initialised student), launch/recipes/study_{mla,gateswa}.yaml, --jobs at once on
               the one GPU: mla/, gateswa/, hf/<student>/
  evaluate     python -m megatron_attnedit.evaluate on the held-out files at 4096-token windows: report/
  summary      study.json (raw), study.md (the table), study_curves.png
Logs: logs/<step>.log; phases.json is updated as each phase ends.

--tiny: the same phases at toy size on the CPU (3 MB of package sources, a 1.9M-parameter teacher,
256-token sequences, 8 steps per stage): what tests/test_scale_study.py runs.
--budget-s (GPU default 540): after the teacher, the conversions' steps are scaled down when the
teacher's measured speed says the planned ones would not finish in time (recorded as
stage_steps_scale in study.json; 1.0 when nothing was cut).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import List, Optional

from megatron_attnedit.data import corpus
from megatron_attnedit.errors import UserError, run_cli, strip_debug
from megatron_attnedit.scale_study import plan as plan_lib
from megatron_attnedit.scale_study import study, summary
from megatron_attnedit.scale_study.runner import Runner


def parse_args(argv: Optional[List[str]]):
    ap = argparse.ArgumentParser(prog="python -m megatron_attnedit.scale_study", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/scale_study", help="everything goes here (default runs/scale_study)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (CI)")
    ap.add_argument("--jobs", type=int, default=None, help="conversion chains at once (default 3; 1 with --tiny)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-time budget (default 540 on a GPU, none with --tiny)")
    ap.add_argument("--dry-run", action="store_true", help="print the sizes and the per-phase estimate, run nothing")
    ap.add_argument("--summary-only", action="store_true", help="rewrite study.json / study.md / plots from a finished run in --out")
    ap.add_argument("--reuse-teacher", action="store_true", help="keep --out's corpus, datasets and trained teacher; run the "
                    "conversions, evaluation and summary again (e.g. with other --set values)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides for every training run")
    ap.add_argument("--recall-share", type=float, default=None, help=f"share of training files with recall drills "
                    f"(data/recall.py; default {plan_lib.RECALL_SHARE}, 0: the files as they are)")
    ap.add_argument("--set-mla", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for the MLA students' runs only "
                    "(both chains)")
    ap.add_argument("--set-gateswa", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for the GateSWA student's runs only "
                    "(e.g. target.options.window=1024)")
    ap.add_argument("--teacher-iters", type=int, default=None, help="teacher steps (default: study_teacher.yaml's)")
    ap.add_argument("--stage1-iters", type=int, default=None, help="stage-1 steps of both targets (default: the recipes')")
    ap.add_argument("--stage2-iters", type=int, default=None, help="stage-2 steps of all three students (default: the recipes')")
    a = ap.parse_args(argv)
    if a.recall_share is not None and not 0 <= a.recall_share <= 1:
        ap.error("--recall-share must be between 0 and 1")
    if a.jobs is not None and a.jobs < 1:
        ap.error("--jobs must be >= 1")
    for flag in ("teacher_iters", "stage1_iters", "stage2_iters"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    return a


def apply_iters(sizes: plan_lib.Sizes, a) -> plan_lib.Sizes:
    """--recall-share, --set-mla / --set-gateswa, --teacher-iters / --stage1-iters / --stage2-iters: after the size profile's own."""
    if a.recall_share is not None:
        sizes.recall_share = a.recall_share
    sizes.target_sets = {t: sizes.target_sets[t] + getattr(a, f"set_{t}") for t in sizes.target_sets}
    if a.teacher_iters:
        sizes.teacher_sets = sizes.teacher_sets + [f"training.train_iters={a.teacher_iters}",
                                                   f"optimizer.lr_warmup_iters={max(1, min(40, a.teacher_iters // 14))}"]
    for stage, n in (("stage1", a.stage1_iters), ("stage2", a.stage2_iters)):
        if n:
            warm = max(1, min(20 if stage == "stage1" else 12, n // 8))
            sizes.stage_sets = {**sizes.stage_sets, stage: sizes.stage_sets[stage] + [f"training.train_iters={n}", f"optimizer.lr_warmup_iters={warm}"]}
    return sizes


def _device(tiny: bool) -> str:
    if tiny:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_name(device: str) -> str:
    import platform

    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible), {os.cpu_count()} CPU cores"
    return f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores"


def print_estimate(sizes: plan_lib.Sizes, est: dict) -> None:
    print(plan_lib.describe(sizes), flush=True)
    for name, st in plan_lib.steps(sizes).items():
        print(f"  {name:<15} {st['steps']:>5} steps x {st['gbs']} x {sizes.seq} = {st['tokens'] / 1e6:.1f}M tokens", flush=True)
    parts = ", ".join(f"{k} {v:.0f}s" for k, v in est.items() if k not in plan_lib.EXTRAS)
    print(f"estimate for one H100 (assumed {est['lm_tokens_per_s'] / 1e3:.0f}K teacher tokens/s, scale_study/plan.py): {parts}; "
          f"total {est['total']:.0f}s ({est['total'] / 60:.1f} min)", flush=True)


def guard_scale(sizes: plan_lib.Sizes, budget: Optional[float], elapsed: float, measured_tps: Optional[float]) -> float:
    """Fraction of the planned stage steps that fits in what is left of the budget at the teacher's
    measured speed (1.0: all of them)."""
    if budget is None or not measured_tps:
        return 1.0
    est = plan_lib.estimate(sizes, lm_tokens_per_s=measured_tps)
    left = budget - elapsed - est["evaluate"] - 15.0  # 15 s: the summary and slack
    if est["conversions"] <= left:
        return 1.0
    return max(0.25, (left - est["conversions_fixed"]) / est["conversions_gpu"])


def run(a) -> dict:
    t0 = time.time()
    device = _device(a.tiny)
    sizes = apply_iters(plan_lib.tiny_sizes(a.jobs or 1) if a.tiny else plan_lib.gpu_sizes(a.jobs or 3), a)
    budget = a.budget_s if a.budget_s is not None else (None if a.tiny else 540.0)
    # tokenizer processes: each spends seconds importing transformers, worth it for ~180 MB, not for 3
    workers = 1 if a.tiny else max(1, min(16, os.cpu_count() or 1))
    est = plan_lib.estimate(sizes, workers=16)  # the GPU machine's 16 cores
    if not a.tiny or a.dry_run:
        print_estimate(sizes, est)
    if a.dry_run:
        return {}
    out = os.path.abspath(a.out)
    if a.reuse_teacher:  # checked before anything is written
        data, previous = load_finished(out)
        teacher_hf = os.path.join(out, "hf", "teacher")
        if not os.path.isfile(os.path.join(teacher_hf, "config.json")):
            raise UserError(f"--reuse-teacher: {teacher_hf} holds no exported teacher; run the study without it first")
    os.makedirs(out, exist_ok=True)
    steps = Runner(out, "scale_study")
    platform = "cuda" if device == "cuda" else "cpu"
    threads = max(1, (os.cpu_count() or 1) // max(1, sizes.jobs))
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "OMP_NUM_THREADS": str(threads if device == "cpu" else 4)}
    progress = os.path.join(out, "phases.json")

    def done(phase: str, started: float) -> None:
        steps.times.setdefault(phase, {"wall_s": round(time.time() - started, 1)})
        with open(progress, "w") as f:
            json.dump({"elapsed_s": round(time.time() - t0, 1), "phases": steps.times, "estimate_s": est, "scale": scale,
                       "device": _device_name(device), "data": {k: data[k] for k in ("seconds", "bytes_per_token")}}, f, indent=1)

    scale = 1.0

    steps.say(f"device: {_device_name(device)}; output {out}")
    t = time.time()
    if a.reuse_teacher:
        kept = ("data", "teacher_train", "teacher_export", "teacher")
        steps.times.update({k: dict(previous["phases"][k], reused=True) for k in kept if k in previous["phases"]})
        steps.say(f"reusing the corpus, datasets and teacher in {out}")
        t0 -= sum(steps.times.get(k, {}).get("wall_s", 0.0) for k in ("data", "teacher"))  # the study's wall time includes them
    else:
        data = study.data_phase(out, sizes, workers)
        data["tokenizer_why"] = study.TOKENIZER_WHY
        sp = data["manifest"]["splits"]
        steps.record("data", time.time() - t)
        steps.say(f"corpus: {len(data['manifest']['packages'])} packages, {sp['train']['files']:,} / {sp['valid']['files']:,} files, "
                  f"{sp['train']['tokens']:,} / {sp['valid']['tokens']:,} tokens (train / held-out), {data['bytes_per_token']['train']:.2f} bytes/token")
        done("data", t)
        t = time.time()
        teacher_hf = study.teacher_phase(out, data, sizes, platform, steps, dict(env, OMP_NUM_THREADS=str(os.cpu_count() or 1) if device == "cpu" else "4"), a.set)
        done("teacher", t)
    tps = summary.teacher_record(os.path.join(out, "teacher"), sizes)["tokens_per_s"]
    scale = guard_scale(sizes, budget, time.time() - t0, tps) if device == "cuda" else 1.0
    if scale < 1.0:
        steps.say(f"the teacher ran at {tps / 1e3:.0f}K tokens/s: stage steps scaled to {scale:.0%} of the planned ones to stay within {budget:.0f}s")
    t = time.time()
    students = study.conversion_phase(out, data, teacher_hf, sizes, platform, steps, env, a.set, scale)
    done("conversions", t)
    t = time.time()
    results = study.evaluate_phase(out, data, teacher_hf, students, sizes, device, steps)
    done("evaluate", t)
    command = "python -m megatron_attnedit.scale_study " + shlex.join(sys.argv[1:] if a.argv is None else a.argv)
    return finish(out, sizes, data, results, steps.times, est, _device_name(device), command, time.time() - t0, scale)


def finish(out, sizes, data, results, times, est, device_name, command, wall_s, scale) -> dict:
    record = summary.build(out, sizes, data, results, times, est, device_name, command, wall_s, scale)
    record["plots"] = [os.path.basename(p) for p in summary.plot(out, record)]
    summary.write(out, record)
    return record


def load_finished(out: str):
    """(data record, phases.json) of a study that ran in ``out``."""

    paths = [os.path.join(out, "phases.json"), os.path.join(out, "datasets", "datasets.json")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{missing[0]} not found: {out} holds no finished study data; run the study without "
                               "--reuse-teacher / --summary-only first")
    with open(paths[0]) as f:
        progress = json.load(f)
    with open(paths[1]) as f:
        info = json.load(f)
    data = {"manifest": corpus.load_manifest(os.path.join(out, "corpus")), "datasets": info, **progress["data"],
            "corpus_dir": os.path.join(out, "corpus"), "tokenizer_dir": os.path.join(out, "tokenizer"), "tokenizer_why": study.TOKENIZER_WHY}
    return data, progress


def summary_only(a) -> dict:
    """study.json / study.md again from a finished run's files (after a change to the summary)."""
    out = os.path.abspath(a.out)
    sizes = plan_lib.tiny_sizes() if a.tiny else plan_lib.gpu_sizes()
    data, progress = load_finished(out)
    with open(os.path.join(out, "report", "results.json")) as f:
        results = json.load(f)
    old = {}
    if os.path.isfile(os.path.join(out, "study.json")):
        with open(os.path.join(out, "study.json")) as f:
            old = json.load(f)
    return finish(out, sizes, data, results, progress["phases"], progress["estimate_s"], progress["device"],
                  old.get("command", "(summary only)"), old.get("wall_s", progress["elapsed_s"]), progress["scale"])


def print_summary(s: dict, out: str) -> None:
    print()
    print(summary.markdown(s))
    print(f"scale study done in {s['wall_s']:.0f}s ({s['wall_s'] / 60:.1f} min): {os.path.join(out, 'study.json')}, {os.path.join(out, 'study.md')}")


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(strip_debug(argv))
    a.argv = argv

    def body():
        s = summary_only(a) if a.summary_only else run(a)
        if s:
            print_summary(s, os.path.abspath(a.out))

    return run_cli(body, argv)


if __name__ == "__main__":
    sys.exit(main())
