"""Subcommands of the ``opd-fast`` CLI, one module each (see ``opd_fast.cli``)."""
