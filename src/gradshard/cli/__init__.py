"""The ``gradshard`` command: one module per command group, plus console tables and plots."""
