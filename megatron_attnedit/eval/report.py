"""The evaluation report: report.md (tables + plots) and results.json (every number in it).

Files are written to a staging directory inside the report directory and moved into place at the
end, report.md last, so an interrupted evaluation never leaves a report that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import List

from megatron_attnedit.eval import CONTEXTS, EvalError


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
            f"{m['decode']['tokens_per_s']:.1f}" + (" (absorbed)" if m["decode"].get("path") == "absorbed MLA" else ""),
            human_count(m["params"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"KV columns: whole model (all layers), cache element {bpe} B ({results['dtype']}); *config* is the attention target's "
        f"formula at the decode's context of {ctx} tokens, *measured* the bytes of the cache tensors after the greedy decode "
        f"divided by the {ctx} positions cached; KV @N: one sequence of N tokens, from the formula (in brackets: share of the teacher's)."
    )
    return lines


def kv_details(results: dict) -> List[str]:
    lines = ["## KV cache per layer (measured, B/token)", ""]
    for m in results["models"]:
        kv = m["kv"]
        per = ", ".join(f"{b:.1f}" for b in kv["measured_per_layer_bytes_per_token"])
        lines.append(f"- **{m['name']}** ({kv['description']}): {per}")
        if "stock_cache" in kv:
            s = kv["stock_cache"]
            lines.append(f"  - stock transformers cache of the same decode: {s['bytes_per_token']:.1f} B/token")
    lines.append("")
    return lines


def mla_section(results: dict) -> List[str]:
    mla = [m for m in results["models"] if "mla_check" in m]
    if not mla:
        return []
    lines = [
        "## MLA absorbed decode",
        "",
        "Decode with the latent cache (kv_lora_rank + qk_rope_head_dim per token per layer), W_UK absorbed into the query and "
        "W_UV applied after the attention; checked teacher-forced against the stock transformers forward over the decoded tokens.",
        "",
        "| model | steps | max abs logit diff | max abs logit | same greedy tokens | verdict | absorbed tok/s | stock tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in mla:
        c = m["mla_check"]
        lines.append(
            f"| {m['name']} | {c['steps']} | {c['max_abs_diff']:.3g} | {c['max_abs_logit']:.3g} | {'yes' if c['tokens_equal'] else 'NO'} | "
            f"{'pass' if c['ok'] else 'FAIL'} (tol {c['tolerance']:.0e} x max(1, max abs logit)) | {m['decode']['tokens_per_s']:.1f} | "
            f"{m['stock_decode']['tokens_per_s']:.1f} |"
        )
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
        *kv_details(results),
        *mla_section(results),
        "## Plots",
        "",
    ]
    for title, key in (("KV cache against context length", "kv"), ("Stage 1: loss per layer", "stage1"), ("Stage 2", "stage2")):
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
