//! Several replicas over one shared saga log: this replica's lease, the
//! takeover of sagas whose replica's lease ran out, and answers for sagas
//! that another replica ends.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio::time::MissedTickBehavior;

use crate::engine::{Drain, Resume};
use crate::error::Result;
use crate::log::{Lease, LogError};
use crate::saga::now_ms;

use super::Orchestrator;

impl Orchestrator {
    /// Registers this replica in a shared log; `None` for a log of its own.
    pub(super) async fn join_replicas(&self) -> Result<Option<Lease>> {
        if !self.engine.log.shared() {
            return Ok(None);
        }
        let o = &self.engine.options;
        let lease = self.engine.log.register(&o.pod_id, now_ms(), o.lease_ttl).await?;
        tracing::info!(replica = %o.pod_id, epoch = lease.epoch, "registered in the shared saga log");
        Ok(Some(lease))
    }

    /// Renews the lease every `lease_renew_interval`, and takes over the
    /// sagas of replicas whose lease ran out, in two tasks: a takeover (a
    /// claim, the sagas queued again, the consumers of the dead replica's
    /// topics) may take longer than the lease has left, and renewals waiting
    /// behind it would let this replica's lease run out in turn.
    pub(super) fn keep_lease(&self, lease: Option<Lease>) {
        let Some(mut lease) = lease else { return };
        let this = self.clone();
        self.engine.tasks.spawn(async move {
            let (log, o) = (&this.engine.log, &this.engine.options);
            let me = o.pod_id.as_str();
            let mut tick = tokio::time::interval(o.lease_renew_interval);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = this.engine.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = now_ms();
                match log.renew(me, lease, now, o.lease_ttl).await {
                    Ok(renewed) => {
                        if now > lease.until_ms {
                            // Nobody claimed it in time; a slower takeover would have.
                            let late_ms = now - lease.until_ms;
                            tracing::warn!(replica = me, late_ms, "lease renewed after it had run out");
                        }
                        lease = renewed;
                    }
                    Err(LogError::LeaseLost(_)) => {
                        // Paused or cut off past the lease: the sagas it drove are another
                        // replica's now (the log refuses this one's writes to them).
                        tracing::warn!(replica = me, "lease ran out and this replica's sagas were taken over");
                        match log.register(me, now_ms(), o.lease_ttl).await {
                            Ok(fresh) => lease = fresh,
                            Err(e) => tracing::warn!(error = %e, "could not register again; next round retries"),
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not renew this replica's lease; next round retries"),
                }
            }
        });
        let this = self.clone();
        self.engine.tasks.spawn(async move {
            let mut tick = tokio::time::interval(this.engine.options.lease_renew_interval);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            tick.tick().await;
            let mut draining = HashMap::new();
            loop {
                tokio::select! {
                    _ = this.engine.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                this.take_over_expired(&mut draining).await;
            }
        });
    }

    /// Claims the sagas of every replica whose lease ran out, drives them
    /// here, and consumes what waits on that replica's per-pod topics (until
    /// it comes back: see [`Drain`]).
    async fn take_over_expired(&self, draining: &mut HashMap<String, Arc<Drain>>) {
        let (log, me) = (&self.engine.log, self.engine.options.pod_id.as_str());
        let expired = match log.expired(now_ms()).await {
            Ok(expired) => expired,
            Err(e) => return tracing::warn!(error = %e, "could not look for expired replicas"),
        };
        for dead in expired.into_iter().filter(|r| r != me) {
            let records = match log.claim(&dead, me, now_ms()).await {
                Ok(Some(records)) => records,
                Ok(None) => continue, // another replica was first, or it came back
                Err(e) => {
                    tracing::warn!(replica = %dead, error = %e, "could not take over an expired replica");
                    continue;
                }
            };
            // A claim may come back empty: a log may leave the sagas whose rows a write of the
            // paused replica still locks to the next round (as the PostgreSQL log does).
            if !records.is_empty() {
                tracing::warn!(replica = %dead, sagas = records.len(), "took over the sagas of an expired replica");
            }
            for record in records {
                let Some(flow) = self.flow_of(&record) else {
                    tracing::warn!(request_id = %record.request_id, facade = %record.facade, version = ?record.version, "taken-over saga of a flow version not registered here; it waits for it");
                    continue;
                };
                let id = record.request_id.clone();
                if let Err(e) = flow.recover(record, Resume::Takeover).await {
                    tracing::warn!(request_id = %id, error = %e, "could not resume a taken-over saga; the sweep retries");
                }
            }
            draining.retain(|_, drain| !drain.stop.is_cancelled());
            if !draining.contains_key(&dead) {
                let drain = Arc::new(Drain::new(&dead, &self.engine.shutdown));
                draining.insert(dead.clone(), drain.clone());
                for flow in self.flows.values() {
                    if let Err(e) = flow.clone().drain(drain.clone()).await {
                        tracing::warn!(replica = %dead, error = %e, "could not consume an expired replica's topics");
                    }
                }
            }
        }
    }

    /// Wakes the callers waiting here for sagas that another replica ends, as
    /// the log announces the ends (callers also re-read the log now and then,
    /// for an announcement that is missed).
    pub(super) fn relay_ends(&self) {
        let Some(mut ends) = self.engine.log.ends() else { return };
        let engine = self.engine.clone();
        self.engine.tasks.spawn(async move {
            loop {
                let id = tokio::select! {
                    _ = engine.shutdown.cancelled() => return,
                    end = ends.recv() => match end {
                        Ok(id) => id,
                        Err(RecvError::Lagged(missed)) => {
                            tracing::debug!(missed, "saga ends missed; waiting callers re-read the log");
                            continue;
                        }
                        Err(RecvError::Closed) => return,
                    },
                };
                if !engine.completions.is_waiting(&id) {
                    continue;
                }
                match engine.log.get(&id).await {
                    Ok(Some(record)) if record.state.is_ended() => engine.completions.complete(&record),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(request_id = %id, error = %e, "could not read an ended saga"),
                }
            }
        });
    }
}
