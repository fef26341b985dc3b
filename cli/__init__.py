"""The ``siteplan`` command line (DESIGN.md §4): pipeline commands (anonymize, reconstruct,
measure, plan, demo), the server (serve) and the operator's commands (tenant, contract, token,
subject, register, backup, restore, incident, retention, reprocess).

The top layer: it may import every other package, and none imports it. Each command parses its
arguments and calls a function of the layers below; no stage, right or state transition is
written here (``cli.main``).
"""
