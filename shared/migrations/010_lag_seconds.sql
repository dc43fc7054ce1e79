-- Lag in time, not only in events: how long ago the oldest event a reader has not applied yet
-- was recorded (0 when it is at the head). An operator alarms on this (README, Operations).
CREATE OR REPLACE VIEW projection_status AS
SELECT p.projection,
       p.position AS applied_position,
       p.applied_event_at,
       p.updated_at,
       h.head AS log_position,
       greatest(h.head - p.position, 0) AS lag_events,
       coalesce(extract(epoch FROM clock_timestamp() - (
           SELECT e.recorded_at FROM events e WHERE e.position > p.position ORDER BY e.position LIMIT 1
       )), 0)::numeric(12, 3) AS lag_seconds
FROM projection_positions p
CROSS JOIN (SELECT coalesce(max(position), 0) AS head FROM events) h;

-- The same for the log's tailers: the relay (events -> PFLEA_EVENTS) and the snapshotter.
CREATE VIEW tailer_status AS
SELECT t.kind, t.name, t.position, t.updated_at,
       greatest(h.head - t.position, 0) AS lag_events,
       coalesce(extract(epoch FROM clock_timestamp() - (
           SELECT e.recorded_at FROM events e WHERE e.position > t.position ORDER BY e.position LIMIT 1
       )), 0)::numeric(12, 3) AS lag_seconds
FROM (SELECT 'relay' AS kind, name, position, updated_at FROM relay_checkpoints
      UNION ALL
      SELECT 'snapshots', name, position, updated_at FROM snapshot_checkpoints) t
CROSS JOIN (SELECT coalesce(max(position), 0) AS head FROM events) h;

GRANT SELECT ON projection_status, tailer_status TO pflea_reader, pflea_projector, pflea_writer;
