"""``evaluate`` under bad input: every row of tests/bad_inputs_eval.py ends in one ``error:`` line
(stderr's last, no traceback), its exit code, and no report directory left behind (or the one in
the way unchanged). Rows run in this process through ``evaluate.main`` (the same ``run_cli`` as
the command line), so the imports are paid once."""

import os
import shutil

import pytest

import training_data
from bad_inputs_eval import CASES, EvalWorkspace
from megatron_attnedit import evaluate
from megatron_attnedit.testing import make_tiny_hf


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_bad")
    corpus = training_data.make_corpus(str(base / "data"), n_docs=40)
    teacher = str(base / "teacher")
    make_tiny_hf(teacher, "qwen3-debug", seed=1)
    shutil.copy(corpus["tokenizer"], os.path.join(teacher, "tokenizer.model"))
    text = str(base / "heldout.py")
    with open(text, "w") as f:
        f.write("def f(x):\n    return x + 1\n" * 200)
    return EvalWorkspace(str(base / "cases"), teacher, corpus["prefix"], text)


def _snapshot(path):
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return ("file", open(path, "rb").read())
    return ("dir", sorted(os.listdir(path)))


def test_the_table_is_large_enough():
    assert len(CASES) >= 15 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_one_line_nothing_written(ws, case, capsys):
    paths = dict(teacher=ws.teacher, prefix=ws.prefix, text=ws.text, out=os.path.join(ws.case_dir(case.name), "report"))
    paths.update(case.make(ws, case.name))
    before = _snapshot(paths["out"])
    argv = [a.format(**paths) for a in case.argv]
    capsys.readouterr()
    rc = evaluate.main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert rc == case.exit_code, (rc, err)
    assert err and err[-1].startswith("error: ") and case.fragment in err[-1], err
    assert not any("Traceback" in line for line in err), err
    assert _snapshot(paths["out"]) == before, f"{paths['out']} changed"
    parent = os.path.dirname(paths["out"])
    assert not [n for n in os.listdir(parent) if n.startswith(".staging")], os.listdir(parent)
