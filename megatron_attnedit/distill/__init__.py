"""Progressive distillation: teacher and student co-located with shared frozen weights
(``colocate``; the losses are ``training/losses.py``), the stage objectives plugged into the training loop
(``stage1``: layer-wise teacher-forced attention MSE; ``stage2``: model-level KL), and the
gradient carrier that lets every pipeline stage hold its own loss terms (``pipeline``)."""
