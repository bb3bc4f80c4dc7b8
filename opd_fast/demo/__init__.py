"""The demo behind ``opd-fast demo``: on-policy distillation against off-policy baselines on ``column_add``.

Read in order: ``profiles`` (every size and step count), ``prepare`` (teacher and initial students,
cached; ``sft`` is their hard-label loop), ``arms`` (one runner config per arm, equal budgets), ``run``
(the loop over seeds and arms), ``report`` (table, JSON, Markdown, PNG).
"""
