"""Compare a teacher and its students on their Hugging Face checkpoints; write a report.

  python -m megatron_attnedit.evaluate --teacher HF_DIR --student [NAME=]HF_DIR [--student ...] \\
      --data PREFIX | FILE... --report-dir DIR [--run-dir [LABEL=]DIR ...] [--max-tokens N] [--device cpu|cuda]
      [--probe-trials N] [--probe-context N] [--probe-distances D,D,...] [--allow-longer-than-trained]

Per model: held-out perplexity on the same tokens, and from the same forward passes the loss by
position in the window (eval/distance.py; for a student with sliding layers, its loss on the
predictions with more than W tokens of context next to the teacher's on the same tokens); a
retrieval probe, exact-match recall of a key stated at a given distance back (eval/retrieval.py);
a short greedy decode with the project's decode engine (megatron_attnedit/inference: static caches;
MLA with the latent cache and absorbed up-projections, GateSWA sliding layers with a ring buffer of
W positions), its logits checked against the stock transformers forward; KV-cache bytes per token
from the config (the attention target's formula) and measured from the engine's allocated cache,
layer by layer; decode tokens/s; parameters. GateSWA
students load with trust_remote_code (their config has an auto_map; the code ships in the
checkpoint directory). Output in --report-dir: report.md, results.json, PNG plots (KV against
context, loss by position, probe accuracy against distance; stage-1 and stage-2 curves from
--run-dir). Bad input stops with one ``error:`` line and exit code 2 (``errors.run_cli``); so does a
--seq-length or --probe-context longer than a model's max_position_embeddings, unless
--allow-longer-than-trained (then one ``warning:`` line); a decode that differs from the stock
forward, or a cache that differs from the formula, writes the report, then exits 1.
"""

from __future__ import annotations

import datetime
import gc
import os
import shlex
import shutil
import sys
import time
from typing import List, Optional, Tuple

from megatron_attnedit.cli import args
from megatron_attnedit.errors import read_json_object, run_cli, strip_debug
from megatron_attnedit.errors import EvalError
from megatron_attnedit.families import SUPPORTED_MODEL_TYPES
from megatron_attnedit.targets import TARGETS

TEACHER_TYPES = SUPPORTED_MODEL_TYPES


def _named(spec: str) -> Tuple[str, str]:
    """'NAME=DIR' or 'DIR' (named after the directory)."""
    if "=" in spec and not os.path.exists(spec):
        name, path = spec.split("=", 1)
        return name, path
    return os.path.basename(os.path.normpath(spec)), spec


def read_config(path: str, what: str) -> dict:
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise EvalError(f"{what} {path} is not a Hugging Face model directory (no config.json)")
    return read_json_object(f, error=EvalError)


def parse_args(argv):
    ap = args.parser("attnedit evaluate", __doc__.splitlines()[0],
                     "  attnedit evaluate --teacher TEACHER_HF --student mla=MLA_HF --student gateswa=GATESWA_HF \\\n"
                     "      --data DATA/valid --report-dir reports/run1 --run-dir runs/tiny_mla --run-dir runs/tiny_gateswa\n"
                     "  (same as: python -m megatron_attnedit.evaluate ...)")
    ap.add_argument("--teacher", required=True, help=f"teacher HF directory (a stock {' / '.join(SUPPORTED_MODEL_TYPES)} checkpoint)")
    ap.add_argument("--student", action="append", default=[], help="[NAME=]HF_DIR of a student; repeat for more")
    ap.add_argument("--data", nargs="+", required=True, help="held-out data: an indexed dataset PREFIX (.bin/.idx) or text files/globs")
    ap.add_argument("--report-dir", required=True, help="where report.md, results.json and the plots go")
    ap.add_argument("--run-dir", action="append", default=[], help="[LABEL=]DIR of training runs for the curves; repeat for more")
    ap.add_argument("--max-tokens", type=int, default=32768, help="score at most this many tokens (whole windows); 0 = all the data")
    ap.add_argument("--seq-length", type=int, default=None, help="window length (default min(512, teacher max_position_embeddings))")
    ap.add_argument("--stride", type=int, default=None, help="window start step (default --seq-length: non-overlapping)")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="decode prompt, taken from the start of the data")
    ap.add_argument("--decode-tokens", type=int, default=64, help="greedy decode steps after the prefill")
    ap.add_argument("--probe-trials", type=int, default=None, help="retrieval probe: trials per distance (default 8; 0 = no probe)")
    ap.add_argument("--probe-context", type=int, default=None, help="retrieval probe: tokens per prompt (default --seq-length)")
    ap.add_argument("--probe-distances", default=None, help="retrieval probe: comma-separated distances in tokens "
                    "(default: powers of two from 32, 3/4 of the context, and W/2, 3W/2 for each sliding window W)")
    ap.add_argument("--probe-seed", type=int, default=0, help="retrieval probe: seed of the keys and the filler (same trials for every model)")
    ap.add_argument("--allow-longer-than-trained", action="store_true",
                    help="allow --seq-length / --probe-context beyond a model's max_position_embeddings (prints a warning)")
    args.device(ap)
    args.dtype(ap, "auto: bfloat16 on cuda, float32 on cpu", choices=args.DTYPES)
    args.debug(ap)
    return ap.parse_args(argv)


def _load(path: str, cfg: dict, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    remote = "auto_map" in cfg
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=remote)
    except Exception as e:  # damaged weights or config surface as many types (SafetensorError, OSError, ...)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EvalError(f"cannot load {path}: {first}; check or re-export the checkpoint") from None
    with torch.no_grad():  # values that cannot be weights: every later number would be NaN
        bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise EvalError(f"{path}: weights that are not finite (NaN/Inf) in {bad}; the checkpoint is damaged or diverged, re-export a good one")
    return model.to(device).eval(), remote


def evaluate_model(name, role, path, cfg, teacher_cfg, a, tokens, windows, dtype, device, probe=None) -> dict:
    import torch

    from megatron_attnedit.eval import kv_measure, perplexity
    from megatron_attnedit.inference import kv
    from megatron_attnedit.inference.engine import DecodeEngine

    model, remote = _load(path, cfg, dtype, device)
    fwd = lambda ids: model(input_ids=ids).logits  # noqa: E731
    with torch.no_grad():
        ppl = perplexity.perplexity(fwd, tokens, windows, a.seq_length, a.batch_size, device)
    prompt = torch.from_numpy(tokens[: a.prompt_tokens]).view(1, -1).to(device)
    out = dict(name=name, role=role, path=os.path.abspath(path), model_type=cfg.get("model_type"), remote_code=remote,
               params=sum(p.numel() for p in model.parameters()), **{k: ppl[k] for k in ("ppl", "mean_nll", "scored_tokens", "position_nll")})
    if probe is not None:  # the retrieval probe (eval/retrieval.py), while the model is loaded
        out["probe"] = probe(model)
    # Decode with the engine (inference/): a cache of exactly the decode's positions, so that the
    # allocated bytes per position are the measurement the formula is held to, layer by layer.
    engine = DecodeEngine(model, batch=1, max_len=a.prompt_tokens + a.decode_tokens)
    engine.generate(prompt, min(2, a.decode_tokens), keep_logits=False)  # warm-up (kernel set-up; on CUDA the graph capture)
    res = engine.generate(prompt, a.decode_tokens)
    out["decode_check"] = kv.verify_against_stock(model, res)  # a wrong engine must not make a report
    out["kv"] = kv_measure.kv_summary(cfg, teacher_cfg, engine, res.positions, dtype)
    out["decode"] = dict(tokens_per_s=res.tokens_per_s, prefill_s=res.prefill_s, decode_s=res.decode_s, new_tokens=res.steps,
                         path=f"engine, {engine.attention} cache" + (", CUDA graph" if engine.cuda_graphs else ""))
    del model, engine, res
    gc.collect()
    return out


def _plots(staging: str, models: List[dict], teacher_cfg: dict, runs, run_dirs_given: bool, by_position: dict, probe: Optional[dict]):
    from megatron_attnedit.eval import kv_measure, plots

    made, notes = {}, {}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        msg = "not plotted: matplotlib is not installed (pip install -e .[report])"
        return {}, {"kv": msg, "stage1": msg, "stage2": msg, "by_position": msg, "probe": msg}
    cfgs = {m["name"]: m["_cfg"] for m in models}
    bpe = models[0]["kv"]["bytes_per_elem"]
    plots.plot_kv(models, os.path.join(staging, "kv_vs_context.png"), lambda m, c: kv_measure.config_bytes_per_token(cfgs[m["name"]], teacher_cfg, c, bpe))
    made["kv"] = "kv_vs_context.png"
    plots.plot_by_position(by_position, os.path.join(staging, "loss_by_position.png"))
    made["by_position"] = "loss_by_position.png"
    if probe is not None:
        plots.plot_probe(models, probe, by_position["windows"], os.path.join(staging, "retrieval_probe.png"))
        made["probe"] = "retrieval_probe.png"
    else:
        notes["probe"] = "no retrieval probe in this run"
    for stage in ("stage1", "stage2"):
        chosen = [r for r in runs if r.stage == stage]
        if chosen:
            getattr(plots, f"plot_{stage}")(chosen, os.path.join(staging, f"{stage}_curves.png"))
            made[stage] = f"{stage}_curves.png"
        elif not run_dirs_given:
            notes[stage] = "skipped: no --run-dir given (training curves are read from the training run directories)"
        else:
            notes[stage] = f"skipped: no {stage} run among the --run-dir directories"
    return made, notes


def check_lengths(models: List[Tuple[str, dict]], lengths: List[Tuple[str, int]], allow: bool) -> List[str]:
    """Issue 15's length rule: a window or probe context longer than a model's
    max_position_embeddings is refused, or with --allow-longer-than-trained printed as a warning
    (returned, for the report's notes)."""
    warnings = []
    for flag, n in lengths:
        for name, cfg in models:
            limit = cfg.get("max_position_embeddings")
            if limit is None or n <= int(limit):
                continue
            what = f"{flag} {n} is longer than {name}'s max_position_embeddings {limit}"
            if not allow:
                raise EvalError(f"{what}: positions it was not built for; give a shorter {flag}, or --allow-longer-than-trained to evaluate there anyway")
            warnings.append(f"{what}; evaluated anyway (--allow-longer-than-trained): figures past {limit} tokens are out of its range")
            print(f"warning: {warnings[-1]}", file=sys.stderr, flush=True)
    return warnings


def _probe_plan(a, seq_len: int, windows: List[int]) -> Optional[dict]:
    """The retrieval probe's settings from the flags (None: --probe-trials 0)."""
    from megatron_attnedit.eval import retrieval

    trials = 8 if a.probe_trials is None else a.probe_trials
    if trials < 0:
        raise EvalError(f"--probe-trials {trials} must be >= 0 (0 = no probe)")
    if trials == 0:
        return None
    context = a.probe_context or seq_len
    if a.probe_distances:
        try:
            distances = sorted({int(d) for d in a.probe_distances.split(",") if d.strip()})
        except ValueError:
            raise EvalError(f"--probe-distances {a.probe_distances!r}: give comma-separated token counts, e.g. 32,96,384") from None
    else:
        distances = retrieval.default_distances(context, windows)
    retrieval.check_distances(distances, context)
    if not distances:
        raise EvalError(f"--probe-context {context} leaves no distance to probe (each in [{retrieval.MIN_MARGIN}, context - {retrieval.MIN_MARGIN}]); "
                        "give a longer --probe-context or --probe-trials 0")
    return dict(context=context, distances=distances, trials=trials, seed=a.probe_seed, explicit=a.probe_trials is not None,
                chance=retrieval.CHANCE, key_digits=retrieval.KEY_DIGITS)


def _probe_trials(plan: Optional[dict], tokens, teacher_dir: str, notes: List[str]):
    """(trials, decode) for the plan, or (None, None) with a note when the probe was not asked
    for explicitly and cannot run on this tokenizer or data (asked for: the error stands)."""
    from megatron_attnedit.eval import perplexity, retrieval

    if plan is None:
        return None, None
    tok = perplexity.load_tokenizer(teacher_dir)
    try:
        if tok is None:
            raise EvalError(f"the teacher {teacher_dir} has no tokenizer to write the retrieval probe's prompts with")
        trials = retrieval.build_trials(tokens, tok.eod, tok.tokenize, tok.decode, plan["context"], plan["distances"], plan["trials"], plan["seed"])
    except EvalError as e:
        if plan["explicit"]:
            raise
        plan["skipped"] = str(e)
        notes.append(f"retrieval probe not run: {e}")
        print(f"note: retrieval probe not run: {e}", flush=True)
        return None, None
    return trials, tok.decode


def run(a, argv) -> int:
    t_start = time.time()
    from megatron_attnedit.eval import perplexity, plots, report

    teacher_cfg = read_config(a.teacher, "--teacher")
    if teacher_cfg.get("model_type") not in TEACHER_TYPES:
        raise EvalError(f"--teacher {a.teacher} has model_type {teacher_cfg.get('model_type')!r}; the teacher is a stock {' or '.join(TEACHER_TYPES)} checkpoint")
    vocab = int(teacher_cfg["vocab_size"])
    students = []
    for spec in a.student:
        name, path = _named(spec)
        cfg = read_config(path, "--student")
        if int(cfg.get("vocab_size", -1)) != vocab:
            raise EvalError(f"student {name} ({path}) has vocab_size {cfg.get('vocab_size')} but the teacher {vocab}; students must share the teacher's vocabulary")
        perplexity.check_student_tokenizer(path, a.teacher)
        students.append((name, path, cfg))
    names = ["teacher"] + [s[0] for s in students]
    if len(set(names)) != len(names):
        raise EvalError(f"model names repeat ({', '.join(names)}); name students with --student NAME=DIR")
    seq_len = a.seq_length or min(512, int(teacher_cfg.get("max_position_embeddings", 512)))
    a.seq_length, a.stride = seq_len, seq_len if a.stride is None else a.stride
    if not 1 <= a.stride <= seq_len or a.batch_size < 1:
        raise EvalError(f"--stride {a.stride} must be in [1, --seq-length {seq_len}] and --batch-size >= 1")
    notes: List[str] = []
    from megatron_attnedit.eval import kv_measure

    windows = {n: TARGETS[name].attention_window(options) for n, _, c in students for name, options in [kv_measure.attention_of(c)]}
    sliding = {n: w for n, w in windows.items() if w is not None}
    probe_plan = _probe_plan(a, seq_len, sorted(set(sliding.values())))
    lengths = [("--seq-length", seq_len)] + ([("--probe-context", probe_plan["context"])] if probe_plan else [])
    notes += check_lengths([("the teacher", teacher_cfg)] + [(f"student {n}", c) for n, _, c in students], lengths, a.allow_longer_than_trained)
    max_pos = int(teacher_cfg.get("max_position_embeddings", 1 << 30))
    if a.prompt_tokens < 1 or a.decode_tokens < 1 or a.prompt_tokens + a.decode_tokens > max_pos:
        raise EvalError(f"--prompt-tokens {a.prompt_tokens} + --decode-tokens {a.decode_tokens} must be >= 1 each and at most max_position_embeddings {max_pos}")
    runs = []
    for spec in a.run_dir:
        label, path = _named(spec)
        runs += plots.find_runs(path, label)
    made_report_dir = not os.path.exists(a.report_dir)
    staging = report.staging_dir(a.report_dir)
    published = False
    try:
        need = perplexity.tokens_needed(seq_len, a.stride, a.max_tokens)
        if need is not None and probe_plan:  # the probe's filler: runs of whole lines of every length up to its context
            need = max(need, 64 * probe_plan["context"])
        data = perplexity.load_eval_tokens(a.data, a.teacher, vocab, need)
        tokens = data["tokens"]
        windows = perplexity.make_windows(len(tokens), seq_len, a.stride, a.max_tokens)
        if len(tokens) < a.prompt_tokens:
            raise EvalError(f"the data holds {len(tokens)} tokens, fewer than --prompt-tokens {a.prompt_tokens}")

        trials, decode_fn = _probe_trials(probe_plan, tokens, a.teacher, notes)

        import torch

        from megatron_attnedit.eval import distance, retrieval

        for name, path, cfg in students:  # the attention must be known and fit the teacher, before any model loads
            kv_measure.config_bytes_per_token(cfg, teacher_cfg, 4096, 2)
        device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise EvalError("--device cuda but no CUDA device is available; use --device cpu")
        dtype = getattr(torch, a.dtype) if a.dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
        models = []
        for name, role, path, cfg in [("teacher", "teacher", a.teacher, teacher_cfg)] + [(n, "student", p, c) for n, p, c in students]:
            print(f"evaluating {name} ({path}) ...", flush=True)
            probe = (lambda model: retrieval.run(retrieval.hf_completer(model, device), trials, decode_fn, a.batch_size)) if trials else None
            m = evaluate_model(name, role, path, cfg, teacher_cfg, a, tokens, windows, dtype, device, probe=probe)
            m["_cfg"] = cfg
            models.append(m)
        for m in models:
            m["ppl_ratio"] = m["ppl"] / models[0]["ppl"]
        by_position = distance.compare(models, sliding, seq_len)
        for m in models:
            del m["position_nll"]  # per position: in the buckets of by_position
        made, plot_notes = _plots(staging, models, teacher_cfg, runs, bool(a.run_dir), by_position, probe_plan if trials else None)
        for m in models:
            cfg = m["_cfg"]
            if cfg.get("model_type") == "deepseek_v2" and cfg.get("norm_topk_prob") and cfg.get("n_routed_experts"):
                notes.append(f"{m['name']}: transformers' DeepseekV2 (5.x) ignores norm_topk_prob, so its perplexity here comes from top-k routing "
                             "weights that are not renormalised; vLLM / SGLang renormalise them, as the student was trained")
        results = dict(
            command="python -m megatron_attnedit.evaluate " + shlex.join(argv),
            created=datetime.datetime.now().isoformat(timespec="seconds"),
            device=device, dtype=str(dtype).replace("torch.", ""),
            data=dict(source=data["source"], checks=data["checks"], scored_tokens=models[0]["scored_tokens"], windows=len(windows), seq_len=seq_len, stride=a.stride),
            decode=dict(prompt_tokens=a.prompt_tokens, new_tokens=a.decode_tokens),
            models=[{k: v for k, v in m.items() if k != "_cfg"} for m in models],
            by_position=by_position,
            probe={k: v for k, v in probe_plan.items() if k != "explicit"} if probe_plan else dict(skipped="--probe-trials 0"),
            plots=made, plot_notes=plot_notes,
            training_runs=[dict(label=r.label, path=r.path, stage=r.stage, source=r.source) for r in runs],
            notes=notes,
        )
        results["seconds"] = time.time() - t_start
        report.write(staging, results)
        report.publish(staging, a.report_dir)
        published = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not published and made_report_dir and os.path.isdir(a.report_dir) and not os.listdir(a.report_dir):
            os.rmdir(a.report_dir)  # a failed evaluation leaves no empty report directory behind
    t128 = results["models"][0]["kv"]["per_context_bytes"]["131072"]
    for m in results["models"]:
        kv = m["kv"]
        print(f"{m['name']:>12}: ppl {m['ppl']:.3f} ({m['ppl_ratio']:.3f}x teacher), KV {kv['measured_bytes_per_token']:.0f} B/token measured "
              f"({kv['config_bytes_per_token']:.0f} config), KV at 128K {100 * kv['per_context_bytes']['131072'] / t128:.1f}% of the teacher's, "
              f"decode {m['decode']['tokens_per_s']:.1f} tok/s ({m['decode']['path']})")
    for line in report.against_teacher_lines(results):
        print(line)
    print(f"report: {os.path.join(a.report_dir, 'report.md')}")
    bad = [m for m in results["models"] if not m["decode_check"]["ok"] or not m["kv"]["measured_equals_config"]]
    for m in bad:
        c = m["decode_check"]
        if not c["ok"]:
            print(f"error: the decode engine's logits for {m['name']} differ from the stock forward (max |diff| {c['max_abs_diff']:.3g}, "
                  f"tolerance {c['tolerance']:.0e} x max(1, max |logit|)); see the report", file=sys.stderr)
        if not m["kv"]["measured_equals_config"]:
            print(f"error: the decode engine's cache for {m['name']} differs from the attention's KV formula in some layer; see the report", file=sys.stderr)
    return 1 if bad else 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    return run_cli(lambda: run(a, strip_debug(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
