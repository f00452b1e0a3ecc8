"""The study's phases: data -> teacher -> conversions (three chains at once) -> evaluation -> summary.

Every training, export and evaluation step is the command a user would type
(``python -m megatron_attnedit.train --recipe launch/recipes/study_*.yaml ...``,
``checkpoints_tools/mcore_to_hf.py``, ``python -m megatron_attnedit.evaluate``), run as a
subprocess with its output in OUT/logs/<step>.log. The data phase runs here: the corpus of the
installed packages (data/packages.py), the bundled tokenizer, megatron datasets
(``teacher.prepare_datasets``: train, held-out, and both with the exact split for the teacher's
in-loop validation).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Dict, List

from megatron_attnedit import teacher
from megatron_attnedit.data import packages
from megatron_attnedit.data import tokenizer as tok_lib
from megatron_attnedit.errors import StepFailed
from megatron_attnedit.scale_study import plan as plan_lib
from megatron_attnedit.scale_study.runner import ROOT, Runner

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
TOKENIZER_WHY = ("the bundled teacher's SentencePiece BPE (vocab 4096, trained on the stdlib): the packages are Python too, "
                 "so it needs no training inside the 9-minute budget (training one on ~300 MB takes minutes) and every "
                 "machine tokenizes identically; its cost is a longer encoding of library code than of the stdlib it was "
                 "trained on (bytes per token in the corpus record)")


def prepare_tokenizer(out: str) -> str:
    """The bundled teacher's tokenizer files + the tokenizer_meta.json ``teacher init`` reads."""
    import sentencepiece as spm

    src = teacher.bundled_teacher("dense")
    if src is None:
        raise StepFailed(f"the bundled dense teacher is not in this checkout ({teacher.ASSETS_DIR}); its tokenizer is the study's")
    os.makedirs(out, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    model_sha = hashlib.sha256(open(os.path.join(out, "tokenizer.model"), "rb").read()).hexdigest()
    meta = {"vocab_size": sp.get_piece_size(), "special_ids": {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()},
            "trained_on": f"bundled {os.path.basename(src)}", "model_sha256": model_sha}
    with open(os.path.join(out, tok_lib.META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return out


def data_phase(out: str, sizes: plan_lib.Sizes, workers: int) -> dict:
    corpus_dir, tok_dir, ds_dir = (os.path.join(out, d) for d in ("corpus", "tokenizer", "datasets"))
    t = time.time()
    manifest = packages.build_package_corpus(corpus_dir, max_bytes=sizes.corpus_max_bytes, valid_fraction=sizes.valid_fraction,
                                             recall_share=sizes.recall_share)
    t_corpus = time.time() - t
    prepare_tokenizer(tok_dir)
    t = time.time()
    info = teacher.prepare_datasets(corpus_dir, tok_dir, ds_dir, workers=workers)
    t_tok = time.time() - t
    manifest = packages.add_token_counts(corpus_dir, info["prefixes"])
    s = manifest["splits"]
    return {"corpus_dir": corpus_dir, "tokenizer_dir": tok_dir, "datasets": info, "manifest": manifest,
            "seconds": {"corpus": round(t_corpus, 1), "tokenize": round(t_tok, 1)},
            "bytes_per_token": {k: s[k]["bytes"] / max(1, s[k]["tokens"]) for k in s}}


def train_cmd(recipe: str, stage: str, run_dir: str, platform: str, sets: List[str]) -> List[str]:
    cmd = [sys.executable, "-m", "megatron_attnedit.train", "--recipe", os.path.join(ROOT, "launch", "recipes", recipe + ".yaml")]
    if stage:
        cmd += ["--stage", stage]
    return cmd + ["--set", f"training.run_dir={run_dir}", f"training.platform={platform}", *sets]


def export_cmd(run_dir: str, hf_dir: str, dtype: str = "") -> List[str]:
    cmd = [sys.executable, os.path.join(ROOT, "checkpoints_tools", "mcore_to_hf.py"), "--load-dir", os.path.join(run_dir, "checkpoints"),
           "--save-dir", hf_dir, "--overwrite", "--no-progress"]
    return cmd + (["--dtype", dtype] if dtype else [])


def teacher_phase(out: str, data: dict, sizes: plan_lib.Sizes, platform: str, steps: Runner, env: Dict[str, str], extra: List[str]) -> str:
    run_dir = os.path.join(out, "teacher")
    shutil.rmtree(run_dir, ignore_errors=True)
    init = os.path.join(run_dir, "init")
    teacher.write_init_dir("dense", data["tokenizer_dir"], init, overrides=sizes.arch)
    ds = data["datasets"]
    sets = [f"model.hf_dir={init}", f"data.data_path=[{ds['prefixes']['train_valid']}]", f"data.split={ds['split']}",
            f"data.tokenizer_dir={data['tokenizer_dir']}", *sizes.teacher_sets, *extra]
    steps("teacher_train", train_cmd(plan_lib.RECIPES["teacher"], "", run_dir, platform, sets), env)
    hf = os.path.join(out, "hf", "teacher")
    steps("teacher_export", export_cmd(run_dir, hf, "bfloat16"))
    return hf


def conversion_phase(out: str, data: dict, teacher_hf: str, sizes: plan_lib.Sizes, platform: str, steps: Runner,
                     env: Dict[str, str], extra: List[str], scale: float = 1.0) -> Dict[str, str]:
    """The three chains (MLA, GateSWA: stage 1 -> stage 2 -> export; MLA without stage 1: stage 2 ->
    export), ``sizes.jobs`` at a time. ``scale`` < 1 shortens every stage (the time guard)."""
    ds = data["datasets"]["prefixes"]
    common = [f"model.hf_dir={teacher_hf}", f"data.data_path=[{ds['train']}]", f"data.valid_data_path=[{ds['valid']}]"]
    planned = plan_lib.steps(sizes)

    def stage_sets(target: str, stage: str) -> List[str]:
        out_sets = common + sizes.student_sets + sizes.target_sets[target] + sizes.stage_sets[stage]
        if scale < 1.0:
            n = max(4, int(planned[f"{target}_{stage}"]["steps"] * scale))
            out_sets += [f"training.train_iters={n}", f"optimizer.lr_warmup_iters={max(1, n // 8)}"]
        return out_sets + extra

    def chain(name: str) -> str:
        target, with_stage1 = plan_lib.CHAINS[name]
        recipe, tdir = plan_lib.RECIPES[target], os.path.join(out, target)
        s1 = os.path.join(tdir, "stage1")
        if with_stage1:
            shutil.rmtree(s1, ignore_errors=True)
            steps(f"{name}_stage1", train_cmd(recipe, "stage1", s1, platform, stage_sets(target, "stage1")), env)
        s2 = os.path.join(tdir, "stage2" if with_stage1 else "stage2_no_stage1")
        shutil.rmtree(s2, ignore_errors=True)
        init = f"checkpoint.pretrained_checkpoint={os.path.join(s1, 'checkpoints') if with_stage1 else 'null'}"
        steps(f"{name}_stage2", train_cmd(recipe, "stage2", s2, platform, stage_sets(target, "stage2") + [init]), env)
        hf = os.path.join(out, "hf", name)
        steps(f"{name}_export", export_cmd(s2, hf))
        return hf

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, sizes.jobs)) as pool:
        futures = {name: pool.submit(chain, name) for name in plan_lib.STUDENTS}
        errors = []
        for name, fut in futures.items():
            try:
                fut.result()
            except StepFailed as e:
                errors.append(str(e))
        if errors:
            raise StepFailed("; ".join(errors))
    return {name: os.path.join(out, "hf", name) for name in plan_lib.STUDENTS}


def evaluate_phase(out: str, data: dict, teacher_hf: str, students: Dict[str, str], sizes: plan_lib.Sizes, device: str, steps: Runner) -> dict:
    """Perplexity at ``sizes.seq``-token windows, loss by distance, the probe; the KV cache measured
    after a decode that fills the whole context (prompt = seq - decode tokens), where GateSWA's
    sliding layers hold their window and not the whole prompt."""
    report = os.path.join(out, "report")
    cmd = [sys.executable, "-m", "megatron_attnedit.evaluate", "--teacher", teacher_hf, "--data", data["datasets"]["prefixes"]["valid"],
           "--report-dir", report, "--device", device, "--seq-length", str(sizes.seq), "--max-tokens", str(sizes.eval_max_tokens),
           "--batch-size", str(sizes.eval_batch), "--decode-tokens", str(sizes.decode_tokens),
           "--prompt-tokens", str(sizes.seq - sizes.decode_tokens)]
    cmd += sizes.probe_args
    for name, hf in students.items():
        cmd += ["--student", f"{name}={hf}"]
    for target in ("mla", "gateswa"):
        cmd += ["--run-dir", f"{target}={os.path.join(out, target)}"]
    steps("evaluate", cmd, {"OMP_NUM_THREADS": str(os.cpu_count() or 1)})
    with open(os.path.join(report, "results.json")) as f:
        return json.load(f)
