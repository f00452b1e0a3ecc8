"""``python -m megatron_attnedit.train`` for torchrun (a script path, so that the package directory
is not put first on sys.path where its platform.py would shadow the standard library's)."""

import sys

if __name__ == "__main__":  # dist_checkpointing's helper processes re-import this file
    from megatron_attnedit.train import main

    sys.exit(main())
