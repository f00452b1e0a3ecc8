"""Hybrid MLA (M/G layers) and GateSWA (S/F layers, sinks) students give TP=1's logits at TP=2 (with
and without sequence parallelism) and at PP=2, both when initialised from the sharded teacher and
when loaded through the student's conversion table (2 gloo processes, one torchrun call; see
tests/workers/target_layouts.py)."""

import glob
import json

import torch

from conftest import torchrun

TOL = 1e-5


def test_hybrid_students_same_logits_across_layouts(tiny_hf, tmp_path):
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    torchrun("target_layouts.py", "--hf-dir", tiny_hf["dense"], "--tokens", tmp_path / "tokens.pt", "--work", tmp_path, nproc=2)
    results = {}
    for path in glob.glob(str(tmp_path / "rank*.json")):
        with open(path) as f:
            for k, v in json.load(f).items():
                results[k] = max(v, results.get(k, 0.0))
    for key in ("mla", "gate_swa"):
        # not trivially the teacher, and the perturbation matters
        assert results[f"{key} tp1 student vs teacher"] > 1e-3
        assert results[f"{key} tp1 perturbed vs init"] > 1e-3
        for layout in ("tp2 pp1", "tp2 pp1 sp", "tp1 pp2"):
            for how in ("init", "loaded"):
                case = f"{key} {layout} {how}"
                assert case in results, f"missing {case}: {sorted(results)}"
                assert results[case] <= TOL, f"{case}: max |logits - TP1| = {results[case]:.3e}"
