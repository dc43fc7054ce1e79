-- Projectors take their projection's advisory lock through this function and through nothing
-- else: `pflea bootstrap` takes the advisory-lock functions from PUBLIC, because a role that may
-- take any advisory lock may take the one every append waits for (APPENDS) and stall the
-- ledger. This function takes only a projection's lock (the ids of shared/locks.py PROJECTIONS;
-- tests/test_locks.py keeps the two lists equal), shared, until the end of the transaction.
CREATE FUNCTION pflea_projection_lock_shared(lock_id bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
    IF NOT lock_id = ANY (ARRAY[7061747310, 7061746930, 7061747590, 7061747741]::bigint[]) THEN
        RAISE EXCEPTION 'advisory lock % is not a projection''s', lock_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(lock_id);
END;
$$;
REVOKE ALL ON FUNCTION pflea_projection_lock_shared(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pflea_projection_lock_shared(bigint) TO pflea_projector;
