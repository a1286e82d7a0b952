"""The PostgreSQL store's schema: one migration script per version, applied in order at open.

The version lives in ``integrand_schema`` and every migration runs under ``pg_advisory_xact_lock``,
so several nodes starting at once apply each version exactly once (the others wait, then see it).
Columns mirror SQLite's (``schema.py``); times are seconds since the epoch (the store's clock), as there.
"""

from __future__ import annotations

MIGRATION_LOCK = 0x696E7467  # "intg": the advisory lock every node takes to migrate

PG_MIGRATIONS: list[str] = [
    # 1: everything SQLite's versions 1-5 hold, in one step (there is no older PostgreSQL store to upgrade).
    # `ordered` marks deliveries of events with an entity: at most one head per (sink, entity key) line is
    # then a unique index, so two nodes can never both start a line's next delivery.
    """
    CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY,
        source TEXT NOT NULL,
        event_id TEXT NOT NULL,
        type TEXT NOT NULL,
        entity_key TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        body BYTEA NOT NULL,
        UNIQUE (source, event_id)
    );
    CREATE INDEX events_received ON events (received_at, id);
    CREATE TABLE deliveries (
        id BIGSERIAL PRIMARY KEY,
        event BIGINT NOT NULL,
        sink TEXT NOT NULL,
        entity_key TEXT NOT NULL,
        ordered BOOLEAN NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('ready', 'leased', 'done', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        lease_until DOUBLE PRECISION,
        lease_owner TEXT,
        last_error TEXT,
        active BOOLEAN,
        head BOOLEAN
    );
    CREATE INDEX deliveries_heads ON deliveries (next_attempt_at, id) WHERE state = 'ready' AND head;
    CREATE UNIQUE INDEX deliveries_one_head ON deliveries (sink, entity_key) WHERE head AND ordered;
    CREATE INDEX deliveries_active ON deliveries (sink, entity_key, id) WHERE active;
    CREATE INDEX deliveries_leased ON deliveries (lease_until) WHERE state = 'leased';
    CREATE INDEX deliveries_dead ON deliveries (sink, id) WHERE state = 'dead';
    CREATE INDEX deliveries_event ON deliveries (event);
    CREATE TABLE audit (
        id BIGSERIAL PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        event BIGINT NOT NULL,
        delivery BIGINT,
        action TEXT NOT NULL,
        detail TEXT
    );
    CREATE INDEX audit_event ON audit (event);
    CREATE TABLE rejections (
        id BIGSERIAL PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        source TEXT NOT NULL,
        status INTEGER NOT NULL,
        reason TEXT NOT NULL,
        remote TEXT,
        headers TEXT NOT NULL
    );
    CREATE TABLE state (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        value BYTEA NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (scope, key)
    );
    CREATE INDEX state_loop_guard_age ON state (updated_at) WHERE substr(scope, 1, 11) = 'loop-guard:';
    CREATE TABLE cursors (
        source TEXT NOT NULL,
        kind TEXT NOT NULL,
        value BYTEA NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (source, kind)
    );
    CREATE TABLE entity_versions (
        source TEXT NOT NULL,
        entity TEXT NOT NULL,
        entity_id TEXT NOT NULL,
        version TEXT,
        hash TEXT NOT NULL,
        deleted BOOLEAN NOT NULL DEFAULT false,
        event_id TEXT NOT NULL,
        seen_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (source, entity, entity_id)
    );
    CREATE INDEX entity_tombstones ON entity_versions (seen_at) WHERE deleted
    """,
    # 2: SQLite's version 6, the webhook request each event arrived in (NULL for pulled events).
    """
    ALTER TABLE events ADD COLUMN request_id TEXT
    """,
    # 3: several nodes: who is alive (heartbeats) and who runs each singleton (a polling, streaming or
    # reconciling source). A lease's token only grows (every acquisition adds one): it is the fence every
    # cursor, position and state commit of the source checks. Times are the database's clock
    # (integrand_now(): clock_timestamp() in epoch seconds), never a node's, so nodes whose clocks disagree still agree on who holds what.
    """
    CREATE FUNCTION integrand_now() RETURNS DOUBLE PRECISION LANGUAGE sql VOLATILE
        AS $$ SELECT extract(epoch FROM clock_timestamp())::float8 $$;
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        store_owner TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        version TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        owner TEXT,
        token BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        acquired_at DOUBLE PRECISION NOT NULL,
        renewed_at DOUBLE PRECISION NOT NULL
    )
    """,
]
