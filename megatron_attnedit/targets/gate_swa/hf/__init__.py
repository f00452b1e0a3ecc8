"""The GateSWA model code shipped inside exported GateSWA checkpoints (``auto_map``).

``configuration_gateswa.py`` and ``modeling_gateswa.py`` are copied verbatim next to the weights
by ``mcore_to_hf``; they import nothing from this project, only ``transformers`` (5.x).
"""
