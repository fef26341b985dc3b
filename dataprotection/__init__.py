"""Data protection: what the service keeps about people and contracts, and how it gives it back.

Belongs here: the encrypted vault and key store (``vault``), sealed free-text fields (``fields``),
subjects and their blind index (``subjects``), the hash-chained register of processing
(``register``), one function per data-subject right, each recording its own register entry
(``rights``), consent (``consent``: may this project's data be processed now?), tenants,
contracts and tokens (``tenancy``), contract termination with its export and certificate
(``lifecycle``), signing, backup and restore, incident scope.

Does not belong here: anything that reads an image's pixels (the gate, ``privacy/``), geometry
(``reconstruct/``), Ray, HTTP or the CLI. It imports only the core (``siteplan``): the layers are
checked by import-linter (``[tool.importlinter]`` in pyproject.toml).
"""
