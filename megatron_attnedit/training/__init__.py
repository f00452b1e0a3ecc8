"""Training: one loop (loop.py) for every stage, objectives (objective.py), data, checkpoints, monitoring.

Entry point: ``python -m megatron_attnedit.train --recipe R [--stage S] [--set key=value ...]``.
"""
