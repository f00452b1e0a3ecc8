"""KV-cache accounting: teacher vs student, per token and per sequence.

  python -m megatron_attnedit.kv_report --hf-dir DIR --target mla|gate_swa [target options]
  python -m megatron_attnedit.kv_report --preset qwen3-8b --target gate_swa --window 4096 --pattern SSSSSF

Per token means the whole model's cache divided by the context length: GQA and MLA layers cost the
same for every token, a sliding layer caches min(W, context) tokens whatever the context.
``--json`` prints the same figures as one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import List, Optional

from megatron_attnedit import families
from megatron_attnedit.cli import args
from megatron_attnedit.config import TargetConfig
from megatron_attnedit.errors import UserError, run_cli
from megatron_attnedit.targets import TARGETS, get_target
from megatron_attnedit.targets.base import teacher_kv_bytes_per_token

CONTEXTS = (4096, 32768, 131072)


def _parse_pattern(s: str):
    """"SSSSSF" stays a tiled string, "auto:K" stays as is, "S,S,F,..." becomes an explicit list."""
    return s.split(",") if "," in s else s


def _flag_type(field):
    """How a target option's command-line value is read (None: a switch)."""
    if field.name == "pattern":
        return _parse_pattern
    default = field.default
    if isinstance(default, bool):
        return None
    if isinstance(default, float):
        return float
    if isinstance(default, int) or field.name.endswith(("_rank", "_dim", "_tokens")):
        return int
    return str


def option_flags():
    """--<option> for every option of every target (``Options`` fields: a new target's options come
    with it): flag -> (option name, type)."""
    flags = {}
    for t in TARGETS.values():
        for f in dataclasses.fields(t.Options):
            if not f.metadata.get("derived"):
                flags.setdefault("--" + f.name.replace("_", "-"), (f.name, _flag_type(f)))
    return flags


def human(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def report(hf_cfg: dict, target_name: str, options: dict, bytes_per_elem: int = 2, contexts=CONTEXTS) -> dict:
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
        options=t.options_record(hf_cfg, tc.options),
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
    ap = args.parser("attnedit kv-report", __doc__.splitlines()[0],
                     "  attnedit kv-report --preset qwen3-8b --target gate_swa --window 4096 --pattern SSSSSF\n"
                     "  attnedit kv-report --hf-dir /models/Qwen3-8B --target mla --kv-lora-rank 512 --json\n"
                     "  (same as: python -m megatron_attnedit.kv_report ...)")
    src = ap.add_mutually_exclusive_group(required=True)
    args.hf_dir(src, "Hugging Face model directory (its config.json is read)", required=False)
    src.add_argument("--preset", help="a built-in config instead (qwen3-8b, qwen3-30b-a3b, ...)")
    ap.add_argument("--target", required=True, help=" | ".join(TARGETS))
    ap.add_argument("--bytes-per-elem", type=int, default=2, help="cache element size (2 = bf16)")
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="comma-separated context lengths")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args.debug(ap)
    flags = option_flags()
    for flag, (name, typ) in flags.items():
        if typ is None:
            ap.add_argument(flag, dest=name, action="store_true", default=None)
        else:
            ap.add_argument(flag, dest=name, type=typ, default=None)
    a = ap.parse_args(argv)

    def body():
        cfg = families.load_hf_config(a.hf_dir) if a.hf_dir else families.config_for_preset(a.preset)
        options = {name: getattr(a, name) for name, _ in flags.values() if getattr(a, name) is not None}
        try:
            contexts = tuple(int(c) for c in a.contexts.split(","))
        except ValueError:
            raise UserError(f"--contexts {a.contexts!r} must be comma-separated integers, e.g. 4096,32768") from None
        r = report(cfg, a.target, options, a.bytes_per_elem, contexts)
        print(json.dumps(r, indent=1) if a.json else format_report(r))

    return run_cli(body, argv)


if __name__ == "__main__":
    sys.exit(main())
