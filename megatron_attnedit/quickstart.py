"""``python -m megatron_attnedit.quickstart``: the same command as ``attnedit quickstart`` (megatron_attnedit/cli/quickstart.py)."""

import sys

from megatron_attnedit.cli.quickstart import main

if __name__ == "__main__":  # required: dist_checkpointing's helper processes re-import the entry module
    sys.exit(main())
