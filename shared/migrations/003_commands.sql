-- Agent commands: the answer to each command, kept so that a retried command gets it again.
--
-- The writer inserts the row in the same transaction as the command's events, so a reply exists
-- exactly when its events do: a command whose commit outcome was unknown finds its row on retry
-- and is never applied twice. Definitive rejections are kept too (same command id, same answer);
-- transient failures (database or Purple Flea away) are not, so a retry can still succeed.

CREATE TABLE command_results (
    command_id    uuid        PRIMARY KEY,
    agent_id      text        NOT NULL CHECK (length(agent_id) BETWEEN 1 AND 200),
    command_type  text        NOT NULL,
    accepted      boolean     NOT NULL,
    -- The stream version right after the command's events (NULL for a rejection).
    version       bigint      CHECK (version IS NULL OR version > 0),
    reply         jsonb       NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT command_results_reply_is_object CHECK (jsonb_typeof(reply) = 'object')
);

CREATE INDEX command_results_agent_idx ON command_results (agent_id, recorded_at);

-- A reply is a fact like an event: written once, never changed.
CREATE FUNCTION pflea_command_results_are_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'command_results is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'A command''s answer never changes; send a new command instead.';
END;
$$;

CREATE TRIGGER command_results_no_update_delete
    BEFORE UPDATE OR DELETE ON command_results
    FOR EACH ROW EXECUTE FUNCTION pflea_command_results_are_append_only();

-- Commands the writer has sent to Purple Flea (PlaceBet, ClaimFaucet), before it knew the outcome.
-- A retry of such a command must not be re-validated against the ledger: Purple Flea may have
-- applied it already (and the ingester stored its effect), so the retry goes straight back to
-- Purple Flea with the same request id, which answers the original outcome.
CREATE TABLE command_attempts (
    command_id    uuid        PRIMARY KEY,
    agent_id      text        NOT NULL,
    command_type  text        NOT NULL,
    sent_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

GRANT SELECT, INSERT ON command_results, command_attempts TO pflea_writer;
GRANT SELECT ON command_results, command_attempts TO pflea_reader;

-- How far each writer's snapshotter has read the log. It saves an agent's state every
-- PFLEA_SNAPSHOT_EVERY versions (snapshots make time travel and command decisions fold only the
-- events since the newest one); losing this row only costs re-reading the log.
CREATE TABLE snapshot_checkpoints (
    name        text PRIMARY KEY,
    position    bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

GRANT SELECT, INSERT, UPDATE ON snapshot_checkpoints TO pflea_writer;
GRANT SELECT ON snapshot_checkpoints TO pflea_reader;
