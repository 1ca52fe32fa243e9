"""The benchmark suite: each module measures what users run (the engine's functions and configs).

Run one from the repository root as ``python -m benchmarks.NAME [--quick] [options]``; every
benchmark prints the command, the machine and a ``summary:`` line of figures, and ``--quick`` is a
smoke test that tests/test_benchmarks.py runs in CI. What they share is :mod:`benchmarks.common`.
"""
