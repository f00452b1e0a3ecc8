"""``python -m megatron_attnedit.evaluate``: the same command as ``attnedit evaluate`` (megatron_attnedit/cli/evaluate.py)."""

import sys

from megatron_attnedit.cli.evaluate import main

if __name__ == "__main__":  # required: dist_checkpointing's helper processes re-import the entry module
    sys.exit(main())
