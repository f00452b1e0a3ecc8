"""Kernels for megatron-core's local spec that only torch and megatron-core stand under.

fusions.py   RoPE, MLA's query/key assembly and the experts' GLU compiled into one kernel each way
wgrad.py     weight gradients accumulated into megatron's fp32 main grads inside the GEMM; the
             linear backward without an unneeded input gradient

They are handed to megatron-core by ``fixes.py`` at platform start-up, never as a side effect of
building a model.
"""
