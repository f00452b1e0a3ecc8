"""Train: ``python -m megatron_attnedit.train --recipe R [--stage S] [--set section.key=value ...]``.

Run it under torchrun for several processes (launch/pretrain.sh, launch/distill.sh do that).
``--recipe`` is a file or a name in launch/recipes/; ``--stage`` applies the recipe's overlay of that
name and trains the objective of that name (stage1, stage2); ``--set`` overrides single fields.
A run resumes by itself from the latest checkpoint in its checkpoint directory. Bad input ends in one
``error:`` line and exit code 2, a fault during the run in one line and exit code 1; ``--debug``
(or ATTNEDIT_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
import time

from megatron_attnedit.cli import args
from megatron_attnedit.errors import run_cli

RANK0_GRACE_S = 3.0


def main(argv=None) -> int:
    ap = args.parser("attnedit train", __doc__.split("\n\n")[0],
                     "  attnedit train --recipe tiny_lm --set training.train_iters=100 optimizer.lr=1e-3\n"
                     "  torchrun --nproc-per-node 8 -m megatron_attnedit.cli train --recipe qwen3_8b_mla --stage stage1\n"
                     "  (same as: python -m megatron_attnedit.train ...; launch/pretrain.sh and distill.sh run it under torchrun)")
    ap.add_argument("--recipe", required=True, help="recipe file or name in launch/recipes/")
    ap.add_argument("--stage", default=None, help="apply the recipe's stages.<STAGE> overlay and train objective STAGE")
    ap.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override a field, e.g. --set optimizer.lr=1e-4 training.train_iters=100")
    args.debug(ap)
    a = ap.parse_args(argv)
    overrides = [x for group in a.overrides for x in group]
    rank0 = os.environ.get("RANK", "0") == "0"

    def body():
        from megatron_attnedit.config import load_config
        from megatron_attnedit.training.data import check_prefixes

        cfg = load_config(a.recipe, overrides, a.stage)
        check_prefixes(cfg.data.data_path + (cfg.data.valid_data_path or []), cfg.data.seq_length)  # before anything heavy starts
        from megatron_attnedit.training.loop import train

        train(cfg)

    rc = 1
    try:
        # bad input: one line on rank 0, exit 2; a fault once training runs: exit 1 (errors.py). The
        # other ranks meet the same error (checks read the same files, rank-0-only steps share their
        # outcome: training/checkpoint.py on_rank0) and exit with the same code, silently.
        rc = run_cli(body, argv, rank0=rank0)
        return rc
    finally:
        if "torch" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        if rc != 0 and not rank0:
            # torchrun stops every worker as soon as one exits: leave rank 0 the moment it needs
            # to print the line (it is the only one that does)
            time.sleep(RANK0_GRACE_S)


if __name__ == "__main__":  # required: dist_checkpointing's helper processes re-import this module
    sys.exit(main())
