"""``python -m megatron_attnedit.train``: the same command as ``attnedit train`` (megatron_attnedit/cli/train.py)."""

import sys

from megatron_attnedit.cli.train import main

if __name__ == "__main__":  # required: dist_checkpointing's helper processes re-import the entry module
    sys.exit(main())
