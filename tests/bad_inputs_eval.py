"""Bad inputs and faults of ``python -m megatron_attnedit.evaluate``, one row each.

A row names how to damage the good inputs (``make(ws) -> {placeholder: path}``), the argv with
``{placeholders}``, the exit code and a piece of the one ``error:`` line stderr must end with.
Good inputs (``EvalWorkspace``): a teacher (tiny Qwen3 + the corpus' SentencePiece tokenizer), a
student that is a copy of it, held-out data as an indexed dataset and as a text file, and a fresh
report directory ``{out}`` that must not exist afterwards (or be unchanged when a row makes it).
Walked by tests/test_reliability_eval.py; the converter rows are in tests/bad_inputs.py and the
``train`` rows in tests/bad_inputs_train.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Callable, Dict, Tuple


@dataclasses.dataclass(frozen=True)
class EvalCase:
    name: str
    make: Callable[["EvalWorkspace", str], Dict[str, str]]
    argv: Tuple[str, ...]
    exit_code: int
    fragment: str


class EvalWorkspace:
    def __init__(self, root: str, teacher: str, prefix: str, text: str):
        self.root, self.teacher, self.prefix, self.text = root, teacher, prefix, text

    def case_dir(self, case: str) -> str:
        d = os.path.join(self.root, case)
        os.makedirs(d, exist_ok=True)
        return d

    def student(self, case: str, edit: Callable[[str], None] = lambda d: None) -> str:
        d = os.path.join(self.case_dir(case), "student")
        shutil.copytree(self.teacher, d)
        edit(d)
        return d


def _config(d: str, **kw) -> None:
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg.update(kw)
    json.dump(cfg, open(p, "w"))


def _write(path: str, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)


def _truncate_weights(d: str) -> None:
    name = next(n for n in os.listdir(d) if n.endswith(".safetensors"))
    p = os.path.join(d, name)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def _nan_weights(d: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    name = next(n for n in os.listdir(d) if n.endswith(".safetensors"))
    p = os.path.join(d, name)
    sd = load_file(p)
    key = next(k for k in sd if k.endswith("o_proj.weight"))
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, p, metadata={"format": "pt"})


def _student(edit=lambda d: None):
    return lambda ws, case: {"student": ws.student(case, edit)}


def _file(name: str, text: str):
    def make(ws, case):
        p = os.path.join(ws.case_dir(case), name)
        _write(p, text)
        return {"file": p}

    return make


def _report_is_a_file(ws, case):
    p = os.path.join(ws.case_dir(case), "report")
    _write(p, "not a directory\n")
    return {"out": p}


def _no_config(ws, case):
    d = ws.student(case)
    os.remove(os.path.join(d, "config.json"))
    return {"student": d}


def _teacher_not_json(ws, case):
    d = os.path.join(ws.case_dir(case), "teacher")
    shutil.copytree(ws.teacher, d)
    _write(os.path.join(d, "config.json"), '{"model_type": "qwen3",')
    return {"bad_teacher": d}


_BASE = ("--teacher", "{teacher}", "--report-dir", "{out}", "--max-tokens", "256", "--seq-length", "64",
         "--decode-tokens", "4", "--prompt-tokens", "8", "--probe-trials", "0", "--device", "cpu")
_DATA = ("--data", "{prefix}")

CASES = [
    EvalCase("teacher_not_a_model_dir", lambda ws, c: {"empty": ws.case_dir(c)},
             ("--teacher", "{empty}", "--report-dir", "{out}", *_DATA), 2, "no config.json"),
    EvalCase("teacher_config_not_json", _teacher_not_json,
             ("--teacher", "{bad_teacher}", "--report-dir", "{out}", *_DATA), 2, "not valid JSON"),
    EvalCase("student_without_config", _no_config, (*_BASE, *_DATA, "--student", "s={student}"), 2, "no config.json"),
    EvalCase("student_vocab_differs", _student(lambda d: _config(d, vocab_size=300)),
             (*_BASE, *_DATA, "--student", "s={student}"), 2, "vocab_size"),
    EvalCase("student_unknown_attention", _student(lambda d: _config(d, model_type="gpt2")),
             (*_BASE, *_DATA, "--student", "s={student}"), 2, "gpt2"),
    EvalCase("student_weights_truncated", _student(_truncate_weights),
             (*_BASE, *_DATA, "--student", "s={student}"), 2, "cannot load"),
    EvalCase("student_weights_not_numbers", _student(_nan_weights),
             (*_BASE, *_DATA, "--student", "s={student}"), 2, "not finite"),
    EvalCase("names_repeat", _student(), (*_BASE, *_DATA, "--student", "teacher={student}"), 2, "names repeat"),
    EvalCase("data_missing", lambda ws, c: {"file": os.path.join(ws.case_dir(c), "nope.txt")},
             (*_BASE, "--data", "{file}"), 2, "nope.txt"),
    EvalCase("data_empty_file", _file("empty.txt", ""), (*_BASE, "--data", "{file}"), 2, "empty.txt"),
    EvalCase("data_too_short_for_one_window", _file("short.py", "x = 1\n"), (*_BASE, "--data", "{file}"), 2, "--seq-length"),
    EvalCase("data_binary_garbage", _file("garbage.bin", "\x00\x01\x02" * 10), (*_BASE, "--data", "{file}"), 2, "garbage"),
    EvalCase("window_longer_than_trained", lambda ws, c: {},
             ("--teacher", "{teacher}", "--report-dir", "{out}", "--seq-length", "100000", "--probe-trials", "0", *_DATA),
             2, "max_position_embeddings"),
    EvalCase("stride_zero", lambda ws, c: {}, (*_BASE, *_DATA, "--stride", "0"), 2, "--stride"),
    EvalCase("prompt_tokens_zero", lambda ws, c: {}, (*_BASE[:-6], "--prompt-tokens", "0", "--probe-trials", "0", *_DATA),
             2, "--prompt-tokens"),
    EvalCase("report_dir_is_a_file", _report_is_a_file, (*_BASE, *_DATA), 2, "report"),
    EvalCase("cuda_without_cuda", lambda ws, c: {}, (*_BASE[:-2], "--device", "cuda", *_DATA), 2, "cuda"),
]
