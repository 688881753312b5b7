//! When a write fails (a full disk, an I/O error): the file is closed, since redb refuses every
//! transaction after a failed write, writes are refused while it is, and it is opened again,
//! with backoff, the way a restart would: the write-ahead file replayed into it. Nothing
//! answered is lost, since every write answered is in the write-ahead file or the database
//! file; a queued append taken meanwhile is held and applied once the file is open again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sagaflow::log::LogError;

use super::{Request, Store, Writer};
use crate::error::Error;

/// The first wait before the file is opened again after a failed attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// At most this many queued appends are held while writes are refused; later ones are dropped,
/// as a crash would drop them.
const MAX_HELD: usize = 100_000;

/// Writes failing: since when, and when the file is next opened again.
pub(super) struct Outage {
    since: Instant,
    next_try: Instant,
    backoff: Duration,
    /// Queued appends taken meanwhile, in order.
    held: VecDeque<Request>,
    /// Queued appends dropped because too many were held.
    dropped: u64,
}

impl Writer {
    /// A write failed with `error`: refuse writes from now on, close the file, and try to open
    /// it again at once.
    pub(super) fn enter_outage(&mut self, error: Error) -> LogError {
        if self.outage.is_none() {
            tracing::error!(error = %error, "saga log write failed; refusing writes until its file is open again");
        }
        let why = error.into_outage();
        if self.outage.is_none() {
            let now = Instant::now();
            self.outage =
                Some(Outage { since: now, next_try: now, backoff: FIRST_BACKOFF, held: VecDeque::new(), dropped: 0 });
        }
        self.shared.set_outage(Some(why.clone()));
        self.close();
        why
    }

    /// Closes the file: redb refuses every transaction after a failed write, until its handles
    /// are gone and it is opened again.
    fn close(&mut self) {
        self.shared.set_db(None);
        // Its ops, back or not, are in the write-ahead file: the open replays them.
        self.in_flight = None;
        drop(self.store.take());
    }

    /// While writes fail: refuses or holds the requests that come, and opens the file again
    /// when it is time. `false` once every sender is gone.
    pub(super) fn wait_out_outage(&mut self) -> bool {
        let Some(next_try) = self.outage.as_ref().map(|outage| outage.next_try) else { return true };
        match self.rx.recv_timeout(next_try.saturating_duration_since(Instant::now())) {
            Ok(request) => {
                self.refuse_or_hold(request);
                while let Ok(request) = self.rx.try_recv() {
                    self.refuse_or_hold(request);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return false,
        }
        if Instant::now() >= next_try {
            self.reopen();
        }
        true
    }

    /// During an outage: a queued append is held (nobody waits for it, and the saga's next
    /// awaited write would be refused without it); every other request is refused.
    pub(super) fn refuse_or_hold(&mut self, request: Request) {
        let Some(outage) = self.outage.as_mut() else {
            // Not reached: only called during an outage.
            request.fail(&self.shared.refusal());
            return;
        };
        match request {
            Request::Append(_, _, ref reply) if reply.is_closed() => {
                if outage.held.len() < MAX_HELD {
                    outage.held.push_back(request);
                } else {
                    if outage.dropped == 0 {
                        tracing::warn!(held = MAX_HELD, "saga log holds too many queued appends; dropping more");
                    }
                    outage.dropped += 1;
                }
            }
            request => request.fail(&self.shared.refusal()),
        }
    }

    /// Opens the file again, replaying the write-ahead file into it, and takes the queued
    /// appends held meanwhile; on failure, schedules the next attempt. Whether it is open.
    pub(super) fn reopen(&mut self) -> bool {
        let Some(outage) = self.outage.as_mut() else { return true };
        let opened = super::super::replay::open(&self.options, self.wal.refused())
            .and_then(|opened| Ok((Store::open(Arc::new(opened.db))?, opened.wal, opened.next_seq)));
        let (store, wal, next_seq) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                let retry_in = outage.backoff;
                outage.next_try = Instant::now() + retry_in;
                outage.backoff = (outage.backoff * 2).min(MAX_BACKOFF);
                tracing::warn!(error = %e, retry_in_ms = retry_in.as_millis() as u64, "saga log could not open its file again");
                self.shared.set_outage(Some(e.into_outage()));
                return false;
            }
        };
        let outage = self.outage.take().map(|outage| (outage.since, outage.held, outage.dropped));
        // The file holds every write answered now: the overlay's records and the pending ops.
        self.overlay.clear();
        self.pending.clear();
        self.wal = wal;
        self.next_seq = self.next_seq.max(next_seq);
        self.last_checkpoint = Instant::now();
        self.shared.set_db(Some(store.db.clone()));
        self.store = Some(store);
        self.shared.set_outage(None);
        self.shared.counters.reopens.fetch_add(1, Ordering::Relaxed);
        let Some((since, held, dropped)) = outage else { return true };
        tracing::info!(
            down_ms = since.elapsed().as_millis() as u64,
            held = held.len(),
            dropped,
            "saga log writes again"
        );
        let mut held = held;
        while !held.is_empty() && self.outage.is_none() {
            let mut batch: Vec<Request> = held.drain(..held.len().min(self.max_batch)).collect();
            self.commit(&mut batch, false);
        }
        // Failed again while taking them: hold the rest again.
        held.into_iter().for_each(|request| self.refuse_or_hold(request));
        self.outage.is_none()
    }
}
