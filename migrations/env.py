"""Alembic environment: runs Switchboard's migrations against the URL set by `gateway.store.db.migrate`.

The URL comes from the config's main option `sqlalchemy.url`; an optional PostgreSQL schema from
`switchboard.schema` (applied through `search_path`, so `alembic_version` lives in that schema too).
On PostgreSQL an advisory lock serialises concurrent `migrate` calls from several gateway processes.
"""

from __future__ import annotations

from alembic import context

from gateway.store.db import make_engine, metadata

# Any constant shared by every Switchboard process; "SWBD" in ASCII.
_MIGRATION_LOCK_ID = 0x53574244


def run_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    cfg = context.config
    url = cfg.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("sqlalchemy.url is not set; run migrations through gateway.store.db.migrate(url)")
    engine = make_engine(url, cfg.get_main_option("switchboard.schema"))
    try:
        with engine.connect() as connection:
            is_sqlite = connection.dialect.name == "sqlite"
            context.configure(
                connection=connection,
                target_metadata=metadata,
                render_as_batch=is_sqlite,  # SQLite cannot ALTER most things; batch mode copies tables
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_ID})")
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
