"""The metadata database: tenants (controllers), contracts, projects and jobs.

SQLAlchemy 2 ORM; SQLite file under SITEPLAN_DATA_DIR by default, PostgreSQL in production
(same models). Every row carries its tenant, so queries can be scoped in the data layer.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    ORMExecuteState,
    Session,
    mapped_column,
    sessionmaker,
    with_loader_criteria,
)

from siteplan.states import ContractState, JobState, PhotoState


def new_id() -> str:
    """A random row id (no meaning, no personal data): the default of every id column."""
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


log = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    """A controller (a COVER designer's business)."""

    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    label: Mapped[str] = mapped_column(String(200))  # the controller's business name
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class TenantScoped:
    """Mixin: a row that belongs to one tenant. Sessions opened for a tenant see only its rows."""

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)


class ApiToken(TenantScoped, Base):
    """An API token: only a SHA-256 of the secret is stored (the secret is 256 random bits, so a
    slow hash adds nothing); scopes and expiry are checked on every request."""

    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(100))  # space separated: upload read admin
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Contract(TenantScoped, Base):
    __tablename__ = "contracts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    starts_on: Mapped[date] = mapped_column(Date)
    ends_on: Mapped[date | None] = mapped_column(Date, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=ContractState.ACTIVE)
    disposition: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Progress of a termination (dataprotection/lifecycle.py): what was exported, which objects (by
    # hash) are to be destroyed, which steps are done. Lets a killed termination resume.
    termination: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Subject(TenantScoped, Base):
    """A data subject (the designer's client). Personal fields are sealed with the contract's key."""

    __tablename__ = "subjects"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"), index=True)
    name_enc: Mapped[str] = mapped_column(Text)
    address_enc: Mapped[str | None] = mapped_column(Text, nullable=True)
    phone_enc: Mapped[str | None] = mapped_column(Text, nullable=True)
    restricted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class SubjectToken(TenantScoped, Base):
    """Blind index: keyed HMACs of a subject's normalised words and their prefixes (P5)."""

    __tablename__ = "subject_tokens"
    __table_args__ = (UniqueConstraint("subject_id", "digest"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"), index=True)
    digest: Mapped[str] = mapped_column(String(32), index=True)


class Project(TenantScoped, Base):
    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"), index=True)
    subject_id: Mapped[str | None] = mapped_column(ForeignKey("subjects.id"), nullable=True, index=True)
    # The designer's own project code, free text: sealed with the contract's key (dataprotection/fields.py).
    reference_enc: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Photo(TenantScoped, Base):
    """An uploaded photo: quarantined (encrypted original), then anonymised or rejected."""

    __tablename__ = "photos"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=PhotoState.UPLOADING)
    length: Mapped[int] = mapped_column(BigInteger)
    original_object: Mapped[str | None] = mapped_column(String(64), nullable=True)
    object: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the anonymised JPEG
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)  # of the anonymised JPEG
    intrinsics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    faces: Mapped[int] = mapped_column(Integer, default=0)
    plates: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The claim of the process anonymising it (siteplan/leases.py): who, and until when.
    lease_holder: Mapped[str | None] = mapped_column(String(80), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class Design(TenantScoped, Base):
    __tablename__ = "designs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"), index=True)
    descriptor: Mapped[dict[str, Any]] = mapped_column(JSON)  # units, axes, numbers: never the name
    name_enc: Mapped[str | None] = mapped_column(Text, nullable=True)  # sealed (dataprotection/fields.py)
    file_format: Mapped[str | None] = mapped_column(String(8), nullable=True)
    object: Mapped[str | None] = mapped_column(String(64), nullable=True)
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Job(TenantScoped, Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32), default="plan")
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts per stage task, as the tasks themselves recorded them (a Ray retry after a killed
    # worker or node shows here as 2, 3...): {"anonymise": 13, "reconstruct": 2, "plan": 1}.
    stage_attempts: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    pipeline_version: Mapped[str] = mapped_column(String(32))
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The claim of the process running it (siteplan/leases.py): who, and until when.
    lease_holder: Mapped[str | None] = mapped_column(String(80), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class PlanFile(TenantScoped, Base):
    """One output of a plan job (plan.glb, plan.svg, montage_*.jpg...), sealed in the vault."""

    __tablename__ = "plan_files"
    __table_args__ = (UniqueConstraint("job_id", "name"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"), index=True)
    name: Mapped[str] = mapped_column(String(120))
    media_type: Mapped[str] = mapped_column(String(60))
    object: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))


class IdempotencyRecord(TenantScoped, Base):
    """The first response to a request carrying an ``Idempotency-Key``, replayed on retries."""

    __tablename__ = "idempotency"
    __table_args__ = (UniqueConstraint("tenant_id", "key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(100))
    fingerprint: Mapped[str] = mapped_column(String(64))  # method, path and body hash
    status: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    location: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class RegisterEntry(TenantScoped, Base):
    """The register of processing (P9): append-only, hash-chained per controller (dataprotection/register.py)."""

    __tablename__ = "register_entries"
    __table_args__ = (UniqueConstraint("tenant_id", "seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(40))  # a token id, or "system"
    action: Mapped[str] = mapped_column(String(40))
    categories: Mapped[str] = mapped_column(String(200))  # space separated
    purpose: Mapped[str] = mapped_column(String(200))
    ref: Mapped[str | None] = mapped_column(String(64), nullable=True)  # an object id, never a name
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class Certificate(TenantScoped, Base):
    """A signed destruction certificate (kept: it is the written justification, P8)."""

    __tablename__ = "certificates"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    contract_id: Mapped[str] = mapped_column(String(32), index=True)
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)


class BillingRecord(TenantScoped, Base):
    """Invoice data: not media, kept up to 7 years after the file is closed (P10)."""

    __tablename__ = "billing_records"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    contract_id: Mapped[str] = mapped_column(String(32), index=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    item: Mapped[str] = mapped_column(String(60))
    quantity: Mapped[int] = mapped_column(Integer, default=1)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    file_closed_on: Mapped[date | None] = mapped_column(Date, nullable=True)
    delete_after: Mapped[date | None] = mapped_column(Date, nullable=True)


# -- Tenant scoping in the data layer -------------------------------------------------------------
# A Session opened with ``info={"tenant_id": T}`` adds ``tenant_id = T`` to every ORM SELECT of a
# tenant-scoped entity (SQLAlchemy's documented with_loader_criteria pattern), and refuses to
# flush a row of another tenant. Routes cannot forget the filter: it is not theirs to add.


@event.listens_for(Session, "do_orm_execute")
def _scope_to_tenant(state: ORMExecuteState) -> None:
    tenant = state.session.info.get("tenant_id")
    if tenant is None or not state.is_select or state.execution_options.get("include_all_tenants"):
        return
    state.statement = state.statement.options(
        with_loader_criteria(TenantScoped, lambda cls: cls.tenant_id == tenant, include_aliases=True)
    )


@event.listens_for(Session, "before_flush")
def _guard_tenant(session: Session, _ctx: Any, _instances: Any) -> None:
    tenant = session.info.get("tenant_id")
    if tenant is None:
        return
    for obj in list(session.new) + list(session.dirty) + list(session.deleted):
        if isinstance(obj, TenantScoped) and obj.tenant_id != tenant:
            raise PermissionError("a row of another tenant cannot be written in this session")


def make_engine(url: str) -> Engine:
    engine = create_engine(url, future=True)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            # Deleted rows are overwritten, not left in free pages (Debian's SQLite does it by
            # default; other builds do not): an erased subject's ciphertext, or clear text an
            # upgrade sealed, is not in the file any more.
            cur.execute("PRAGMA secure_delete=ON")
            cur.close()

    return engine


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine, keys: Any = None) -> None:
    """Bring the schema to the newest Alembic revision (a no-op when it is there already).

    ``keys``: the key store (a ``dataprotection.vault.KeyStore``), for revisions that seal existing
    rows (0004); without it such a revision refuses a database that has rows to seal."""
    from alembic import command

    _alembic(engine, keys, lambda cfg: command.upgrade(cfg, "head"), upgrade=True)


def downgrade(engine: Engine, revision: str, keys: Any = None) -> None:
    """Take the schema back to ``revision`` (rolling a release back); ``keys`` as for :func:`migrate`."""
    from alembic import command

    _alembic(engine, keys, lambda cfg: command.downgrade(cfg, revision), upgrade=False)


# pg_advisory_xact_lock key taken by every schema change on PostgreSQL: several hosts starting at
# once (API replicas, Ray drivers, a CLI) take turns; the later ones find the schema at head.
MIGRATION_LOCK = 0x73697465706C616E  # "siteplan"


def _alembic(engine: Engine, keys: Any, action: Any, *, upgrade: bool) -> None:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        conn.commit()
        if upgrade and before == ScriptDirectory.from_config(cfg).get_current_head():
            return  # the usual case at every start: no write lock taken (BEGIN IMMEDIATE below)
        if sqlite:
            # SQLite changes a column by copying the table and dropping the old one, which the
            # foreign keys of the tables pointing at it refuse: checked once at the end instead.
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()  # SQLAlchemy's autobegun transaction (SQLite applies the pragma outside any)
        try:
            with conn.begin():
                if sqlite:
                    # One transaction for all of it: the driver would commit each DDL statement
                    # before the first row change, and a failure would leave half a revision.
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                elif engine.dialect.name == "postgresql":
                    # DDL is transactional there: the lock is held until this one commits, and
                    # the next host then reads the revision it left (read committed).
                    got = conn.exec_driver_sql(f"SELECT pg_try_advisory_xact_lock({MIGRATION_LOCK})").scalar()
                    if not got:
                        log.info("another process is changing the schema; waiting for it")
                        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                # Read again under the lock: another process may have migrated in the meantime.
                before = MigrationContext.configure(conn).get_current_revision()
                cfg.attributes["connection"] = conn
                cfg.attributes["keys"] = keys
                action(cfg)
                if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise RuntimeError("the schema change broke a foreign key; nothing was committed")
            after = MigrationContext.configure(conn).get_current_revision()
            conn.commit()
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()
    if after == before:
        return
    if sqlite:
        # Pages a migration rewrote (clear text it sealed) leave the write-ahead log too.
        with engine.connect() as conn:
            busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").first()
            if busy is not None and busy[0]:
                log.warning("the write-ahead log could not be emptied after the schema change (busy)")
    elif upgrade and before is not None and after is not None:
        # PostgreSQL keeps old row versions in freed space until a table is rewritten.
        scripts = ScriptDirectory.from_config(cfg).iterate_revisions(after, before)
        tables = sorted({t for sc in scripts for t in getattr(sc.module, "rewrite_tables", ())})
        if tables:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql(f"VACUUM FULL {', '.join(tables)}")


# The register's journal (dataprotection/register.py writes it): a file beside the keys, and the
# Session.info key under which init_db tells the sessions where it is. Here, in the core, because
# init_db sets it and the core imports nothing above itself.
JOURNAL = "register.jsonl"
JOURNAL_INFO = "register_journal"


def journal_path(keys: object) -> Path | None:
    """Where the journal lives: beside the keys (a key store with a folder), else nowhere."""
    root = getattr(keys, "root", None)
    return Path(root) / JOURNAL if root is not None else None


def init_db(url: str, keys: Any = None) -> sessionmaker[Session]:
    """Migrate the schema to head and return a session factory.

    ``keys``: the key store. The migration may need it (see :func:`migrate`), and the sessions
    then journal the register's entries beside it (dataprotection/register.py), for a restore."""
    engine = make_engine(url)
    migrate(engine, keys)
    journal = journal_path(keys) if keys is not None else None
    return sessionmaker(engine, expire_on_commit=False, info={JOURNAL_INFO: str(journal)} if journal else None)


def tenant_session(factory: sessionmaker[Session], tenant_id: str) -> Session:
    """A session that sees and writes only ``tenant_id``'s rows."""
    s = factory()
    s.info["tenant_id"] = tenant_id
    return s
