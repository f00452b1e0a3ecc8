"""The evaluation report: report.md (tables + plots) and results.json (every number in it).

Files are written to a staging directory inside the report directory and moved into place at the
end, report.md last, so an interrupted evaluation never leaves a report that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import List

from megatron_attnedit.eval import CONTEXTS
from megatron_attnedit.errors import EvalError


def human_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def context_label(c: int) -> str:
    return f"{c // 1024}K" if c % 1024 == 0 else str(c)


def staging_dir(report_dir: str) -> str:
    """Create ``report_dir`` if needed and a staging directory inside it; one line if not writable."""
    try:
        os.makedirs(report_dir, exist_ok=True)
        return tempfile.mkdtemp(prefix=".staging-", dir=report_dir)
    except OSError as e:
        raise EvalError(f"report directory {report_dir} is not writable ({e.strerror}); give a --report-dir you can write to") from None


def publish(staging: str, report_dir: str) -> List[str]:
    """Move the staged files into ``report_dir`` (report.md last); returns their paths."""
    names = sorted(os.listdir(staging), key=lambda n: (n == "report.md", n))
    out = []
    for n in names:
        dst = os.path.join(report_dir, n)
        os.replace(os.path.join(staging, n), dst)
        out.append(dst)
    shutil.rmtree(staging, ignore_errors=True)
    return out


def _fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _kv_cell(b: float, teacher: float, role: str) -> str:
    return human_bytes(b) if role == "teacher" else f"{human_bytes(b)} ({100 * b / teacher:.1f}%)"


def summary_table(results: dict) -> List[str]:
    models = results["models"]
    bpe = models[0]["kv"]["bytes_per_elem"]
    ctx = models[0]["kv"]["positions"]
    head = (
        f"| model | attention | ppl | ppl / teacher | KV B/token config ({ctx} tok) | KV B/token measured | "
        + " | ".join(f"KV @{context_label(c)}" for c in CONTEXTS)
        + " | decode tok/s | params |"
    )
    lines = [head, "|" + "---|" * (8 + len(CONTEXTS))]
    teacher_kv = models[0]["kv"]["per_context_bytes"]
    for m in models:
        kv = m["kv"]
        cells = [
            f"**{m['name']}**" if m["role"] == "teacher" else m["name"],
            kv["description"],
            _fmt(m["ppl"]),
            _fmt(m["ppl_ratio"], ".4f"),
            f"{kv['config_bytes_per_token']:.1f}",
            f"{kv['measured_bytes_per_token']:.1f}",
            *[_kv_cell(kv["per_context_bytes"][str(c)], teacher_kv[str(c)], m["role"]) for c in CONTEXTS],
            f"{m['decode']['tokens_per_s']:.1f}",
            human_count(m["params"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"KV columns: whole model (all layers), cache element {bpe} B ({results['dtype']}); *config* is the attention target's "
        f"formula at the decode's context of {ctx} tokens, *measured* the bytes of the cache tensors the decode engine allocated "
        f"for the greedy decode (exactly its {ctx} positions; a sliding layer keeps min(W, {ctx})) divided by those positions; "
        f"KV @N: one sequence of N tokens, from the formula (in brackets: share of the teacher's). decode tok/s: batch 1, "
        f"the engine's greedy steps after the prefill (see Decode below)."
    )
    return lines


def kv_details(results: dict) -> List[str]:
    lines = ["## KV cache per layer (B/token: measured / formula)", ""]
    for m in results["models"]:
        kv = m["kv"]
        per = ", ".join(f"{b:.1f}" + ("" if math.isclose(b, f, rel_tol=1e-12) else f" / {f:.1f} DIFFERS")
                        for b, f in zip(kv["measured_per_layer_bytes_per_token"], kv["config_per_layer_bytes_per_token"]))
        same = "every layer equals the formula" if kv["measured_equals_config"] else "NOT the formula"
        lines.append(f"- **{m['name']}** ({kv['description']}; {same}): {per}")
    lines.append("")
    return lines


def decode_section(results: dict) -> List[str]:
    lines = [
        "## Decode",
        "",
        "Every model decodes with the project's engine (megatron_attnedit/inference): a static cache allocated for the decode -- "
        "full K/V for GQA layers, the latent (kv_lora_rank) and the RoPE key for MLA layers with W_UK absorbed into the query "
        "and W_UV applied after the attention, a ring buffer of W positions for sliding layers -- a prefill, then one greedy "
        "step per token. Each step's logits are checked teacher-forced against the stock transformers forward over the "
        "decoded tokens; a difference beyond the tolerance stops the evaluation (exit code 1).",
        "",
        "| model | path | steps | max abs logit diff | max abs logit | same greedy tokens | verdict | prefill s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results["models"]:
        c, d = m["decode_check"], m["decode"]
        lines.append(
            f"| {m['name']} | {d['path']} | {c['steps']} | {c['max_abs_diff']:.3g} | {c['max_abs_logit']:.3g} | "
            f"{'yes' if c['tokens_equal'] else 'NO'} | {'pass' if c['ok'] else 'FAIL'} (tol {c['tolerance']:.0e} x max(1, max abs logit)) | "
            f"{d['prefill_s']:.3f} | {d['tokens_per_s']:.1f} |"
        )
    lines.append("")
    return lines


def _windows_text(windows: dict) -> str:
    return ", ".join(f"W={w} ({n})" for n, w in windows.items())


def _probe_total(m: dict) -> str:
    rows = m.get("probe", {}).get("per_distance", [])
    n = sum(r["trials"] for r in rows)
    hits = round(sum(r["exact"] * r["trials"] for r in rows))
    return f"{hits}/{n}" if n else "n/a"


def against_teacher(results: dict) -> List[dict]:
    """Per student, the figures that set it against its teacher (the report's table, the CLI's lines)."""
    models, bp = results["models"], results.get("by_position", {})
    teacher = models[0]
    t32 = teacher["kv"]["per_context_bytes"]["32768"]
    out = []
    for m in models[1:]:
        kv32 = m["kv"]["per_context_bytes"]["32768"]
        row = dict(name=m["name"], attention=m["kv"]["description"], ppl_ratio=m["ppl_ratio"], kv32_fraction=kv32 / t32,
                   probe=_probe_total(m), teacher_probe=_probe_total(teacher), beyond=bp.get("beyond_window", {}).get(m["name"]))
        out.append(row)
    return out


def _beyond_cell(b) -> str:
    if b is None:
        return "n/a (no sliding window)"
    if not b["tokens"]:
        return f"W={b['window']}: no scored token beyond it"
    return f"W={b['window']}: {b['student_nll']:.3f} / {b['teacher_nll']:.3f} ({b['ratio']:.3f}x)"


def against_teacher_table(results: dict) -> List[str]:
    rows = against_teacher(results)
    if not rows:
        return []
    lines = [
        "## Students against the teacher",
        "",
        "| student | attention | ppl / teacher | KV of a 32K sequence / teacher's | loss beyond W: student / teacher (nats) | retrieval probe exact: student / teacher |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['attention']} | {r['ppl_ratio']:.4f} | {100 * r['kv32_fraction']:.1f}% (saves {100 * (1 - r['kv32_fraction']):.1f}%) | "
                     f"{_beyond_cell(r['beyond'])} | {r['probe']} / {r['teacher_probe']} |")
    lines += [
        "",
        "Read across: perplexity on the same held-out tokens (1 = the teacher's); KV cache from the attention target's formula; "
        "*loss beyond W*: mean loss on the predictions that have more than W tokens of context, where the sliding layers no longer see "
        "all of it, next to the teacher's on the same predictions (see Loss by position); *retrieval probe*: keys recalled exactly, "
        "all distances together (see Retrieval probe).",
        "",
    ]
    return lines


def against_teacher_lines(results: dict) -> List[str]:
    """One console line per student."""
    out = []
    for r in against_teacher(results):
        b = r["beyond"]
        beyond = "" if b is None or not b["tokens"] else (
            f", loss beyond W={b['window']} {b['student_nll']:.3f} vs teacher {b['teacher_nll']:.3f} nats ({b['ratio']:.3f}x)")
        out.append(f"{r['name']:>12} vs teacher: ppl {r['ppl_ratio']:.3f}x, KV of a 32K sequence {100 * r['kv32_fraction']:.1f}% of the teacher's"
                   f"{beyond}, retrieval probe exact {r['probe']} (teacher {r['teacher_probe']})")
    return out


def by_position_section(results: dict) -> List[str]:
    bp = results.get("by_position")
    if not bp:
        return []
    models = results["models"]
    marks: dict = {}
    for n, w in bp["windows"].items():
        marks.setdefault(w, []).append(n)
    lines = [
        "## Loss by position in the window",
        "",
        f"Mean loss (nats per token) of the predictions made from a given number of tokens of context: a token's position in the "
        f"{bp['seq_len']}-token scoring window + 1. Every model on the same tokens; students with their loss / the teacher's."
        + (f" Sliding windows: {_windows_text(bp['windows'])}; rows above a window's mark hold the predictions whose context is "
           "longer than the window." if bp["windows"] else ""),
        "",
        "| context (tokens) | predictions | " + " | ".join(m["name"] for m in models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    teacher_rows = bp["models"][models[0]["name"]]
    for i, t in enumerate(teacher_rows):
        mark = f" ← W ({', '.join(marks[t['hi']])})" if t["hi"] in marks else ""
        cells = [t["label"] + mark, str(t["tokens"])]
        for m in models:
            r = bp["models"][m["name"]][i]
            cell = _fmt(r["mean_nll"])
            if m["role"] != "teacher" and r["ratio"] is not None:
                cell += f" ({r['ratio']:.3f}x)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, b in bp["beyond_window"].items():
        w = b["within"]
        if b["tokens"]:
            lines.append(f"- **{name}**, W={b['window']}: on the {b['tokens']:,} predictions with more than {b['window']} tokens of context, loss "
                         f"{b['student_nll']:.4f} vs the teacher's {b['teacher_nll']:.4f} on the same tokens ({b['ratio']:.4f}x); within the window "
                         f"({w['tokens']:,} predictions) {_fmt(w['student_nll'], '.4f')} vs {_fmt(w['teacher_nll'], '.4f')}.")
        else:
            lines.append(f"- **{name}**, W={b['window']}: no scored prediction has more than {b['window']} tokens of context.")
    if bp["beyond_window"]:
        lines.append("")
    return lines


def probe_section(results: dict) -> List[str]:
    p = results.get("probe") or {}
    lines = ["## Retrieval probe", ""]
    if "distances" not in p or p.get("skipped"):
        return lines + [f"Not run: {p.get('skipped', 'no probe settings')}.", ""]
    models = results["models"]
    windows = results.get("by_position", {}).get("windows", {})
    ch = p["chance"]
    lines += [
        f"{p['trials']} prompts per distance, each exactly {p['context']} tokens of held-out text with one line `KEY_nnnn = \"ddddd\"` "
        f"(random name and {p['key_digits']}-digit value) inserted and the same statement repeated up to the value at the end "
        f"(`KEY_nnnn = \"`); each model completes it greedily. *Distance*: tokens from the value's first token to the prompt's last "
        f"(seed {p['seed']}: the same prompts for every model). Cells: exact matches (value and closing quote) / trials, and the share "
        f"of the value's characters right. Chance: {ch['exact']:.0e} exact, {100 * ch['per_char']:.0f}% per character. A model that "
        "copies from its context answers whatever the distance; a sliding-window layer sees only the last W tokens.",
        "",
        "| distance (tokens) | " + " | ".join(m["name"] for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for i, d in enumerate(p["distances"]):
        beyond = [n for n, w in windows.items() if d >= w]
        cells = [str(d) + (f" (≥ W of {', '.join(beyond)})" if beyond else "")]
        for m in models:
            r = m["probe"]["per_distance"][i]
            cells.append(f"{round(r['exact'] * r['trials'])}/{r['trials']}, chars {100 * r['per_char']:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def markdown(results: dict) -> str:
    d = results["data"]
    lines = [
        "# Evaluation report",
        "",
        f"`{results['command']}`",
        "",
        f"- data: {d['source']}; {d['scored_tokens']:,} tokens scored in {d['windows']} window(s) of {d['seq_len']} (stride {d['stride']})",
        f"- tokenizer checks: {', '.join(d['checks'])}",
        f"- device {results['device']}, dtype {results['dtype']}; decode: batch 1, {results['decode']['prompt_tokens']}-token prompt from the data, "
        f"{results['decode']['new_tokens']} greedy steps (tok/s counts the steps after the prefill)",
        f"- {results['created']}, {results['seconds']:.1f} s",
        "",
        "## Summary",
        "",
        *summary_table(results),
        "",
        *against_teacher_table(results),
        *by_position_section(results),
        *probe_section(results),
        *kv_details(results),
        *decode_section(results),
        "## Plots",
        "",
    ]
    for title, key in (("Loss by position in the window", "by_position"), ("Retrieval probe", "probe"), ("KV cache against context length", "kv"),
                       ("Stage 1: loss per layer", "stage1"), ("Stage 2", "stage2")):
        p = results["plots"].get(key)
        lines += [f"### {title}", "", f"![{title}]({p})" if p else results["plot_notes"].get(key, "not plotted"), ""]
    if results.get("training_runs"):
        lines += ["Training runs read: " + "; ".join(f"{r['label']} ({r['stage']}, {r['source']})" for r in results["training_runs"]), ""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


def write(staging: str, results: dict) -> None:
    with open(os.path.join(staging, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(staging, "report.md"), "w") as f:
        f.write(markdown(results) + "\n")
