-- A transaction's identity is (feed, agent, tx id). Events ingested before that were stored
-- under uuid5("<source>:<tx id>"); each is also known by the id the same transaction gets now,
-- uuid5("casino:<agent>:<tx id>"), so reading it from the feed again never stores it twice.
-- migrate.py fills this table right after this file, in the same transaction; nothing else
-- writes it. The writer treats an alias like a stored event id of that stream.
CREATE TABLE event_aliases (
    alias_id  uuid PRIMARY KEY,
    event_id  uuid NOT NULL,  -- the stored event (no foreign key: TRUNCATE events must meet its trigger)
    stream_id text NOT NULL
);
GRANT SELECT ON event_aliases TO pflea_writer, pflea_ingester, pflea_reader;
