-- Several orchestrator replicas share this log: each sync or throttling saga
-- is driven by one of them, its owner (NULL: any replica, as for async sagas).
ALTER TABLE sagaflow_sagas ADD COLUMN IF NOT EXISTS owner text NULL;
-- Taking over a replica's unfinished sagas.
CREATE INDEX IF NOT EXISTS sagaflow_sagas_owner_idx ON sagaflow_sagas (owner)
    WHERE status IN ('running', 'compensating');

-- The replicas and their leases. `epoch` grows at each registration and
-- takeover; `taken_by` is set when another replica took the sagas over.
CREATE TABLE IF NOT EXISTS sagaflow_replicas (
    replica   text   PRIMARY KEY,
    epoch     bigint NOT NULL,
    until_ms  bigint NOT NULL,
    taken_by  text   NULL
);

-- A saga's end is announced on channel `sagaflow_ends` as "<schema> <request id>",
-- so a caller waiting on another replica learns it at once.
CREATE OR REPLACE FUNCTION sagaflow_announce_end() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('sagaflow_ends', TG_TABLE_SCHEMA || ' ' || NEW.request_id);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS sagaflow_sagas_ended ON sagaflow_sagas;
CREATE TRIGGER sagaflow_sagas_ended AFTER UPDATE OF ended_at ON sagaflow_sagas
    FOR EACH ROW WHEN (NEW.ended_at IS NOT NULL AND OLD.ended_at IS NULL)
    EXECUTE FUNCTION sagaflow_announce_end();
