"""The one command, ``attnedit`` (megatron_attnedit/cli/main.py, setup.py's console entry point):
every subcommand is listed and answers --help with examples; shared flags mean the same in every
command; an unknown command or a bad ``distill`` call is one line and exit 2; ``distill`` is
``train --recipe R --stage stageN``; the old entry points still run the same code."""

import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from megatron_attnedit.cli import main as cli

REQUIRED = {"convert", "export", "train", "distill", "evaluate", "kv-report", "preprocess", "bench", "quickstart"}


def run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "megatron_attnedit.cli", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def test_console_entry_point_and_command_list():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    consts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert "attnedit=megatron_attnedit.cli.main:main" in consts
    assert REQUIRED <= set(cli.COMMANDS)
    out = run("--help")
    assert out.returncode == 0 and "examples:" in out.stdout
    for name in cli.COMMANDS:
        assert f"  {name} " in out.stdout, name


@pytest.mark.parametrize("name", ["convert", "export", "gguf", "preprocess", "train", "evaluate", "kv-report", "quickstart"])
def test_every_command_has_help_with_examples(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: attnedit {name}") and "examples:" in out
    assert "--debug" in out


def test_shared_flags_are_defined_once(capsys):
    """--debug, --overwrite, --no-progress, --dtype read the same in the commands that take them."""
    helps = {}
    for name in ("convert", "export", "gguf", "evaluate", "kv-report", "train"):
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        helps[name] = " ".join(capsys.readouterr().out.split())
    debug = "show the traceback of an error (also ATTNEDIT_DEBUG=1)"
    assert all(debug in h for h in helps.values())
    overwrite = "replace what this tool wrote before at"
    assert all(overwrite in helps[n] for n in ("convert", "export", "gguf"))


def test_unknown_command_and_bad_distill_are_one_line(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown command 'frobnicate'")
    assert cli.main(["distill", "3", "tiny_mla"]) == 2
    assert "usage: attnedit distill 1|2 RECIPE" in capsys.readouterr().err


def test_distill_is_train_with_the_stage(monkeypatch):
    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "train", ("megatron_attnedit.cli.main:_recorded", ""))
    monkeypatch.setattr(cli, "_recorded", lambda argv: seen.setdefault("argv", argv) and 0, raising=False)
    assert cli.main(["distill", "2", "tiny_mla", "--set", "training.train_iters=3"]) == 0
    assert seen["argv"] == ["--recipe", "tiny_mla", "--stage", "stage2", "--set", "training.train_iters=3"]


def test_old_entry_points_reach_the_same_commands():
    """python -m megatron_attnedit.kv_report and the checkpoints_tools scripts still work."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    a = subprocess.run([sys.executable, "-m", "megatron_attnedit.kv_report", "--preset", "qwen3-8b", "--target", "mla", "--json"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    b = run("kv-report", "--preset", "qwen3-8b", "--target", "mla", "--json")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and '"kv_lora_rank": 512' in a.stdout
    for tool in ("hf_to_mcore.py", "mcore_to_hf.py", "hf_to_gguf.py", "preprocess_data.py"):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "checkpoints_tools", tool), "--help"], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0 and "examples:" in out.stdout, tool
