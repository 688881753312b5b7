//! SagaLog over PostgreSQL (sqlx), with embedded migrations and background pruning.
