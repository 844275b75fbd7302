"""The main job: an exploding-gradient experiment (Pascanu et al., 2013).

Run with ``python -m demo`` (``make demo``); ``python -m demo --help`` lists options.
"""
