"""Typed service settings (environment prefix ``SITEPLAN_``), with embedded defaults.

With no configuration at all the service runs embedded: a local Ray started by the process,
SQLite and a vault directory, all under ``SITEPLAN_DATA_DIR`` (DESIGN.md §3.4).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# A unix socket path may be at most 107 bytes; Ray puts its sockets under its temp dir, at
# /session_<date>_<time>_<usec>_<pid>/sockets/plasma_store: 64 bytes more with a 5-digit pid.
_MAX_RAY_DIR = 40


@dataclass(frozen=True)
class DataDir:
    """Every folder and file the service keeps under its data dir, named in one place.

    ``root`` is ``SITEPLAN_DATA_DIR`` resolved; ``keys`` the key store (``SITEPLAN_KEYS_DIR``,
    default ``root/keys``). Nothing else in the code joins a name onto the data dir."""

    root: Path
    keys: Path

    @property
    def db_file(self) -> Path:
        """The embedded SQLite database (used when no ``SITEPLAN_DATABASE_URL`` is set)."""
        return self.root / "siteplan.db"

    @property
    def vault(self) -> Path:
        return self.root / "vault"

    @property
    def uploads(self) -> Path:
        """Uploads in progress (sealed chunks)."""
        return self.root / "uploads"

    @property
    def scratch(self) -> Path:
        """Worker scratch space, one folder per job; wiped when the job ends."""
        return self.root / "scratch"

    @property
    def exports(self) -> Path:
        """A terminated contract's sealed export archive, until downloaded or expired."""
        return self.root / "exports"

    @property
    def certificates(self) -> Path:
        return self.root / "certificates"

    @property
    def signing_key(self) -> Path:
        """The service's certificate-signing key, kept with the other keys."""
        return self.keys / "signing.pem"

    @property
    def locks(self) -> Path:
        """The per-contract lock files (docs/workers.md, "Locks")."""
        return self.root / "locks"

    @property
    def lock_dir(self) -> Path:
        return self.locks

    @property
    def ratelimit(self) -> Path:
        return self.root / "ratelimit"

    @property
    def reprocess_lock(self) -> Path:
        """Held by the one batch reprocessing driver (workers/reprocess.py)."""
        return self.root / "reprocess.lock"

    @property
    def ray(self) -> Path:
        """Ray's temp, plasma fallback and spill directory.

        Kept inside the data dir when the path is short enough for Ray's unix sockets; otherwise a
        directory under the system temp dir that is named after the data dir and owned by this
        service (it is wiped on shutdown just the same).
        """
        inside = self.root / "ray"
        if len(str(inside)) <= _MAX_RAY_DIR:
            return inside
        tag = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"siteplan-ray-{tag}"


class Settings(BaseSettings):
    """Service settings. Every field can be set as ``SITEPLAN_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="SITEPLAN_", extra="forbid", frozen=True)

    data_dir: Path = Field(default=Path(".siteplan"), description="Where all kept state lives.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite file in data_dir.")
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join; default: start a local Ray in-process."
    )
    num_cpus: int | None = Field(
        default=None, ge=1, description="CPUs for the local Ray; default: all of this machine's."
    )
    log_level: str = Field(default="INFO", description="Root log level at the entry points.")
    keys_dir: Path | None = Field(
        default=None,
        description="Key store (master key and wrapped data keys); default: data_dir/keys. Keep it out of backups.",
    )
    host: str = Field(default="127.0.0.1", description="`siteplan serve` bind address.")
    port: int = Field(default=8000, ge=1, le=65535, description="`siteplan serve` port.")
    shutdown_grace_s: float = Field(
        default=60.0,
        gt=0,
        description="On SIGTERM, how long requests in flight (a photo still uploading) may take to finish.",
    )
    max_upload_bytes: int = Field(default=64 * 2**20, gt=0, description="Largest photo or design upload.")
    max_upload_pixels: int = Field(
        default=100_000_000,
        gt=0,
        description="Largest photo upload in pixels, from its header while it streams (413 too_many_pixels). "
        "Phones make 12-50 MP by default and 200 MP at most in a full-resolution mode; raise it for those.",
    )
    max_json_bytes: int = Field(default=1 * 2**20, gt=0, description="Largest JSON request body.")
    rate_limit_per_minute: int = Field(default=600, gt=0, description="Requests per minute per API token.")
    rate_limit_burst: int = Field(default=120, gt=0, description="Burst allowance per API token.")
    token_cache_s: float = Field(
        default=10.0, ge=0, description="How long a verified token is trusted without a DB check (revocation delay)."
    )
    ingest_workers: int = Field(
        default=1, ge=0, description="Photos anonymised at once in the API process (0: leave to workers)."
    )
    metrics_token: str | None = Field(
        default=None, description="Bearer token for /metrics; unset: /metrics answers loopback clients only."
    )
    run_jobs: bool = Field(default=True, description="Run queued plan jobs from the API process.")
    upload_expiry_s: float = Field(
        default=3 * 24 * 3600,
        gt=0,
        description="An unfinished upload untouched this long is deleted with what arrived of it (tus expiration).",
    )

    @cached_property
    def root(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @cached_property
    def dirs(self) -> DataDir:
        """Every path under the data dir (:class:`DataDir`)."""
        return DataDir(root=self.root, keys=(self.keys_dir or self.root / "keys").expanduser().resolve())

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.dirs.db_file}"

    @property
    def vault_dir(self) -> Path:
        return self.dirs.vault

    @property
    def key_dir(self) -> Path:
        return self.dirs.keys

    @property
    def uploads_dir(self) -> Path:
        return self.dirs.uploads

    @property
    def scratch_dir(self) -> Path:
        return self.dirs.scratch

    @property
    def ray_dir(self) -> Path:
        return self.dirs.ray


def get_settings() -> Settings:
    return Settings()
