//! The broker side: hops and rollback work published, consumed, settled.

use super::*;

impl<D: FlowData> FlowRuntime<D> {
    pub(super) async fn publish_hop(&self, request_id: &str, step: usize, data: serde_json::Value) -> Result<()> {
        let hop = HopMessage {
            request_id: request_id.to_owned(),
            facade: self.facade.to_string(),
            step,
            data,
            version: Some(self.version.fingerprint.clone()),
        };
        let payload =
            serde_json::to_vec(&hop).map_err(|source| Error::Data { request_id: request_id.into(), source })?;
        let message = Message::new(self.topic(&self.hop_topic_id(step)), payload)
            .header(REQUEST_ID_HEADER, request_id)
            .header(MESSAGE_ID_HEADER, format!("{request_id}:step:{step}"));
        self.publish(message).await
    }

    /// Publishes the hops of what the saga runs next: the step after the one
    /// recorded, or each branch of a parallel stage not done.
    pub(super) async fn publish_next(&self, record: &SagaRecord) -> Result<()> {
        if let Next::Run(stage) = record.next() {
            for index in record.to_run(stage) {
                self.publish_hop(&record.request_id, index, record.data.clone()).await?;
            }
        }
        Ok(())
    }

    /// Goes on from step `step`, just recorded: the saga's end, the merge of a
    /// stage whose last branch it was, or the next stage's hops. A branch whose
    /// siblings are not all done leaves the going on to the last of them: their
    /// hops are out already, and sending them again would run them twice.
    async fn continue_hops(&self, id: &Arc<str>, record: &SagaRecord, step: usize) -> Result<()> {
        match record.next() {
            Next::End => {
                self.finish(record).await;
                Ok(())
            }
            // Boxed: a linear saga's hop future stays as small as it was without stages.
            Next::Join(stage) => Box::pin(self.join_hops(id, record, stage)).await,
            Next::Run(stage) if stage.contains(step) => Ok(()),
            Next::Run(_) => self.publish_next(record).await,
            Next::Compensate(_) | Next::Wait => Ok(()),
        }
    }

    /// Sends again the hops of the saga's current stage that may not have
    /// reached the broker: those of its steps not started. A started step has
    /// had its hop delivered, and the broker delivers it again if its consumer
    /// stopped; a second copy would only run it twice at once.
    async fn resend(&self, record: &SagaRecord, stage: Stage) -> Result<()> {
        for index in stage.steps().filter(|&i| record.step_status(i) == StepStatus::Pending) {
            self.publish_hop(&record.request_id, index, record.data.clone()).await?;
        }
        Ok(())
    }

    /// Merges the data of a parallel stage's branches (all done) and records
    /// it; the one delivery whose merge the log records publishes what follows.
    pub(super) async fn join_hops(&self, id: &Arc<str>, record: &SagaRecord, stage: Stage) -> Result<()> {
        let merged = self.decode(id, record.data.clone()).and_then(|mut data| {
            let branches = self.branch_outputs(id, record, stage, Vec::new())?;
            self.flow.merge(stage, &mut data, branches);
            Ok((self.flow.oversize(&data), self.encode(id, &data)?))
        });
        let data = match merged {
            Ok((None, data)) => data,
            Ok((Some(error), _)) => {
                // Every branch ran: the stage, failed at its first step, is compensated whole.
                return match self.record_failure(id, stage.first, error, 0, true, false).await {
                    Ok(failed) if !failed.state.is_ended() => self.publish_rollback(&failed).await,
                    Ok(_) | Err(Error::Log(LogError::Transition(_))) => Ok(()),
                    Err(e) => Err(e),
                };
            }
            Err(error) => return self.halt(id, &error).await.map(drop),
        };
        let event = SagaEvent::BranchesJoined { first: stage.first, data };
        match self.engine.durably(|| self.engine.log.append(id, event.clone())).await {
            Ok(joined) => {
                if joined.state.is_ended() {
                    self.finish(&joined).await;
                    Ok(())
                } else {
                    self.publish_next(&joined).await
                }
            }
            // Another delivery merged first: it goes on.
            Err(Error::Log(LogError::Transition(_))) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Publishes rollback work for the saga. Its message id is the same for
    /// every re-publish of one compensation round (so a broker that
    /// deduplicates drops the copies) and new after an operator's retry.
    pub(super) async fn publish_rollback(&self, record: &SagaRecord) -> Result<()> {
        let request_id = record.request_id.as_str();
        let round = record.history.iter().filter(|h| h.event == HistoryEvent::RetryCompensation).count();
        let msg = RollbackMessage {
            request_id: request_id.to_owned(),
            facade: self.facade.to_string(),
            version: Some(self.version.fingerprint.clone()),
        };
        let payload =
            serde_json::to_vec(&msg).map_err(|source| Error::Data { request_id: request_id.into(), source })?;
        // A sync or throttling saga is compensated in the replica that owns it.
        let pod = record.owner.as_deref().filter(|_| self.engine.log.shared()).unwrap_or(&self.engine.options.pod_id);
        let message = Message::new(self.topic_of(&self.rollback_topic_id(), pod), payload)
            .header(REQUEST_ID_HEADER, request_id)
            .header(MESSAGE_ID_HEADER, format!("{request_id}:rollback:{round}"));
        self.publish(message).await
    }

    pub(super) async fn publish(&self, message: Message) -> Result<()> {
        let started = Instant::now();
        self.engine.broker.publish(message).await?;
        let histogram = &self.engine.stats.publish_seconds;
        histogram
            .get_or_init(|| metrics::histogram!(m::PUBLISH_SECONDS, "broker" => self.engine.broker.name()))
            .record(m::seconds(started.elapsed()));
        Ok(())
    }

    pub(super) fn subscribe_options(&self, topic_id: &str) -> SubscribeOptions {
        let o = &self.engine.options;
        SubscribeOptions {
            topic: self.topic(topic_id),
            group: o.consumer_group.clone(),
            concurrency: o.concurrency_of(topic_id),
            max_deliveries: o.max_deliveries,
        }
    }

    pub(super) async fn dead_letter(&self, delivery: Delivery, reason: String) {
        self.engine.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::DEAD_LETTERED, "topic" => delivery.message.topic.clone()).increment(1);
        tracing::warn!(topic = %delivery.message.topic, %reason, "poison message dead-lettered");
        if let Err(e) = delivery.dead_letter(&reason).await {
            tracing::error!(error = %e, "could not dead-letter a message");
        }
    }

    /// Settles a delivery whose handling failed for a transient reason.
    pub(super) async fn retry_later(&self, delivery: Delivery, error: &Error) {
        tracing::warn!(topic = %delivery.message.topic, %error, "handling failed; message will be redelivered");
        if let Err(e) = delivery.nack(self.engine.options.redelivery_delay).await {
            tracing::error!(error = %e, "could not nack a message");
        }
    }

    pub(super) async fn ack(&self, delivery: Delivery) {
        let started = Instant::now();
        let acked = delivery.ack().await;
        let histogram = &self.engine.stats.ack_seconds;
        histogram
            .get_or_init(|| metrics::histogram!(m::ACK_SECONDS, "broker" => self.engine.broker.name()))
            .record(m::seconds(started.elapsed()));
        if let Err(e) = acked {
            tracing::warn!(error = %e, "ack failed; the message may be redelivered (handled idempotently)");
        }
    }

    /// Hands a message of the facade's rollback topic to the flow version it names.
    /// A version not registered here leaves its saga as the log has it: the
    /// message is settled, and the saga's recovery queues it again once the
    /// version is deployed.
    pub(super) async fn dispatch_rollback(self: Arc<Self>, delivery: Delivery, drain: Option<Arc<Drain>>) {
        let msg: RollbackMessage = match serde_json::from_slice(&delivery.message.payload) {
            Ok(msg) => msg,
            Err(e) => return self.dead_letter(delivery, format!("not a rollback message: {e}")).await,
        };
        if msg.facade != *self.facade {
            let reason = format!("rollback for facade `{}` on the topic of `{}`", msg.facade, self.facade);
            return self.dead_letter(delivery, reason).await;
        }
        match self.runtime_for(msg.version.as_deref()) {
            Some(runtime) => runtime.on_rollback(msg, delivery, drain).await,
            None => {
                tracing::warn!(request_id = %msg.request_id, version = ?msg.version, "rollback of a flow version not registered here; the saga waits for it");
                self.ack(delivery).await
            }
        }
    }

    /// Handles one rollback message: compensates the saga per its record.
    /// `drain`: the message came from the topic of a replica whose sagas were taken over here.
    async fn on_rollback(self: Arc<Self>, msg: RollbackMessage, delivery: Delivery, drain: Option<Arc<Drain>>) {
        let span = self.span(&msg.request_id);
        async {
            let id: Arc<str> = msg.request_id.as_str().into();
            // A second delivery of the compensation this process runs right now (a
            // broker's redelivery beside a recovery's re-publish) is that same work.
            let Ok(_claim) = self.engine.claims.claim(&id, Work::Compensation) else {
                tracing::debug!("rollback already running here; duplicate settled");
                return self.ack(delivery).await;
            };
            let record = match self.engine.durably(|| self.engine.log.get(&id)).await {
                Ok(Some(record)) => record,
                Ok(None) => return self.dead_letter(delivery, format!("no saga `{}`", msg.request_id)).await,
                Err(Error::ShuttingDown) => return drop(delivery), // redelivered later
                Err(e) => return self.retry_later(delivery, &e).await,
            };
            if self.foreign(&record) {
                if drain.is_some_and(|d| d.hand_back(&record)) {
                    return drop(delivery); // redelivered, to its replica
                }
                tracing::debug!("rollback of a saga another replica drives now; left to it");
                return self.ack(delivery).await;
            }
            if record.state.is_ended() {
                // A duplicate of work already done: wake any waiter, nothing more.
                self.engine.completions.complete(&record);
                return self.ack(delivery).await;
            }
            if !matches!(record.state, SagaState::Compensating { .. }) {
                let reason = format!("saga `{}` is {} and has nothing to compensate", msg.request_id, record.status());
                return self.dead_letter(delivery, reason).await;
            }
            match self.compensate(record).await {
                Ok(Some(ended)) => {
                    if ended.wrote_end {
                        self.finish(&ended.record).await;
                    } else {
                        self.engine.completions.complete(&ended.record);
                    }
                    self.ack(delivery).await;
                }
                Ok(None) | Err(Error::ShuttingDown) => drop(delivery), // redelivered later
                Err(Error::Log(LogError::NotOwner { owner, .. })) => {
                    tracing::warn!(%owner, "saga taken over by another replica mid-compensation; left to it");
                    self.ack(delivery).await;
                }
                Err(e @ Error::Data { .. }) => self.dead_letter(delivery, e.to_string()).await,
                Err(e) => self.retry_later(delivery, &e).await,
            }
        }
        .instrument(span)
        .await
    }

    /// Hands a hop from the topic of node `node` to the flow version it names
    /// (a version not registered here: as in [`Self::dispatch_rollback`]).
    pub(super) async fn dispatch_hop(self: Arc<Self>, node: Arc<str>, delivery: Delivery, drain: Option<Arc<Drain>>) {
        let hop: HopMessage = match serde_json::from_slice(&delivery.message.payload) {
            Ok(hop) => hop,
            Err(e) => return self.dead_letter(delivery, format!("not a hop message: {e}")).await,
        };
        if hop.facade != *self.facade {
            let reason = format!("hop for facade `{}` on a topic of `{}`", hop.facade, self.facade);
            return self.dead_letter(delivery, reason).await;
        }
        let Some(runtime) = self.runtime_for(hop.version.as_deref()) else {
            tracing::warn!(request_id = %hop.request_id, version = ?hop.version, "hop of a flow version not registered here; the saga waits for it");
            return self.ack(delivery).await;
        };
        if runtime.node_names.get(hop.step) != Some(&node) {
            let reason = format!(
                "hop for step {} of `{}` version {} on the topic of node `{node}`",
                hop.step, self.facade, runtime.version
            );
            return self.dead_letter(delivery, reason).await;
        }
        runtime.on_hop(hop, delivery, drain).await
    }

    /// Handles one hop: runs its step, records it, publishes what follows, then acks.
    /// `drain`: the hop came from the topic of a replica whose sagas were taken over here.
    async fn on_hop(self: Arc<Self>, hop: HopMessage, delivery: Delivery, drain: Option<Arc<Drain>>) {
        let (index, data) = (hop.step, hop.data);
        let span = self.span(&hop.request_id);
        let id: Arc<str> = hop.request_id.into();
        async {
            // Branches of one stage run side by side; other steps one at a time.
            let work = if self.version.shape.stage_of(index).is_parallel() {
                Work::Branch(index)
            } else {
                Work::Forward(index)
            };
            let claim = match self.engine.claims.claim(&id, work) {
                Ok(claim) => claim,
                Err(running) if running == work => {
                    tracing::debug!(step = index, "hop already running here; duplicate settled");
                    return self.ack(delivery).await;
                }
                Err(_) => {
                    let busy = Error::HopNotReady {
                        request_id: id.to_string(),
                        step: index,
                        why: "another step of the saga runs here".into(),
                    };
                    return self.retry_later(delivery, &busy).await;
                }
            };
            match self.run_hop(&id, index, data, claim, drain.as_deref()).await {
                Ok(true) => self.ack(delivery).await,
                Ok(false) | Err(Error::ShuttingDown) => drop(delivery), // redelivered later
                Err(Error::Log(LogError::NotOwner { owner, .. })) => {
                    tracing::warn!(%owner, "saga taken over by another replica mid-step; left to it");
                    self.ack(delivery).await;
                }
                Err(e @ (Error::Data { .. } | Error::Log(LogError::NotFound(_)))) => {
                    self.dead_letter(delivery, e.to_string()).await
                }
                Err(e) => self.retry_later(delivery, &e).await,
            }
        }
        .instrument(span)
        .await
    }

    /// Returns `Ok(true)` when the delivery can be acked, `Ok(false)` when
    /// interrupted by shutdown or to be delivered elsewhere.
    /// The claim is released before the next hop is published, so that hop
    /// is never mistaken for a duplicate of this one.
    pub(super) async fn run_hop(
        &self,
        id: &Arc<str>,
        index: usize,
        data: serde_json::Value,
        claim: Claim,
        drain: Option<&Drain>,
    ) -> Result<bool> {
        let record = self.engine.durably(|| self.engine.log.get(id)).await?;
        let record = record.ok_or_else(|| LogError::NotFound(id.to_string()))?;
        if self.foreign(&record) {
            // Its replica came back and queued it: the broker hands it over once the drain stops.
            if drain.is_some_and(|d| d.hand_back(&record)) {
                return Ok(false);
            }
            return Ok(true); // taken over: its new owner queued this hop again on its own topics
        }
        match record.on_hop(index) {
            OnHop::Run => {}
            OnHop::Resend(stage) => {
                // A redelivery after the step was recorded: the next hops may not
                // have reached the broker, so send them again (the next consumer
                // ignores one that did).
                self.resend(&record, stage).await?;
                return Ok(true);
            }
            // A branch recorded, its siblings not all: the last of them continues.
            OnHop::Done => return Ok(true),
            // Every branch recorded, the merge not (its writer stopped first).
            OnHop::Join(stage) => {
                drop(claim);
                Box::pin(self.join_hops(id, &record, stage)).await?;
                return Ok(true);
            }
            OnHop::Early(next) => {
                let why = format!("the saga is at step {next}");
                return Err(Error::HopNotReady { request_id: id.to_string(), step: index, why });
            }
            OnHop::Compensate => {
                self.publish_rollback(&record).await?;
                return Ok(true);
            }
            OnHop::Ended => {
                self.engine.completions.complete(&record);
                return Ok(true);
            }
        }
        let mut data = match self.decode(id, data) {
            Ok(data) => data,
            Err(error) => {
                self.halt(id, &error).await?;
                return Ok(true);
            }
        };
        let deadline = Instant::now() + Duration::from_millis(record.deadline_ms.saturating_sub(now_ms()));
        match self.record_start(id, index).await {
            Ok(()) => {}
            // Moved on meanwhile (aborted, or another delivery got further): nothing to run.
            Err(Error::Log(LogError::Transition(_))) => return Ok(true),
            Err(e) => return Err(e),
        }
        // A hop may be a redelivery whose first delivery called the action.
        match self.run_action(id, index, &mut data, deadline, true).await {
            Ok(attempts) => {
                let event = SagaEvent::StepCompleted { index, attempts, data: self.encode(id, &data)? };
                // A branch's siblings may be recorded meanwhile by other consumers: the
                // log serializes the appends, so exactly one sees them all done and merges.
                let record = match self.engine.durably(|| self.engine.log.append(id, event.clone())).await {
                    Ok(record) => record,
                    // A duplicate recorded it first, or a sibling's failure turned the saga back.
                    Err(Error::Log(LogError::Transition(_))) => return Ok(true),
                    Err(e) => return Err(e),
                };
                drop(claim);
                self.continue_hops(id, &record, index).await?;
                Ok(true)
            }
            Err(ActionError::Interrupted) => Ok(false),
            Err(ActionError::Failed { error, attempts, uncertain }) => {
                let record = match self.record_failure(id, index, error, attempts, uncertain, false).await {
                    Ok(record) => record,
                    Err(Error::Log(LogError::Transition(_))) => return Ok(true),
                    Err(e) => return Err(e),
                };
                drop(claim);
                if !record.state.is_ended() {
                    self.publish_rollback(&record).await?;
                }
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_from_senders_without_versions_still_read() {
        let hop: HopMessage = serde_json::from_str(r#"{"request_id":"r","facade":"F","step":1,"data":[]}"#).unwrap();
        assert_eq!((hop.step, hop.version), (1, None));
        let rollback: RollbackMessage = serde_json::from_str(r#"{"request_id":"r","facade":"F"}"#).unwrap();
        assert_eq!(rollback.version, None);
        let versioned = RollbackMessage { request_id: "r".into(), facade: "F".into(), version: Some("00ff".into()) };
        let read: RollbackMessage = serde_json::from_slice(&serde_json::to_vec(&versioned).unwrap()).unwrap();
        assert_eq!(read.version.as_deref(), Some("00ff"));
    }
}
