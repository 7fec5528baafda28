//! Each peer's media budget: token buckets on packets and bytes, and a cap
//! on payload size, checked before a packet reaches speaker selection, bites
//! or forwarding. Sized well above real Opus (50 packets/s, at most about
//! 64 KB/s at 510 kbit/s, twice that wrapped in RED with one redundant
//! block, as browsers send it), so only a sender that is broken or hostile
//! meets them; what it sends beyond them is dropped and counted, and nobody else's
//! call pays for it.

use std::time::Instant;

/// Limits of one peer's incoming media.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// Sustained packets per second.
    pub packets_per_sec: f64,
    /// Packets that may arrive at once above the rate.
    pub packet_burst: f64,
    /// Sustained payload bytes per second.
    pub bytes_per_sec: f64,
    /// Payload bytes that may arrive at once above the rate.
    pub byte_burst: f64,
    /// Largest payload accepted.
    pub max_payload: usize,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            packets_per_sec: 100.0,
            packet_burst: 50.0,
            bytes_per_sec: 128_000.0,
            byte_burst: 64_000.0,
            max_payload: 1_500,
        }
    }
}

/// Why a packet was over budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overrun {
    /// More packets than the rate and burst allow.
    Packets,
    /// More bytes than the rate and burst allow.
    Bytes,
    /// A payload larger than `max_payload`.
    TooBig,
}

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, n: f64, rate: f64, burst: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// One peer's budget.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    config: BudgetConfig,
    packets: Bucket,
    bytes: Bucket,
}

impl Budget {
    /// A full budget at `now`.
    pub fn new(config: BudgetConfig, now: Instant) -> Self {
        Budget {
            config,
            packets: Bucket {
                tokens: config.packet_burst,
                at: now,
            },
            bytes: Bucket {
                tokens: config.byte_burst,
                at: now,
            },
        }
    }

    /// Charges one packet of `payload` bytes; `Err` means drop it (and
    /// nothing was charged for a packet dropped as too big).
    pub fn admit(&mut self, payload: usize, now: Instant) -> Result<(), Overrun> {
        let c = self.config;
        if payload > c.max_payload {
            return Err(Overrun::TooBig);
        }
        if !self
            .packets
            .take(1.0, c.packets_per_sec, c.packet_burst, now)
        {
            return Err(Overrun::Packets);
        }
        if !self
            .bytes
            .take(payload as f64, c.bytes_per_sec, c.byte_burst, now)
        {
            return Err(Overrun::Bytes);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn real_opus_always_passes() {
        let t0 = Instant::now();
        let mut b = Budget::new(BudgetConfig::default(), t0);
        // 50 packets/s of 1,275 bytes (Opus's largest 20 ms frame) for a minute.
        for i in 0..3_000u64 {
            let now = t0 + Duration::from_millis(20 * i);
            assert_eq!(b.admit(1_275, now), Ok(()), "packet {i}");
        }
    }

    #[test]
    fn a_flood_is_cut_to_the_rate_after_the_burst() {
        let t0 = Instant::now();
        let mut b = Budget::new(BudgetConfig::default(), t0);
        let mut passed = 0;
        // 10,000 packets/s of 40 bytes for one second.
        for i in 0..10_000u64 {
            if b.admit(40, t0 + Duration::from_micros(100 * i)).is_ok() {
                passed += 1;
            }
        }
        assert!((140..=160).contains(&passed), "burst 50 + 100/s: {passed}");
        // The bucket is empty: of two packets at once, the second is refused.
        let t1 = t0 + Duration::from_secs(1);
        let _ = b.admit(40, t1);
        assert_eq!(b.admit(40, t1), Err(Overrun::Packets));
    }

    #[test]
    fn bytes_and_size_are_capped() {
        let t0 = Instant::now();
        let mut b = Budget::new(BudgetConfig::default(), t0);
        assert_eq!(b.admit(4_000, t0), Err(Overrun::TooBig));
        let mut over = None;
        let mut passed = 0;
        for i in 0..400u64 {
            if let Err(e) = b.admit(1_500, t0 + Duration::from_millis(10 * i)) {
                over = Some(e);
                break;
            }
            passed += 1;
        }
        assert_eq!(over, Some(Overrun::Bytes), "150 KB/s is over 128 KB/s");
        // The 64 KB burst lasts 64 / (150 - 128) = about 2.9 s.
        assert!((280..=300).contains(&passed), "{passed} packets passed");
    }
}
