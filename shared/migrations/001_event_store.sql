-- The event store: one append-only log of every fact, plus snapshots and a quarantine.

CREATE TABLE events (
    position     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE,
    stream_id    text        NOT NULL CHECK (length(stream_id) BETWEEN 1 AND 200),
    stream_type  text        NOT NULL,
    event_type   text        NOT NULL,
    version      bigint      NOT NULL CHECK (version > 0),
    data         jsonb       NOT NULL,
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version),
    CONSTRAINT events_data_is_object CHECK (jsonb_typeof(data) = 'object'),
    CONSTRAINT events_metadata_has_schema_version CHECK (metadata ? 'schema_version')
);

CREATE INDEX events_stream_occurred_idx ON events (stream_id, occurred_at);
CREATE INDEX events_stream_recorded_idx ON events (stream_id, recorded_at);

-- Append-only is enforced here, not promised by the services.
CREATE FUNCTION pflea_events_are_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Correct a fact by appending a compensating event.';
END;
$$;

CREATE TRIGGER events_no_update_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION pflea_events_are_append_only();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION pflea_events_are_append_only();

-- Readers tail the log with `position > last_seen`. That is only safe if positions become
-- visible in increasing order, and concurrent transactions would commit out of order. So every
-- INSERT into events first takes one transaction-scoped advisory lock, before any position is
-- drawn from the identity sequence, and holds it until commit. Postgres makes a commit visible
-- before it releases the transaction's locks, so the next appender draws its positions only
-- after every smaller position is visible or rolled back. The lock lives in a trigger so that no
-- writer, however it connects, can forget it.
CREATE FUNCTION pflea_serialize_event_appends() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7061746561);  -- 'pflea' appends
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_serialize_appends
    BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION pflea_serialize_event_appends();

CREATE TABLE snapshots (
    stream_id      text        NOT NULL,
    snapshot_type  text        NOT NULL,
    version        bigint      NOT NULL CHECK (version > 0),
    schema_version integer     NOT NULL DEFAULT 1,
    state          jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (stream_id, snapshot_type, version)
);

-- Anything that could not become an event, with the raw bytes (bytea: it may not be UTF-8).
CREATE TABLE quarantine (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source        text        NOT NULL,
    reason        text        NOT NULL,
    raw           bytea       NOT NULL,
    agent_id      text,
    subject       text,
    dedup_key     text        NOT NULL UNIQUE,
    seen_count    integer     NOT NULL DEFAULT 1,
    received_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_seen_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX quarantine_agent_idx ON quarantine (agent_id);

-- Where the relay has published up to; one row per relay name.
CREATE TABLE relay_checkpoints (
    name        text PRIMARY KEY,
    position    bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Roles the services connect as. None owns a table; none may change a stored event.
DO $$
DECLARE r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['pflea_ingester', 'pflea_writer', 'pflea_projector', 'pflea_reader']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE', r);
        END IF;
    END LOOP;
END;
$$;

GRANT USAGE ON SCHEMA public TO pflea_ingester, pflea_writer, pflea_projector, pflea_reader;
GRANT SELECT, INSERT ON events TO pflea_writer;
GRANT SELECT ON events TO pflea_ingester, pflea_projector, pflea_reader;
GRANT SELECT, INSERT ON snapshots TO pflea_writer, pflea_projector;
GRANT SELECT ON snapshots TO pflea_reader;
GRANT SELECT, INSERT, UPDATE ON quarantine TO pflea_ingester, pflea_writer, pflea_projector;
GRANT SELECT ON quarantine TO pflea_reader;
GRANT SELECT, INSERT, UPDATE ON relay_checkpoints TO pflea_writer;
GRANT SELECT ON relay_checkpoints TO pflea_reader, pflea_projector;

-- Wake the relay (LISTEN pflea_events) as soon as an append commits; polling is the fallback.
CREATE FUNCTION pflea_notify_appended() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pflea_events', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify_appended
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION pflea_notify_appended();
