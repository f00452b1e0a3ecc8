"""Evaluation of teacher and students on their Hugging Face checkpoints.

Entry point: ``python -m megatron_attnedit.evaluate`` (megatron_attnedit/evaluate.py).

perplexity.py   evaluation tokens (megatron indexed dataset or text files), tokenizer checks, perplexity
                (and the token NLLs summed by position in the window)
distance.py     loss by position in the window, in buckets, students against the teacher beyond W
retrieval.py    the retrieval probe: recall of a key stated at a given distance back in held-out code
kv_measure.py   KV bytes per token from the config (the targets' formula) and as measured from the
                decode engine's allocated cache (the decode itself: megatron_attnedit/inference)
report.py       report.md + results.json
plots.py        PNG plots (matplotlib, Agg): training curves, KV bytes against context length, loss by
                position, probe accuracy against distance
"""

from megatron_attnedit.errors import EvalError  # noqa: F401  (eval modules raise it)

CONTEXTS = (4096, 32768, 131072)  # context lengths of the report's KV columns


