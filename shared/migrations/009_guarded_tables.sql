-- The records beside `events` are guarded like it, even against the owner.
--
-- command_results: 003 refuses UPDATE and DELETE of a reply; TRUNCATE would erase them all at once.
CREATE TRIGGER command_results_no_truncate
    BEFORE TRUNCATE ON command_results
    FOR EACH STATEMENT EXECUTE FUNCTION pflea_command_results_are_append_only();

-- quarantine: the evidence of what could not become an event. The same input quarantined again
-- only counts (shared/quarantine.py: INSERT ... ON CONFLICT DO UPDATE SET seen_count,
-- last_seen_at); its reason, raw bytes and the rest never change, and no row goes away.
CREATE FUNCTION pflea_quarantine_only_counts() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    kept    jsonb := to_jsonb(OLD) - 'seen_count' - 'last_seen_at';
    given   jsonb := to_jsonb(NEW) - 'seen_count' - 'last_seen_at';
    changed text;
BEGIN
    IF given = kept THEN
        RETURN NEW;
    END IF;
    -- Every column but the counters, so that a column added later is guarded too.
    SELECT string_agg(key, ', ' ORDER BY key) INTO changed
    FROM jsonb_each(given) AS g(key, value)
    WHERE value IS DISTINCT FROM kept -> key;
    RAISE EXCEPTION 'quarantine rows are kept as given: only seen_count and last_seen_at may change, not %', changed
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Quarantine the input again to count it; its row is never rewritten.';
END;
$$;

CREATE FUNCTION pflea_quarantine_is_kept() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'quarantine rows are kept as given: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'What could not become an event stays on record.';
END;
$$;

CREATE TRIGGER quarantine_only_counts
    BEFORE UPDATE ON quarantine
    FOR EACH ROW EXECUTE FUNCTION pflea_quarantine_only_counts();

CREATE TRIGGER quarantine_no_delete
    BEFORE DELETE ON quarantine
    FOR EACH ROW EXECUTE FUNCTION pflea_quarantine_is_kept();

CREATE TRIGGER quarantine_no_truncate
    BEFORE TRUNCATE ON quarantine
    FOR EACH STATEMENT EXECUTE FUNCTION pflea_quarantine_is_kept();

-- And the services may not even ask: they upsert, which needs UPDATE of the counters only.
REVOKE UPDATE ON quarantine FROM pflea_ingester, pflea_writer, pflea_projector;
GRANT UPDATE (seen_count, last_seen_at) ON quarantine TO pflea_ingester, pflea_writer, pflea_projector;
