"""Train: ``python -m megatron_attnedit.train --recipe R [--stage S] [--set section.key=value ...]``.

Run it under torchrun for several processes (launch/pretrain.sh, launch/distill.sh do that).
``--recipe`` is a file or a name in launch/recipes/; ``--stage`` applies the recipe's overlay of that
name and trains the objective of that name (stage1, stage2); ``--set`` overrides single fields.
A run resumes by itself from the latest checkpoint in its checkpoint directory.
"""

from __future__ import annotations

import argparse
import os
import sys


def _user_error_types() -> tuple:
    """Exception types that mean bad input (printed as one line), from the modules loaded so far."""
    from megatron_attnedit.config import ConfigError
    from megatron_attnedit.training.data import DataError

    types = [ConfigError, DataError]
    for mod, name in (("megatron_attnedit.models.qwen3", "ConfigError"), ("megatron_attnedit.convert.hf_io", "CheckpointError"),
                      ("megatron_attnedit.training.checkpoint", "CheckpointError"), ("megatron_attnedit.training.loop", "TrainingStopped")):
        if mod in sys.modules:
            types.append(getattr(sys.modules[mod], name))
    return tuple(types)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_attnedit.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True, help="recipe file or name in launch/recipes/")
    ap.add_argument("--stage", default=None, help="apply the recipe's stages.<STAGE> overlay and train objective STAGE")
    ap.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override a field, e.g. --set optimizer.lr=1e-4 training.train_iters=100")
    a = ap.parse_args(argv)
    overrides = [x for group in a.overrides for x in group]
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        from megatron_attnedit.config import load_config
        from megatron_attnedit.training.data import check_prefixes

        cfg = load_config(a.recipe, overrides, a.stage)
        check_prefixes(cfg.data.data_path + (cfg.data.valid_data_path or []))  # before anything heavy starts
        from megatron_attnedit.training.loop import train

        train(cfg)
    except Exception as e:
        if not isinstance(e, _user_error_types()):
            raise
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if "torch" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # required: dist_checkpointing's helper processes re-import this module
    sys.exit(main())
