"""The demo behind ``opd-fast demo``: two specialist teachers consolidated into one student, on-policy
distillation against off-policy baselines, per domain.

Read in order: ``domains`` (the two tasks, their verifiers and prompt files), ``profiles`` (every size and
step count), ``prepare`` (specialists and initial students: shipped in ``models/``, cached, or trained;
``sft`` is their hard-label loop), ``arms`` (one routed runner config per arm, equal budgets), ``run`` (the
loop over seeds and arms, optionally in worker processes), ``report`` (per-domain tables with standard
errors, JSON, Markdown, PNGs).
"""
