"""Where the service keeps what: ``lifecycle_paths(settings)`` is ``settings.dirs``
(:class:`siteplan.settings.DataDir`, the one place that names the data dir's folders). Kept as a
function because the lifecycle code and its callers ask for it by this name."""

from __future__ import annotations

from siteplan.settings import DataDir, Settings


def lifecycle_paths(settings: Settings) -> DataDir:
    return settings.dirs
