"""HTTP API for the COVER app (FastAPI): ``api.app.create_app``. Thin edge over privacy/, reconstruct/ and workers/."""
