"""KV-cache accounting: teacher vs student, per token and per sequence.

  python -m megatron_attnedit.kv_report --hf-dir DIR --target mla|gate_swa [target options]
  python -m megatron_attnedit.kv_report --preset qwen3-8b --target gate_swa --window 4096 --pattern SSSSSF

Per token means the whole model's cache divided by the context length: GQA and MLA layers cost the
same for every token, a sliding layer caches min(W, context) tokens whatever the context.
``--json`` prints the same figures as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

CONTEXTS = (4096, 32768, 131072)


def _parse_pattern(s: str):
    """"SSSSSF" stays a tiled string, "auto:K" stays as is, "S,S,F,..." becomes an explicit list."""
    return s.split(",") if "," in s else s


OPTION_FLAGS = {
    # flag: (option name, type)
    "--window": ("window", int),
    "--pattern": ("pattern", _parse_pattern),
    "--gate": ("gate", str),
    "--sinks": ("sinks", None),
    "--kv-lora-rank": ("kv_lora_rank", int),
    "--q-lora-rank": ("q_lora_rank", int),
    "--qk-head-dim": ("qk_head_dim", int),
    "--qk-pos-emb-head-dim": ("qk_pos_emb_head_dim", int),
    "--v-head-dim": ("v_head_dim", int),
}


def human(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def report(hf_cfg: dict, target_name: str, options: dict, bytes_per_elem: int = 2, contexts=CONTEXTS) -> dict:
    from megatron_attnedit.attention.targets import TargetConfig, get_target, teacher_kv_bytes_per_token

    tc = TargetConfig(target_name, options)
    t = get_target(tc.name)
    t.validate(hf_cfg, tc.options)
    layers = int(hf_cfg["num_hidden_layers"])
    teacher = teacher_kv_bytes_per_token(hf_cfg, bytes_per_elem)
    rows = []
    for c in contexts:
        student = t.kv_bytes_per_token(hf_cfg, tc.options, c, bytes_per_elem)
        rows.append(
            dict(
                context=c,
                teacher_bytes_per_token=teacher,
                student_bytes_per_token=student,
                student_bytes_per_token_per_layer=student / layers,
                teacher_bytes_per_sequence=teacher * c,
                student_bytes_per_sequence=student * c,
                student_fraction=student / teacher,
                reduction=1.0 - student / teacher,
            )
        )
    kinds = t.layer_kinds(hf_cfg, tc.options)
    return dict(
        target=tc.name,
        options=t.resolve(hf_cfg, tc.options),
        layers=layers,
        layer_kinds="".join(kinds),
        bytes_per_elem=bytes_per_elem,
        teacher_bytes_per_token_per_layer=teacher / layers,
        contexts=rows,
    )


def format_report(r: dict) -> str:
    lines = [
        f"target {r['target']}: " + ", ".join(f"{k}={v}" for k, v in r["options"].items()),
        f"layers: {r['layers']} ({r['layer_kinds']}); cache element {r['bytes_per_elem']} B; "
        f"teacher {r['teacher_bytes_per_token_per_layer']:.0f} B per token per layer",
        f"{'context':>8} {'teacher B/token':>16} {'student B/token':>16} {'teacher / seq':>14} {'student / seq':>14} {'student':>8} {'saved':>7}",
    ]
    for row in r["contexts"]:
        lines.append(
            f"{row['context']:>8} {row['teacher_bytes_per_token']:>16.0f} {row['student_bytes_per_token']:>16.1f} "
            f"{human(row['teacher_bytes_per_sequence']):>14} {human(row['student_bytes_per_sequence']):>14} "
            f"{100 * row['student_fraction']:>7.1f}% {100 * row['reduction']:>6.1f}%"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_attnedit.kv_report", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="Hugging Face model directory (its config.json is read)")
    src.add_argument("--preset", help="a built-in config instead (qwen3-8b, qwen3-30b-a3b, ...)")
    ap.add_argument("--target", required=True, help="mla | gate_swa | gqa")
    ap.add_argument("--bytes-per-elem", type=int, default=2, help="cache element size (2 = bf16)")
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="comma-separated context lengths")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (also ATTNEDIT_DEBUG=1)")
    for flag, (name, typ) in OPTION_FLAGS.items():
        if typ is None:
            ap.add_argument(flag, dest=name, action="store_true", default=None)
        else:
            ap.add_argument(flag, dest=name, type=typ, default=None)
    a = ap.parse_args(argv)

    from megatron_attnedit.errors import UserError, run_cli
    from megatron_attnedit import families

    def body():
        cfg = families.load_hf_config(a.hf_dir) if a.hf_dir else families.config_for_preset(a.preset)
        options = {name: getattr(a, name) for name, _ in OPTION_FLAGS.values() if getattr(a, name) is not None}
        try:
            contexts = tuple(int(c) for c in a.contexts.split(","))
        except ValueError:
            raise UserError(f"--contexts {a.contexts!r} must be comma-separated integers, e.g. 4096,32768") from None
        r = report(cfg, a.target, options, a.bytes_per_elem, contexts)
        print(json.dumps(r, indent=1) if a.json else format_report(r))

    return run_cli(body, argv)


if __name__ == "__main__":
    sys.exit(main())
