"""The schema: one migration script per version, applied in order at open (``PRAGMA user_version``)."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: the queue
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        event_id TEXT NOT NULL,
        type TEXT NOT NULL,
        entity_key TEXT NOT NULL,
        received_at REAL NOT NULL,
        body BLOB NOT NULL,
        UNIQUE (source, event_id)
    );
    CREATE INDEX events_received ON events (received_at);
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        event INTEGER NOT NULL,
        sink TEXT NOT NULL,
        entity_key TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('ready', 'leased', 'done', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        lease_until REAL,
        lease_owner TEXT,
        last_error TEXT
    );
    CREATE INDEX deliveries_due ON deliveries (next_attempt_at, id) WHERE state = 'ready';
    CREATE INDEX deliveries_active ON deliveries (sink, entity_key, id) WHERE state IN ('ready', 'leased');
    CREATE INDEX deliveries_leased ON deliveries (lease_until) WHERE state = 'leased';
    CREATE INDEX deliveries_dead ON deliveries (sink, id) WHERE state = 'dead';
    CREATE INDEX deliveries_event ON deliveries (event);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        event INTEGER NOT NULL,
        delivery INTEGER,
        action TEXT NOT NULL,
        detail TEXT
    );
    CREATE INDEX audit_event ON audit (event);
    CREATE TABLE rejections (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        source TEXT NOT NULL,
        status INTEGER NOT NULL,
        reason TEXT NOT NULL,
        remote TEXT,
        headers TEXT NOT NULL
    );
    CREATE TABLE state (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (scope, key)
    ) WITHOUT ROWID;
    """,
    # 2: the pull side. A cursor (kind 'poll' or 'reconcile') is opaque JSON owned by the connector and
    # is only ever written in the transaction that stores the events it produced. entity_versions is the
    # last version and content hash seen per entity: it drops stale and repeated changes and is what
    # reconciliation compares the remote state with.
    """
    CREATE TABLE cursors (
        source TEXT NOT NULL,
        kind TEXT NOT NULL,
        value BLOB NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (source, kind)
    ) WITHOUT ROWID;
    CREATE TABLE entity_versions (
        source TEXT NOT NULL,
        entity TEXT NOT NULL,
        entity_id TEXT NOT NULL,
        version TEXT,
        hash TEXT NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,
        event_id TEXT NOT NULL,
        seen_at REAL NOT NULL,
        PRIMARY KEY (source, entity, entity_id)
    ) WITHOUT ROWID;
    """,
    # 3: per-entity order keyed on a column that leasing does not touch. The old index's WHERE named
    # `state`, so leasing (ready -> leased) rewrote each delivery's entry, and a lease of 100 dirtied
    # up to 100 pages scattered by entity key. `active` is 1 while a delivery is ready or leased and
    # NULL once it is done or dead: only those two final changes touch the index now.
    """
    ALTER TABLE deliveries ADD COLUMN active INTEGER DEFAULT 1;
    UPDATE deliveries SET active = NULL WHERE state IN ('done', 'dead');
    DROP INDEX deliveries_active;
    CREATE INDEX deliveries_active ON deliveries (sink, entity_key, id) WHERE active = 1;
    """,
    # 4: the head of each entity line is marked, so leasing reads only heads. Finding heads with NOT
    # EXISTS walked every blocked row behind a head in backoff (213 ms for 100,000 changes to one
    # entity). `head` is 1 on the one active delivery of a (sink, entity key) line that may be leased
    # (the oldest, or the one in flight), NULL otherwise; it moves when the head is done or dead.
    """
    ALTER TABLE deliveries ADD COLUMN head INTEGER;
    UPDATE deliveries SET head = 1 WHERE active = 1 AND NOT EXISTS (
        SELECT 1 FROM deliveries p WHERE p.sink = deliveries.sink AND p.entity_key = deliveries.entity_key
        AND p.active = 1 AND p.id < deliveries.id);
    DROP INDEX deliveries_due;
    CREATE INDEX deliveries_heads ON deliveries (next_attempt_at, id) WHERE state = 'ready' AND head = 1;
    """,
    # 5: retention reaches delete markers and the loop guard's memory, by age, through an index each.
    """
    CREATE INDEX entity_tombstones ON entity_versions (seen_at) WHERE deleted = 1;
    CREATE INDEX state_loop_guard_age ON state (updated_at) WHERE substr(scope, 1, 11) = 'loop-guard:';
    """,
    # 6: the webhook request each event arrived in (X-Request-Id: the listener's or a trusted proxy's), for
    # its story; NULL for polled, streamed and reconciled events.
    """
    ALTER TABLE events ADD COLUMN request_id TEXT;
    """,
    # 7: deliveries per (sink, state), kept by triggers in the transaction that changes them, so `integrand
    # status`, /metrics and systemd's STATUS= read a few rows instead of counting every delivery (413 ms
    # with 200,000 retained on a loaded machine). Rows at 0 stay (a sink's states recur); readers skip them.
    """
    CREATE TABLE delivery_counts (
        sink TEXT NOT NULL,
        state TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (sink, state)
    ) WITHOUT ROWID;
    INSERT INTO delivery_counts (sink, state, n) SELECT sink, state, COUNT(*) FROM deliveries GROUP BY sink, state;
    CREATE TRIGGER deliveries_count_insert AFTER INSERT ON deliveries BEGIN
        INSERT INTO delivery_counts (sink, state, n) VALUES (new.sink, new.state, 1)
            ON CONFLICT (sink, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER deliveries_count_update AFTER UPDATE OF state ON deliveries WHEN old.state IS NOT new.state BEGIN
        UPDATE delivery_counts SET n = n - 1 WHERE sink = old.sink AND state = old.state;
        INSERT INTO delivery_counts (sink, state, n) VALUES (new.sink, new.state, 1)
            ON CONFLICT (sink, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER deliveries_count_delete AFTER DELETE ON deliveries BEGIN
        UPDATE delivery_counts SET n = n - 1 WHERE sink = old.sink AND state = old.state;
    END;
    """,
]
