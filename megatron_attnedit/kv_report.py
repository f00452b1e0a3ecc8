"""``python -m megatron_attnedit.kv_report``: the same command as ``attnedit kv-report`` (megatron_attnedit/cli/kv_report.py)."""

import sys

from megatron_attnedit.cli.kv_report import main

if __name__ == "__main__":  # required: dist_checkpointing's helper processes re-import the entry module
    sys.exit(main())
