-- What is left of a pruned saga: enough to refuse its request id for a while
-- rather than start it again. Pruning moves a saga here in the statement that
-- deletes its row (see src/tombstones.rs); tombstones are pruned in their turn,
-- by `pruned_at`.
CREATE TABLE IF NOT EXISTS sagaflow_tombstones (
    request_id  text        PRIMARY KEY,
    facade      text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('completed', 'compensated', 'stuck')),
    ended_at    timestamptz NOT NULL,
    pruned_at   timestamptz NOT NULL
);

-- Pruning, oldest first.
CREATE INDEX IF NOT EXISTS sagaflow_tombstones_pruned_idx ON sagaflow_tombstones (pruned_at, request_id);

-- A saga is not inserted over a tombstone of its request id: the insert is
-- skipped, as a conflict is, and `begin` then finds the tombstone.
--
-- Checked here rather than in the INSERT's own WHERE clause because that
-- reads a snapshot taken when the statement starts: an INSERT racing a prune
-- that is moving the same request id's saga waits for the prune (the row it
-- conflicts with is being deleted), then inserts once the row is gone, having
-- seen no tombstone. Locking the row first waits for the prune the same way,
-- and the check after it, in a function of its own, reads a fresh snapshot
-- (a VOLATILE function's queries each take one), which has the tombstone.
-- FOR KEY SHARE does not block appends (FOR NO KEY UPDATE); it makes a
-- concurrent prune skip the row (FOR UPDATE SKIP LOCKED).
CREATE OR REPLACE FUNCTION sagaflow_refuse_pruned() RETURNS trigger
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM 1 FROM sagaflow_sagas WHERE request_id = NEW.request_id FOR KEY SHARE;
    IF EXISTS (SELECT 1 FROM sagaflow_tombstones WHERE request_id = NEW.request_id) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS sagaflow_refuse_pruned ON sagaflow_sagas;
CREATE TRIGGER sagaflow_refuse_pruned BEFORE INSERT ON sagaflow_sagas
    FOR EACH ROW EXECUTE FUNCTION sagaflow_refuse_pruned();
