"""The command line (``genselfdiff``), its subcommands, the demo and its synthetic data.

A thin layer: each command parses what the user chose and calls the engine.

May import: anything in the engine.
"""
