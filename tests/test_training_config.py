"""Run configuration: recipes load into typed configs, typos and bad data are one clear line."""

import glob
import os
import struct
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from megatron_attnedit.config import config_from_dict, load_config, resolve_recipe
from megatron_attnedit.errors import ConfigError

RECIPES = sorted(glob.glob(os.path.join(ROOT, "launch", "recipes", "*.yaml")))


def write_recipe(path, **sections):
    base = {"model": {"preset": "qwen3-debug"}, "data": {"data_path": ["/nonexistent/prefix"], "tokenizer_dir": "/tmp/tok.model"}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    path.write_text(yaml.safe_dump(base))
    return str(path)


def run_train(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "megatron_attnedit.train", *args], capture_output=True, text=True, env=env, timeout=120)


def one_error_line(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_recipe_key_typo_is_one_line_with_the_closest_key(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", optimizer={"lrr": 1.0e-3})
    line = one_error_line(run_train("--recipe", recipe))
    assert "unknown key 'optimizer.lrr'" in line and "did you mean 'optimizer.lr'?" in line
    with pytest.raises(ConfigError, match=r"unknown key 'trainning.train_iters'.*did you mean 'training.train_iters'"):
        load_config(write_recipe(tmp_path / "ok.yaml"), ["trainning.train_iters=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'trainning'.*did you mean 'training'"):
        load_config(write_recipe(tmp_path / "top.yaml", trainning={"train_iters": 3}))
    with pytest.raises(ConfigError, match=r"optimizer.lr must be of type float"):
        load_config(write_recipe(tmp_path / "ok.yaml"), ["optimizer.lr=fast"])


def test_missing_and_empty_dataset_are_one_line(tmp_path):
    line = one_error_line(run_train("--recipe", write_recipe(tmp_path / "r.yaml")))
    assert "/nonexistent/prefix.bin not found" in line and "preprocess_data.py" in line
    # An index with zero documents, as IndexedDatasetBuilder writes it for empty input.
    prefix = tmp_path / "empty"
    (tmp_path / "empty.bin").write_bytes(b"")
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", 0) + struct.pack("<Q", 1)
    (tmp_path / "empty.idx").write_bytes(header + struct.pack("<q", 0))
    line = one_error_line(run_train("--recipe", write_recipe(tmp_path / "r2.yaml", data={"data_path": [str(prefix)]})))
    assert f"dataset {prefix} is empty" in line


def test_overrides_types_and_resolved_round_trip(tmp_path):
    cfg = load_config(write_recipe(tmp_path / "r.yaml"), ["optimizer.lr=3e-4", "parallel.tensor_model_parallel_size=2",
                                                          "objective.options.temperature=2", "data.data_path=[a, b]"])
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.objective.options == {"temperature": 2}
    assert cfg.data.data_path == ["a", "b"]
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    with pytest.raises(ConfigError, match="global_batch_size=6 is not a multiple of data.micro_batch_size=4"):
        load_config(write_recipe(tmp_path / "r.yaml"), ["data.global_batch_size=6", "data.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="exactly one of model.hf_dir or model.preset"):
        load_config(write_recipe(tmp_path / "r.yaml"), ["model.hf_dir=/x"])
    with pytest.raises(ConfigError, match="overlap_param_gather needs optimizer.use_distributed_optimizer=true"):
        load_config(write_recipe(tmp_path / "r.yaml"), ["parallel.overlap_param_gather=true", "optimizer.use_distributed_optimizer=false"])
    with pytest.raises(ConfigError, match="recompute_method / recompute_num_layers apply to model.recompute_granularity=full only"):
        load_config(write_recipe(tmp_path / "r.yaml"), ["model.recompute_method=block"])
    with pytest.raises(ConfigError, match="moe_act not supported here.*use moe to recompute the whole MoE layer"):
        load_config(write_recipe(tmp_path / "r.yaml"), ["model.recompute_granularity=selective", "model.recompute_modules=[moe_act]"])
    cfg = load_config(write_recipe(tmp_path / "r.yaml"), ["model.recompute_granularity=full"])
    assert (cfg.model.recompute_method, cfg.model.recompute_num_layers) == ("uniform", 1)
    from megatron_attnedit.training.optim import overlaps

    cfg = load_config(write_recipe(tmp_path / "r.yaml"))
    assert overlaps(cfg, "cuda", 2) == overlaps(cfg, "npu", 8) == (True, True)
    assert overlaps(cfg, "cpu", 2) == overlaps(cfg, "cuda", 1) == (False, False)
    cfg = load_config(write_recipe(tmp_path / "r.yaml"), ["optimizer.use_distributed_optimizer=false"])
    assert overlaps(cfg, "cuda", 2) == (True, False)  # nothing to gather without the sharded update


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.basename(p))
def test_every_recipe_and_stage_loads(path):
    from megatron_attnedit.training.objective import OBJECTIVES

    stages = (yaml.safe_load(open(path)) or {}).get("stages") or {}
    for stage in [None, *stages]:
        cfg = load_config(path, stage=stage)
        assert cfg.objective.name in OBJECTIVES
        if stage:
            assert cfg.objective.name == stage and cfg.run_dir.endswith(stage)
    assert resolve_recipe(os.path.basename(path)[:-5]) == path


def test_lr_schedules_warmup_cosine_and_wsd(tmp_path):
    from megatron_attnedit.training.optim import build_scheduler

    class FakeOptimizer:
        param_groups = [{}]

    def lrs(*overrides):
        cfg = load_config(write_recipe(tmp_path / "r.yaml"), ["training.train_iters=100", "optimizer.lr=1.0", "optimizer.min_lr=0.1",
                                                              "optimizer.lr_warmup_iters=10", *overrides])
        sched = build_scheduler(cfg, FakeOptimizer())
        out = []
        for _ in range(100):
            sched.step(1)
            out.append(FakeOptimizer.param_groups[0]["lr"])
        return out

    cos = lrs("optimizer.lr_decay_style=cosine")
    assert cos[4] == pytest.approx(0.5) and cos[9] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.1)
    assert cos[54] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)  # half-way through the decay
    wsd = lrs("optimizer.lr_decay_style=WSD", "optimizer.lr_wsd_decay_iters=20")
    assert wsd[9:80] == [1.0] * 71 and wsd[89] == pytest.approx(0.55) and wsd[-1] == pytest.approx(0.1)


def test_accelerator_defaults_resolve_per_platform():
    """model.kernel_fusion (None: on for CUDA with the local spec) and model.init_on_cpu (false:
    initialise on the accelerator; the CPU always initialises on the CPU) reach the build options."""
    from megatron_attnedit.platform import Platform
    from megatron_attnedit.training import objective

    cuda, cpu = Platform("cuda", "nccl"), Platform("cpu", "gloo")
    no_probe = ["model.gradient_accumulation_fusion=false"]  # resolving it would probe a CUDA device
    cfg = load_config("tiny_lm", no_probe)
    assert objective.kernel_fusion(cfg, cuda) and not objective.kernel_fusion(cfg, cpu)
    assert not objective.kernel_fusion(load_config("tiny_lm", no_probe + ["model.transformer_impl=transformer_engine"]), cuda)
    off = load_config("tiny_lm", no_probe + ["model.kernel_fusion=false", "model.init_on_cpu=false"])
    gpu_opts, cpu_opts = objective.build_options(off, cuda), objective.build_options(off, cpu)
    assert not gpu_opts.kernel_fusion and not gpu_opts.use_cpu_initialization
    assert cpu_opts.use_cpu_initialization
    assert objective.build_options(cfg, cuda).use_cpu_initialization  # the default: one seed, any layout
