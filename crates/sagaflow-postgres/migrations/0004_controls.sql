-- Operators' switches (a paused facade is `pause:<facade>`), read by every replica.
CREATE TABLE IF NOT EXISTS sagaflow_controls (
    key         text        PRIMARY KEY,
    value       text        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
