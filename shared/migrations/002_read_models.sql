-- Read models: derived from events, rebuildable at any time, readable by pflea_reader.
-- Aggregates are unconstrained NUMERIC: exact sums of amounts (each at most 18 places) can outgrow
-- any one amount, and ratios (roi) of tiny wagers can be huge; neither may fail an insert.

CREATE TABLE projection_checkpoints (
    projection  text   NOT NULL,
    stream_id   text   NOT NULL,
    version     bigint NOT NULL DEFAULT 0,
    position    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (projection, stream_id)
);

CREATE TABLE projection_positions (
    projection        text PRIMARY KEY,
    position          bigint      NOT NULL DEFAULT 0,
    applied_event_at  timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
INSERT INTO projection_positions (projection)
VALUES ('balance'), ('pnl'), ('portfolio'), ('leaderboard');

CREATE TABLE balances (
    agent_id          text          NOT NULL,
    asset             text          NOT NULL,
    balance           numeric NOT NULL,
    last_position     bigint        NOT NULL,
    PRIMARY KEY (agent_id, asset)
);

CREATE TABLE pnl (
    agent_id       text            NOT NULL,
    asset          text            NOT NULL,
    total_wagered  numeric NOT NULL,
    total_won      numeric NOT NULL,
    total_fees     numeric NOT NULL,
    bet_count      bigint          NOT NULL,
    win_count      bigint          NOT NULL,
    net_pnl        numeric NOT NULL,
    win_rate       numeric NOT NULL,
    roi            numeric NOT NULL,
    last_position  bigint          NOT NULL,
    PRIMARY KEY (agent_id, asset),
    CHECK (total_wagered >= 0 AND total_won >= 0 AND total_fees >= 0)
);

CREATE TABLE portfolio (
    agent_id       text            NOT NULL,
    asset          text            NOT NULL,
    available      numeric NOT NULL,
    in_escrow      numeric NOT NULL,
    total          numeric NOT NULL,
    last_position  bigint          NOT NULL,
    PRIMARY KEY (agent_id, asset),
    CHECK (total = available + in_escrow)
);

CREATE TABLE leaderboard_entries (
    agent_id       text            NOT NULL,
    asset          text            NOT NULL,
    net_pnl        numeric NOT NULL,
    roi            numeric NOT NULL,
    win_rate       numeric NOT NULL,
    volume         numeric NOT NULL,
    total_wagered  numeric NOT NULL,
    total_won      numeric NOT NULL,
    total_fees     numeric NOT NULL,
    bet_count      bigint          NOT NULL,
    win_count      bigint          NOT NULL,
    last_position  bigint          NOT NULL,
    PRIMARY KEY (agent_id, asset)
);
CREATE INDEX leaderboard_entries_rank_idx ON leaderboard_entries (asset, net_pnl DESC, agent_id);

-- Ties share a rank; agent_id orders them so the listing is stable.
CREATE VIEW leaderboard AS
SELECT asset,
       rank() OVER (PARTITION BY asset ORDER BY net_pnl DESC) AS rank,
       agent_id, net_pnl, roi, win_rate, volume, bet_count
FROM leaderboard_entries;

-- How fresh each read model is: the last global position applied and how far the log is ahead.
CREATE VIEW projection_status AS
SELECT p.projection,
       p.position AS applied_position,
       p.applied_event_at,
       p.updated_at,
       h.head AS log_position,
       greatest(h.head - p.position, 0) AS lag_events
FROM projection_positions p
CROSS JOIN (SELECT coalesce(max(position), 0) AS head FROM events) h;

GRANT SELECT, INSERT, UPDATE ON projection_checkpoints, projection_positions TO pflea_projector;
GRANT SELECT, INSERT, UPDATE ON balances, pnl, portfolio, leaderboard_entries TO pflea_projector;
GRANT SELECT ON projection_checkpoints, projection_positions, balances, pnl, portfolio,
                leaderboard_entries, leaderboard, projection_status TO pflea_reader;
GRANT SELECT ON leaderboard, projection_status TO pflea_projector;
