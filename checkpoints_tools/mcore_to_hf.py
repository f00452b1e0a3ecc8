#!/usr/bin/env python
"""Thin CLI over megatron_attnedit.convert (mcore_to_hf); `python checkpoints_tools/mcore_to_hf.py --help`."""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns at import about apex / transformer-engine being absent: noise for a converter
warnings.filterwarnings("ignore")

if __name__ == "__main__":
    from megatron_attnedit.cli.convert import mcore_to_hf_main

    sys.exit(mcore_to_hf_main())
