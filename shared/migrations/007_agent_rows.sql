-- Agents read their own ledger with SQL, and nothing of another agent's.
--
-- `pflea agents add <id>` gives an agent a login of its own, a member of pflea_agents
-- (shared/agent_logins.py), recorded here. Row-level security on every table that holds an
-- agent's rows shows such a login only the rows of its agent; the leaderboard stays public.
-- The service roles have BYPASSRLS (`pflea bootstrap`), pflea_owner owns the tables: neither is
-- affected. Without BYPASSRLS the writer could not COPY into events, so this migration refuses
-- to run before `pflea bootstrap` has given it.
DO $$
BEGIN
    IF NOT coalesce((SELECT rolbypassrls FROM pg_roles WHERE rolname = 'pflea_writer'), false) THEN
        RAISE EXCEPTION 'pflea_writer lacks BYPASSRLS: run `pflea bootstrap` (as the superuser) first';
    END IF;
END;
$$;

CREATE TABLE agent_logins (
    role_name   name        PRIMARY KEY,
    agent_id    text        NOT NULL UNIQUE CHECK (agent_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
ALTER TABLE agent_logins ENABLE ROW LEVEL SECURITY;
CREATE POLICY agent_own_login ON agent_logins FOR SELECT TO pflea_agents
    USING (role_name = current_user);
GRANT SELECT ON agent_logins TO pflea_agents, pflea_reader;

-- Each table holding an agent's rows, with the column that names the agent.
DO $$
DECLARE t record;
BEGIN
    FOR t IN SELECT * FROM (VALUES ('events', 'stream_id'), ('balances', 'agent_id'), ('pnl', 'agent_id'),
                                   ('portfolio', 'agent_id'), ('command_results', 'agent_id'),
                                   ('quarantine', 'agent_id')) AS v(tbl, col)
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t.tbl);
        EXECUTE format(
            'CREATE POLICY agent_own_rows ON %I FOR SELECT TO pflea_agents '
            'USING (%I = (SELECT agent_id FROM agent_logins WHERE role_name = current_user))',
            t.tbl, t.col);
    END LOOP;
END;
$$;

GRANT USAGE ON SCHEMA public TO pflea_agents;
GRANT SELECT ON events, balances, pnl, portfolio, command_results, quarantine, leaderboard
    TO pflea_agents;
