"""Where the service keeps what, derived from the settings (one place for the lifecycle code)."""

from __future__ import annotations

from privacy.lifecycle import Paths
from siteplan.settings import Settings


def lifecycle_paths(settings: Settings) -> Paths:
    return Paths(
        uploads=settings.uploads_dir,
        scratch=settings.scratch_dir,
        exports=settings.root / "exports",
        certificates=settings.root / "certificates",
        signing_key=settings.key_dir / "signing.pem",
        locks=settings.root / "locks",
    )
