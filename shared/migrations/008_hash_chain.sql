-- Tamper evidence: every event carries hash = SHA-256(prev_hash || canonical encoding), where
-- prev_hash is the hash of the previous event of the same stream (32 zero bytes before version 1).
-- The README ("Verifiable history") documents the encoding with a test vector; in short it is the
-- UTF-8 of the PostgreSQL jsonb text of
--   ["pflea-event-v1", stream_id, stream_type, version, position, event_id, event_type,
--    occurred_at, recorded_at, data, metadata]
-- with both times in UTC as YYYY-MM-DDTHH:MM:SS.ffffffZ.
--
-- A trigger computes it as the row is inserted, on every path (COPY, INSERT, commands, imports),
-- in the appending transaction; it also draws recorded_at and refuses a position the caller chose,
-- so the columns that order and date history are the store's, never a service's.

CREATE FUNCTION pflea_event_canonical(e events) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_array(
        'pflea-event-v1', e.stream_id, e.stream_type, e.version, e.position, e.event_id::text,
        e.event_type,
        to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        to_char(e.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        e.data, e.metadata)::text
$$;

CREATE FUNCTION pflea_event_hash(prev bytea, e events) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sha256(prev || convert_to(pflea_event_canonical(e), 'UTF8'))
$$;

CREATE FUNCTION pflea_chain_genesis() RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT decode(repeat('00', 32), 'hex') $$;

ALTER TABLE events ADD COLUMN hash bytea;
ALTER TABLE snapshots ADD COLUMN event_hash bytea;

-- Events stored before this migration get their chains now, stream by stream in version order.
ALTER TABLE events DISABLE TRIGGER events_no_update_delete;
DO $$
DECLARE
    r events;
    prev bytea;
    current_stream text := NULL;
BEGIN
    FOR r IN SELECT * FROM events ORDER BY stream_id, version LOOP
        IF current_stream IS DISTINCT FROM r.stream_id OR r.version = 1 THEN
            prev := pflea_chain_genesis();
            current_stream := r.stream_id;
        END IF;
        prev := pflea_event_hash(prev, r);
        UPDATE events SET hash = prev WHERE position = r.position;
    END LOOP;
END;
$$;
ALTER TABLE events ENABLE TRIGGER events_no_update_delete;
-- Snapshots taken before are as trustworthy as the events they were folded from, today.
UPDATE snapshots s SET event_hash = e.hash
FROM events e WHERE e.stream_id = s.stream_id AND e.version = s.version;
ALTER TABLE events ALTER COLUMN hash SET NOT NULL;
ALTER TABLE events ADD CONSTRAINT events_hash_is_sha256 CHECK (octet_length(hash) = 32);

-- SECURITY DEFINER: currval of the identity sequence needs a privilege no service role has.
CREATE FUNCTION pflea_chain_event() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_catalog AS $$
DECLARE
    prev bytea;
BEGIN
    -- The identity default drew this session's last value; anything else was chosen by the caller.
    IF NEW.position IS DISTINCT FROM currval('events_position_seq') THEN
        RAISE EXCEPTION 'events.position is drawn by the store, not chosen (got %)', NEW.position
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    NEW.recorded_at := clock_timestamp();
    IF NEW.version = 1 THEN
        prev := pflea_chain_genesis();
    ELSE
        SELECT hash INTO prev FROM events WHERE stream_id = NEW.stream_id AND version = NEW.version - 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'stream % has no version % to chain version % to',
                NEW.stream_id, NEW.version - 1, NEW.version
                USING ERRCODE = 'foreign_key_violation';
        END IF;
    END IF;
    NEW.hash := pflea_event_hash(prev, NEW);
    RETURN NEW;
END;
$$;

CREATE TRIGGER events_chain
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION pflea_chain_event();

-- The head of every stream: an agent (or anyone) keeps its head hash as a receipt, and a later
-- `pflea verify` proves the history up to it unchanged. security_invoker: an agent's login sees
-- its own stream only (row-level security of events applies through it).
CREATE VIEW stream_heads WITH (security_invoker = true) AS
SELECT DISTINCT ON (stream_id) stream_id, version, position, encode(hash, 'hex') AS hash, recorded_at
FROM events
ORDER BY stream_id, version DESC;

GRANT SELECT ON stream_heads TO pflea_reader, pflea_agents;

-- Snapshots are the writer's (its snapshotter): a projector has no business writing them.
REVOKE INSERT ON snapshots FROM pflea_projector;
