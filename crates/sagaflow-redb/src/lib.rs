//! The embedded SagaLog: one redb file, group-committed writes.
