//! The usage-record queue each worker VM drains to the sidecar on a timer: bounded, retried on
//! failure, never blocking a request. Records dropped past the bound are counted.

use crate::usage::UsageRecord;
use std::collections::VecDeque;

/// Records kept per VM while the sidecar is unreachable.
pub const DEFAULT_MAX_BUFFERED: usize = 10_000;
/// Records per batch.
pub const BATCH_SIZE: usize = 500;
/// Internal ingestion endpoint of the sidecar.
pub const USAGE_PATH: &str = "/internal/v1/usage";

#[derive(Debug)]
pub struct Reporter {
    queue: VecDeque<UsageRecord>,
    in_flight: Option<Vec<UsageRecord>>,
    max: usize,
    /// Records lost because the buffer was full.
    pub dropped: u64,
    /// Records the sidecar accepted.
    pub sent: u64,
}

impl Default for Reporter {
    fn default() -> Self {
        Reporter::new(DEFAULT_MAX_BUFFERED)
    }
}

impl Reporter {
    pub fn new(max: usize) -> Self {
        Reporter {
            queue: VecDeque::new(),
            in_flight: None,
            max: max.max(1),
            dropped: 0,
            sent: 0,
        }
    }

    pub fn push(&mut self, r: UsageRecord) {
        self.queue.push_back(r);
        self.enforce_bound();
    }

    /// The next batch to send, unless one is already in flight.
    pub fn take_batch(&mut self) -> Option<&[UsageRecord]> {
        if self.in_flight.is_some() || self.queue.is_empty() {
            return None;
        }
        let n = self.queue.len().min(BATCH_SIZE);
        self.in_flight = Some(self.queue.drain(..n).collect());
        self.in_flight.as_deref()
    }

    /// The sidecar stored the batch.
    pub fn ack(&mut self) {
        if let Some(b) = self.in_flight.take() {
            self.sent += b.len() as u64;
        }
    }

    /// Sending failed: the batch goes back to the front, oldest first.
    pub fn nack(&mut self) {
        if let Some(b) = self.in_flight.take() {
            for r in b.into_iter().rev() {
                self.queue.push_front(r);
            }
            self.enforce_bound();
        }
    }

    pub fn buffered(&self) -> usize {
        self.queue.len() + self.in_flight.as_ref().map_or(0, Vec::len)
    }

    fn enforce_bound(&mut self) {
        while self.buffered() > self.max && self.queue.pop_front().is_some() {
            self.dropped += 1;
        }
    }
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

    #[test]
    fn batches_ack_and_retry_in_order() {
        let mut r = Reporter::new(2000);
        for i in 0..700 {
            r.push(rec(i));
        }
        assert_eq!(r.take_batch().map(<[_]>::len), Some(BATCH_SIZE));
        assert!(r.take_batch().is_none(), "one batch in flight at a time");
        r.nack();
        let b = r.take_batch().unwrap();
        assert_eq!(b[0].id, "0");
        r.ack();
        assert_eq!(r.sent, 500);
        let b = r.take_batch().unwrap();
        assert_eq!((b.len(), b[0].id.as_str()), (200, "500"));
        r.ack();
        assert!(r.take_batch().is_none());
        assert_eq!((r.sent, r.dropped, r.buffered()), (700, 0, 0));
    }

    #[test]
    fn bounded_and_counts_drops() {
        let mut r = Reporter::new(10);
        for i in 0..15 {
            r.push(rec(i));
        }
        assert_eq!((r.buffered(), r.dropped), (10, 5));
        assert_eq!(r.take_batch().unwrap()[0].id, "5");
        r.push(rec(15));
        r.nack();
        assert_eq!(r.buffered(), 10);
        assert_eq!(r.dropped, 6);
    }
}
