-- How often the writer has tried a PFLEA_TX message that came back to it: redelivered by
-- JetStream, or read from the stream because the writer that held it died (services/writer/
-- order.py). Counted before each attempt, in its own transaction, so a message that kills the
-- writer every time is counted even though the writer never gets to say so; at the delivery
-- limit it is quarantined instead of tried again. Rows older than the stream's retention are
-- deleted by the writer at start.

CREATE TABLE writer_attempts (
    msg_key      text        PRIMARY KEY,
    attempts     integer     NOT NULL CHECK (attempts > 0),
    last_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

GRANT SELECT, INSERT, UPDATE, DELETE ON writer_attempts TO pflea_writer;
GRANT SELECT ON writer_attempts TO pflea_reader;
