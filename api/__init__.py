"""The HTTP API for the COVER app (FastAPI), started by `siteplan serve`.

Not built yet: see the HTTP API issue. It will be a thin edge over `privacy/`, `reconstruct/`
and `workers/`, like the CLI.
"""
