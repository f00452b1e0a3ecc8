#!/usr/bin/env python
"""Thin CLI over megatron_attnedit.convert (hf_to_gguf); `python checkpoints_tools/hf_to_gguf.py --help`."""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

if __name__ == "__main__":
    from megatron_attnedit.cli.convert import hf_to_gguf_main

    sys.exit(hf_to_gguf_main())
