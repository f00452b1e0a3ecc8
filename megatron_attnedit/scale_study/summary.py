"""The study's own record: study.json (raw) and study.md (the table), from the training runs'
metrics.jsonl and evaluate's results.json.

Stage losses: the runs log every step (``training.log_interval: 1``), so ``start`` is step 1's
loss -- computed on the initialised student, before any update -- and ``end`` the mean of the
last 10% of steps (``end_spread``: their standard deviation, the step-to-step noise). A stage
"ended below its start" when start - end exceeds twice that spread. For stage 1 each layer's
normalized MSE gets the same figures plus ``late_drop``: how much it still fell over the last
quarter of the stage (mean of the 10% of steps before the last quarter vs the last 10%), which
says whether more stage-1 tokens would have helped.

Figures evaluate adds when it can (loss by token distance, loss beyond the GateSWA window against
the teacher's on the same tokens, the retrieval probe) are read when results.json has them and
reported as missing otherwise.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Dict, List, Optional

from megatron_attnedit.scale_study import plan as plan_lib


def read_curve(run_dir: str) -> Dict[int, dict]:
    rows: Dict[int, dict] = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return rows
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                rows.setdefault(int(rec.pop("iteration")), {}).update(rec)
    return rows


def start_end(rows: Dict[int, dict], key: str) -> Optional[dict]:
    its = sorted(i for i, r in rows.items() if key in r and r[key] is not None and math.isfinite(r[key]))
    if len(its) < 2:
        return None
    vals = [rows[i][key] for i in its]
    tail = vals[-max(1, len(vals) // 10):]
    n_q = max(1, len(vals) // 10)
    before_last_quarter = vals[max(0, int(len(vals) * 0.75) - n_q): max(1, int(len(vals) * 0.75))]
    end = statistics.fmean(tail)
    spread = statistics.pstdev(tail) if len(tail) > 1 else 0.0
    mid = statistics.fmean(before_last_quarter)
    return {"start": vals[0], "start_iteration": its[0], "end": end, "end_spread": spread, "steps": its[-1],
            "ended_below_start": vals[0] - end > 2 * spread and end < vals[0],
            "late_drop": (mid - end) / mid if mid > 1e-6 else None, "curve": [[i, round(v, 6)] for i, v in zip(its, vals)]}


def stage_record(run_dir: str, stage: str) -> dict:
    rows = read_curve(run_dir)
    main = start_end(rows, "stage2/kl" if stage == "stage2" else "loss")
    rec = {"run_dir": run_dir, "loss": main, "tokens_per_s": _last(rows, "tokens_per_s")}
    if stage == "stage1":
        layers = sorted({k for r in rows.values() for k in r if k.startswith("stage1/layer_")})
        rec["layers"] = {k.split("_")[-1]: _no_curve(start_end(rows, k)) for k in layers}
    return rec


def _no_curve(r: Optional[dict]) -> Optional[dict]:
    return None if r is None else {k: v for k, v in r.items() if k != "curve"}


def _last(rows: Dict[int, dict], key: str) -> Optional[float]:
    vals = [r[key] for _, r in sorted(rows.items()) if key in r]
    return vals[-1] if vals else None


def teacher_record(run_dir: str, sizes: plan_lib.Sizes) -> dict:
    rows = read_curve(run_dir)
    st = plan_lib.steps(sizes)["teacher"]
    val = [[i, r["val_loss"]] for i, r in sorted(rows.items()) if "val_loss" in r]
    done = max(rows) if rows else 0
    return {"architecture": dict(sizes.arch, vocab_size=4096, model_type="qwen3"), "parameters": plan_lib.param_count(sizes.arch),
            "flops_per_token": plan_lib.flops_per_token(sizes.arch, sizes.seq), "steps": done, "seq_length": sizes.seq,
            "global_batch_size": st["gbs"], "tokens_seen": done * st["gbs"] * sizes.seq, "loss": start_end(rows, "loss"),
            "val_curve": val, "final_val_loss": val[-1][1] if val else None, "tokens_per_s": _last(rows, "tokens_per_s")}


def probe_accuracy(probe: Optional[dict], window: int) -> dict:
    """Exact-match accuracy of the retrieval probe (evaluate's per-distance results), trials-weighted,
    for distances beyond the window and within it."""
    rows = (probe or {}).get("per_distance") or []
    out = {}
    for side, keep in (("beyond_w", lambda d: d > window), ("within_w", lambda d: d <= window)):
        sel = [r for r in rows if keep(r["distance"])]
        n = sum(r["trials"] for r in sel)
        out[side] = sum(r["exact"] * r["trials"] for r in sel) / n if n else None
        out[f"{side}_trials"] = n
    out["per_distance"] = [{k: r[k] for k in ("distance", "trials", "exact", "per_char") if k in r} for r in rows]
    return out


def model_record(m: dict, results: dict, window: int) -> dict:
    """One model's evaluation figures; the distance and probe figures only when evaluate made them."""
    models = {x["name"]: x for x in results["models"]}
    teacher = models["teacher"]
    kv, tkv = m.get("kv") or {}, teacher.get("kv") or {}
    t4k = (tkv.get("per_context_bytes") or {}).get("4096")
    rec = {"ppl": m.get("ppl"), "ppl_ratio": m.get("ppl_ratio"), "mean_nll": m.get("mean_nll"), "scored_tokens": m.get("scored_tokens"),
           "params": m.get("params"), "kv_attention": kv.get("description"),
           "kv_fraction_4k": (kv.get("per_context_bytes") or {}).get("4096", float("nan")) / t4k if t4k else None,
           "kv_measured_bytes_per_token": kv.get("measured_bytes_per_token"), "kv_config_bytes_per_token": kv.get("config_bytes_per_token"),
           "kv_positions": kv.get("positions")}
    # both at the decode's context (prompt + new tokens = the evaluation window): formula vs cache tensors
    if tkv.get("config_bytes_per_token") and kv.get("config_bytes_per_token") is not None:
        rec["kv_formula_fraction"] = kv["config_bytes_per_token"] / tkv["config_bytes_per_token"]
    if tkv.get("measured_bytes_per_token") and kv.get("measured_bytes_per_token") is not None:
        rec["kv_measured_fraction"] = kv["measured_bytes_per_token"] / tkv["measured_bytes_per_token"]
    by_pos = results.get("by_position") or {}
    beyond = (by_pos.get("beyond_window") or {}).get(m["name"])
    rec["loss_beyond_w"] = beyond
    rec["loss_beyond_w_ratio"] = (beyond or {}).get("ratio")
    rec["loss_by_distance"] = (by_pos.get("models") or {}).get(m["name"])
    rec["probe"] = probe_accuracy(m.get("probe"), window) if m.get("probe") else None
    rec["probe_beyond_w"] = (rec["probe"] or {}).get("beyond_w")
    return rec


def build(out: str, sizes: plan_lib.Sizes, data: dict, results: dict, times: Dict[str, dict], estimate: dict, device: str,
          command: str, wall_s: float, scale: float) -> dict:
    models = {m["name"]: m for m in results["models"]}
    mla_opts = plan_lib.recipe("mla")["target"]["options"]
    g_opts = plan_lib.recipe("gateswa")["target"]["options"]
    students = {}
    for name in plan_lib.STUDENTS:
        target, with_stage1 = plan_lib.CHAINS[name]
        tdir = os.path.join(out, target)
        stages = {"stage2": stage_record(os.path.join(tdir, "stage2" if with_stage1 else "stage2_no_stage1"), "stage2")}
        if with_stage1:
            stages = {"stage1": stage_record(os.path.join(tdir, "stage1"), "stage1"), **stages}
        students[name] = {"target": target, "with_stage1": with_stage1, **model_record(models[name], results, sizes.window),
                          "stages": stages}
    m = data["manifest"]
    return {
        "profile": sizes.profile, "device": device, "command": command, "wall_s": round(wall_s, 1),
        "phases": times, "estimate_s": {k: round(v, 1) for k, v in estimate.items()}, "stage_steps_scale": scale,
        "corpus": {"source": m["source"], "interpreter": m["interpreter"]["version"], "packages": m["packages"], "splits": m["splits"],
                   "skipped": m["skipped"], "recall_drills": m.get("recall_drills"), "max_bytes": m["max_bytes"], "valid_fraction": m["valid_fraction"],
                   "split_rule": m["split_rule"], "dedup": m["dedup"], "bytes_per_token": data["bytes_per_token"],
                   "tokenizer": data.get("tokenizer_why"), "seconds": data["seconds"]},
        "teacher": {**teacher_record(os.path.join(out, "teacher"), sizes), **model_record(models["teacher"], results, sizes.window)},
        "students": students,
        "targets": {"mla": mla_opts, "gateswa": g_opts, "window": sizes.window},
        "evaluation": {k: results.get(k) for k in ("command", "device", "dtype", "data", "decode", "probe", "plots", "seconds")},
    }


def _f(x, fmt="{:.3f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _se(rec: Optional[dict]) -> str:
    if not rec:
        return "n/a"
    return f"{rec['start']:.4g} -> {rec['end']:.4g}" + ("" if rec["ended_below_start"] else " (not below start)")


def markdown(s: dict) -> str:
    t, ev = s["teacher"], s["evaluation"]["data"] or {}
    lines = [f"Held-out: {ev.get('scored_tokens', 'n/a')} tokens of the package corpus's held-out files in windows of "
             f"{ev.get('seq_len', 'n/a')}; device {s['device']}; whole study {s['wall_s']:.0f} s.", "",
             f"| model | held-out ppl | / teacher | loss beyond W / teacher's | probe beyond W (exact) | KV / teacher at {t.get('kv_positions')} tokens (formula; measured) "
             "| stage 1 loss start -> end | stage 2 KL start -> end |",
             "|---|---|---|---|---|---|---|---|",
             f"| teacher | {_f(t['ppl'])} | 1 | 1 | {_f(t.get('probe_beyond_w'), '{:.2f}')} | 100% | | |"]
    for name, m in s["students"].items():
        st = m["stages"]
        lines.append(f"| {name} ({m['kv_attention']}) | {_f(m['ppl'])} | {_f(m['ppl_ratio'])} | {_f(m['loss_beyond_w_ratio'])} | "
                     f"{_f(m.get('probe_beyond_w'), '{:.2f}')} | {_f(m.get('kv_formula_fraction'), '{:.1%}')}; {_f(m.get('kv_measured_fraction'), '{:.1%}')} | "
                     f"{_se((st.get('stage1') or {}).get('loss')) if 'stage1' in st else 'none'} | {_se(st['stage2']['loss'])} |")
    lines += ["", f"Teacher: {t['parameters'] / 1e6:.1f}M parameters, {t['steps']} steps x {t['global_batch_size']} x {t['seq_length']} = "
              f"{t['tokens_seen'] / 1e6:.1f}M tokens seen at {_f(t['tokens_per_s'], '{:,.0f}')} tokens/s; train loss "
              f"{_se(t['loss'])}, held-out loss in the loop {_f(t['final_val_loss'], '{:.4f}')}. Probe beyond W: exact-match share "
              f"of the retrieval probe's trials whose key is more than W={s['targets']['window']} tokens back."]
    lines += ["", "| phase | wall s | start-up s | training s | save + exit s |", "|---|---|---|---|---|"]
    for name, p in s["phases"].items():
        lines.append(f"| {name} | {p['wall_s']:.0f} | {_f(p.get('startup_s'), '{:.0f}')} | {_f(p.get('train_s'), '{:.0f}')} | {_f(p.get('finish_s'), '{:.0f}')} |")
    c = s["corpus"]
    sp = c["splits"]
    lines += ["", f"Corpus: {len(c['packages'])} installed packages' Python sources (Python {c['interpreter']}), "
              f"{sp['train']['files']:,} train / {sp['valid']['files']:,} held-out files, {sp['train']['tokens']:,} / {sp['valid']['tokens']:,} "
              f"tokens ({c['bytes_per_token']['train']:.2f} bytes per token); duplicates dropped: {c['skipped'].get('duplicate', 0)}."]
    rd = c.get("recall_drills") or {}
    if rd.get("drills"):
        lines += ["", f"Recall drills (data/recall.py): {rd['files']:,} of the {sp['train']['files']:,} training files carry {rd['drills']:,} "
                  f"key lines of the form `{rd['line']}`, each stated and repeated further down the file (held-out files carry none): "
                  "the teacher and the students learn to copy a value from far back, which the retrieval probe asks of them."]
    for name, m in s["students"].items():
        layers = (m["stages"].get("stage1") or {}).get("layers") or {}
        if layers:
            drops = ", ".join(f"{k}: {_f(v and v['start'], '{:.3f}')}->{_f(v and v['end'], '{:.3f}')} ({_f(v and v['late_drop'], '{:.0%}')})"
                              for k, v in layers.items())
            lines.append(f"\n{name} stage 1 per layer (start->end, drop over the last quarter): {drops}")
    return "\n".join(lines) + "\n"


def write(out: str, study: dict) -> None:
    for name, text in (("study.json", json.dumps(study, indent=1) + "\n"), ("study.md", markdown(study))):
        tmp = os.path.join(out, f".{name}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def plot(out: str, study: dict) -> List[str]:
    """study_curves.png: every stage's loss against its step (stage 1: mean normalized MSE; stage 2: KL)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in study["students"].items():
        for ax, stage in zip(axes, ("stage1", "stage2")):
            rec = (m["stages"].get(stage) or {}).get("loss")
            if rec:
                its, vals = zip(*rec["curve"])
                ax.plot(its, vals, label=name)
    for ax, title in zip(axes, ("stage 1: mean normalized MSE over layers", "stage 2: KL(teacher || student)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "study_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
