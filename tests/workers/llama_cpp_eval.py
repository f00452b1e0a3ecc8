"""One GGUF in llama.cpp (llama-cpp-python, CPU, f32 KV cache), in its own process: a loader
assertion aborts this worker, not the test run.

    python llama_cpp_eval.py MODEL.gguf JOB.json OUT.npz

JOB: {"sequences": [[ids...], ...], "texts": [str, ...], "vocab_only": bool}. OUT holds, per
sequence i, ``full_i`` (logits of one evaluation of the whole sequence) and ``step_i`` (logits of
decoding it one token at a time through the cache), and ``tokens`` (JSON: llama.cpp's token ids
of each text, no BOS, special tokens as text).
"""

import json
import sys

import numpy as np


def main():
    import llama_cpp

    path, job_path, out = sys.argv[1:4]
    with open(job_path) as f:
        job = json.load(f)
    longest = max([len(s) for s in job.get("sequences", [])] + [16])
    model = llama_cpp.Llama(
        model_path=path, n_ctx=max(64, longest + 8), n_batch=max(64, longest + 8), logits_all=True, vocab_only=job.get("vocab_only", False),
        n_threads=1, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False,
    )
    arrays = {"tokens": np.array(json.dumps([model.tokenize(t.encode(), add_bos=False, special=False) for t in job.get("texts", [])]))}
    for i, seq in enumerate(job.get("sequences", [])):
        model.reset()
        model.eval(seq)
        arrays[f"full_{i}"] = np.array(model.scores[: len(seq)], dtype=np.float32)
        model.reset()
        steps = []
        for t in seq:
            model.eval([t])
            steps.append(np.array(model.scores[model.n_tokens - 1], dtype=np.float32))
        arrays[f"step_{i}"] = np.stack(steps)
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
