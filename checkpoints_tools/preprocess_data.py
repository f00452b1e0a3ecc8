#!/usr/bin/env python
"""Thin CLI: text -> megatron indexed dataset (``attnedit preprocess``); `python checkpoints_tools/preprocess_data.py --help`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from megatron_attnedit.cli.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
