"""Figures: benchmark colours (``palette``), the run dashboard (``dashboard``), stage timelines (``timeline``).

Everything here draws with matplotlib's non-interactive Agg backend, so plotting works on a
headless training machine and never opens a window.
"""
