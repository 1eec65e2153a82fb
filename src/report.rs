//! The usage-record queue each worker VM drains to the sidecar: bounded, retried on failure, never
//! blocking a request, flushed when the VM shuts down.
//!
//! Policy under a control-plane outage (issue 9 item 6): records wait in a per-VM queue bounded in
//! **bytes of serialized JSON** (`sidecar.usageBufferBytes`, default 64 MiB per worker). A record
//! without stored prompts is ~0.5 KB, so the default holds ~130,000 records per worker: at 1,000
//! requests/s per worker that is ~130 s of outage without loss (with `--concurrency 2`, 2,000 req/s
//! in total). Past the bound the **oldest** records are dropped and counted
//! (`llmgw_usage_records_dropped`). Records are kept serialized, so a batch is a concatenation and
//! the bound is exact. Batches are at most [`BATCH_SIZE`] records and [`BATCH_BYTES`] bytes; one is
//! in flight at a time and a refused or failed batch goes back to the front.
//!
//! Shutdown: the root context's `on_done` returns false while records are buffered, sends them, and
//! calls `proxy_done` once the queue is empty (or after [`SHUTDOWN_GRACE_MS`] if the sidecar cannot
//! take them).

#[allow(unused_imports)]
use crate::prelude::*;

use crate::usage::UsageRecord;
use alloc::collections::VecDeque;

/// Bytes of serialized records kept per VM while the sidecar is unreachable.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 64 * 1024 * 1024;
/// Records per batch.
pub const BATCH_SIZE: usize = 500;
/// Bytes per batch (a batch always takes at least one record).
pub const BATCH_BYTES: usize = 1024 * 1024;
/// How long a VM that is shutting down keeps trying to hand its records over.
pub const SHUTDOWN_GRACE_MS: u64 = 5_000;
/// Internal ingestion endpoint of the sidecar.
pub const USAGE_PATH: &str = "/internal/v1/usage";

#[derive(Debug)]
pub struct Reporter {
    queue: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    in_flight: Option<Vec<Vec<u8>>>,
    in_flight_bytes: usize,
    max_bytes: usize,
    /// Records lost because the buffer was full.
    pub dropped: u64,
    /// Records the sidecar accepted.
    pub sent: u64,
}

impl Default for Reporter {
    fn default() -> Self {
        Reporter::new(DEFAULT_MAX_BUFFERED_BYTES)
    }
}

impl Reporter {
    pub fn new(max_bytes: usize) -> Self {
        Reporter {
            queue: VecDeque::new(),
            queued_bytes: 0,
            in_flight: None,
            in_flight_bytes: 0,
            max_bytes: max_bytes.max(1),
            dropped: 0,
            sent: 0,
        }
    }

    /// Changes the bound (configuration); records past it are dropped and counted.
    pub fn set_max_bytes(&mut self, max_bytes: usize) -> u64 {
        self.max_bytes = max_bytes.max(1);
        self.enforce_bound()
    }

    /// Queues a record; returns how many records the bound dropped to make room.
    pub fn push(&mut self, r: &UsageRecord) -> u64 {
        match serde_json::to_vec(r) {
            Ok(bytes) => self.push_serialized(bytes),
            Err(_) => {
                self.dropped += 1;
                1
            }
        }
    }

    pub fn push_serialized(&mut self, record: Vec<u8>) -> u64 {
        self.queued_bytes += record.len();
        self.queue.push_back(record);
        self.enforce_bound()
    }

    /// The body of the next batch to send (`{"records":[...]}`), unless one is already in flight.
    pub fn take_batch(&mut self) -> Option<Vec<u8>> {
        if self.in_flight.is_some() || self.queue.is_empty() {
            return None;
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(r) = self.queue.front() {
            if !batch.is_empty() && (batch.len() >= BATCH_SIZE || bytes + r.len() > BATCH_BYTES) {
                break;
            }
            bytes += r.len();
            if let Some(r) = self.queue.pop_front() {
                batch.push(r);
            }
        }
        self.queued_bytes -= bytes;
        let mut body = Vec::with_capacity(bytes + batch.len() + 16);
        body.extend_from_slice(b"{\"records\":[");
        for (i, r) in batch.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(r);
        }
        body.extend_from_slice(b"]}");
        self.in_flight = Some(batch);
        self.in_flight_bytes = bytes;
        Some(body)
    }

    /// The sidecar stored the batch; returns how many records it held.
    pub fn ack(&mut self) -> u64 {
        let n = self.in_flight.take().map_or(0, |b| b.len() as u64);
        self.in_flight_bytes = 0;
        self.sent += n;
        n
    }

    /// Sending failed: the batch goes back to the front, oldest first. Returns records dropped.
    pub fn nack(&mut self) -> u64 {
        if let Some(b) = self.in_flight.take() {
            self.queued_bytes += self.in_flight_bytes;
            self.in_flight_bytes = 0;
            for r in b.into_iter().rev() {
                self.queue.push_front(r);
            }
            return self.enforce_bound();
        }
        0
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Records waiting or in flight.
    pub fn buffered(&self) -> usize {
        self.queue.len() + self.in_flight.as_ref().map_or(0, Vec::len)
    }

    pub fn buffered_bytes(&self) -> usize {
        self.queued_bytes + self.in_flight_bytes
    }

    /// Drops the oldest queued records past the bound. The batch in flight is not counted while it
    /// is in flight (it may still be accepted); if it comes back, the bound applies to it too.
    fn enforce_bound(&mut self) -> u64 {
        let mut n = 0;
        while self.queued_bytes > self.max_bytes {
            let Some(r) = self.queue.pop_front() else {
                break;
            };
            self.queued_bytes -= r.len();
            self.dropped += 1;
            n += 1;
        }
        n
    }
}

/// Whether a VM that was asked to shut down may finish now: nothing left to send, or the grace period
/// is over (what remains is counted as dropped by the caller).
pub fn may_finish(reporter: &Reporter, done_requested_at: u64, now_ms: u64) -> bool {
    reporter.buffered() == 0 || now_ms.saturating_sub(done_requested_at) >= SHUTDOWN_GRACE_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> UsageRecord {
        UsageRecord {
            id: i.to_string(),
            ..Default::default()
        }
    }

    fn ids(body: &[u8]) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn batches_ack_and_retry_in_order() {
        let mut r = Reporter::new(usize::MAX);
        for i in 0..700 {
            r.push(&rec(i));
        }
        let b = r.take_batch().unwrap();
        assert_eq!(ids(&b).len(), BATCH_SIZE);
        assert!(r.take_batch().is_none(), "one batch in flight at a time");
        r.nack();
        let b = r.take_batch().unwrap();
        assert_eq!(ids(&b)[0], "0");
        assert_eq!(r.ack(), 500);
        assert_eq!(r.sent, 500);
        let b = r.take_batch().unwrap();
        let got = ids(&b);
        assert_eq!((got.len(), got[0].as_str()), (200, "500"));
        r.ack();
        assert!(r.take_batch().is_none());
        assert_eq!(
            (r.sent, r.dropped, r.buffered(), r.buffered_bytes()),
            (700, 0, 0, 0)
        );
    }

    #[test]
    fn bounded_in_bytes_and_counts_drops() {
        let one = serde_json::to_vec(&rec(10)).unwrap().len();
        let mut r = Reporter::new(one * 10);
        let mut dropped = 0;
        for i in 10..25 {
            dropped += r.push(&rec(i));
        }
        assert_eq!((r.buffered(), r.dropped, dropped), (10, 5, 5));
        assert!(r.buffered_bytes() <= one * 10);
        let b = r.take_batch().unwrap();
        assert_eq!(ids(&b)[0], "15");
        assert_eq!(
            r.push(&rec(25)),
            0,
            "the batch in flight does not count yet"
        );
        assert_eq!(r.nack(), 1, "once back, the oldest goes");
        assert_eq!(r.buffered(), 10);
        assert_eq!(r.dropped, 6);
    }

    #[test]
    fn batches_are_bounded_in_bytes() {
        let mut r = Reporter::new(usize::MAX);
        let big = vec![b'x'; BATCH_BYTES / 3 + 1];
        for _ in 0..4 {
            r.push_serialized(big.clone());
        }
        let b = r.take_batch().unwrap();
        assert!(b.len() <= BATCH_BYTES + 16);
        r.ack();
        assert_eq!(r.sent, 2);
        // One record larger than a batch still goes, alone.
        let mut r = Reporter::new(usize::MAX);
        r.push_serialized(vec![b'1'; BATCH_BYTES * 2]);
        assert!(r.take_batch().is_some());
    }

    #[test]
    fn shutdown_waits_for_the_queue_within_a_grace() {
        let mut r = Reporter::new(usize::MAX);
        assert!(may_finish(&r, 0, 0));
        r.push(&rec(1));
        assert!(!may_finish(&r, 0, 10));
        assert!(may_finish(&r, 0, SHUTDOWN_GRACE_MS));
        r.take_batch();
        assert!(!may_finish(&r, 0, 10), "in flight counts");
        r.ack();
        assert!(may_finish(&r, 0, 10));
    }
}
