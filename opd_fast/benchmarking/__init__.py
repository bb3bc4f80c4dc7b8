"""Benchmark machinery behind ``opd-fast bench``: one idea per module.

``shapes`` (what is measured), ``inputs`` (reproducible, realistically scaled operands),
``implementations`` / ``peers`` / ``floor`` (what is timed), ``correctness`` (checked against the
reference before timing), ``timing`` (interleaved medians), ``memory`` (peak measured in a fresh
subprocess run by ``worker``), ``runner`` (the case loop), ``report`` and ``plot`` (outputs).
"""
