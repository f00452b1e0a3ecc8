"""``python -m megatron_attnedit.cli <command>``: the ``attnedit`` command (e.g. under torchrun)."""

import sys

from megatron_attnedit.cli.main import main

if __name__ == "__main__":  # required: dist_checkpointing's helper processes re-import the entry module
    sys.exit(main())
