-- One row per saga; `record` is the whole SagaRecord as JSON, the other
-- columns are copies of its fields for the admin queries and pruning.
CREATE TABLE IF NOT EXISTS sagaflow_sagas (
    request_id  text        PRIMARY KEY,
    facade      text        NOT NULL,
    mode        text        NOT NULL,
    status      text        NOT NULL
        CHECK (status IN ('running', 'compensating', 'completed', 'compensated', 'stuck')),
    record      jsonb       NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    -- Set when the saga ends, cleared if an operator retries it; pruning reads it.
    ended_at    timestamptz NULL
);

-- Listing, newest first, optionally by status or facade.
CREATE INDEX IF NOT EXISTS sagaflow_sagas_created_idx ON sagaflow_sagas (created_at DESC, request_id);
CREATE INDEX IF NOT EXISTS sagaflow_sagas_status_idx ON sagaflow_sagas (status, created_at DESC);
CREATE INDEX IF NOT EXISTS sagaflow_sagas_facade_idx ON sagaflow_sagas (facade, created_at DESC);
-- Recovery on start: the few sagas still in flight among many ended ones.
CREATE INDEX IF NOT EXISTS sagaflow_sagas_unfinished_idx ON sagaflow_sagas (created_at)
    WHERE status IN ('running', 'compensating');
-- Pruning, oldest ended first.
CREATE INDEX IF NOT EXISTS sagaflow_sagas_ended_idx ON sagaflow_sagas (ended_at, request_id)
    WHERE ended_at IS NOT NULL;
