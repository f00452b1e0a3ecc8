"""The command lines: ``attnedit <command>`` (setup.py's console entry point, ``main.py``), one
module per command, shared argument groups in ``args.py``. The scripts users already call --
``checkpoints_tools/*.py``, ``python -m megatron_attnedit.train | evaluate | kv_report | quickstart``
-- are thin shims over these modules."""
