"""Benchmark machinery behind ``opd-fast bench``: one idea per module.

The loss benchmark: ``shapes`` (what is measured, spelled ``N x H x V``), ``inputs`` (reproducible,
realistically scaled operands), ``implementations`` / ``peers`` / ``floor`` (what is timed),
``correctness`` (checked against the reference before timing), ``timing`` (interleaved medians),
``memory`` (peak measured in a fresh subprocess run by ``worker``), ``runner`` (the case loop),
``report`` (tables, JSON, CSV, machine and load) and ``plot`` (figures).

End to end: ``e2e`` (shared models and prompts, arms, rounds, table) runs each arm of ``opd-fast
train`` or a TRL trainer in a fresh process through ``e2e_worker``.
"""
