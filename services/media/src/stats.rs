//! Receive statistics of RTP streams as RFC 3550 defines them: packets
//! lost from sequence number gaps (appendix A.1 and A.3) and interarrival
//! jitter (section 6.4.1 and appendix A.8), kept per SSRC. Pure: the
//! caller passes each packet with its arrival time.

use std::collections::HashMap;
use std::time::Instant;

use overlay_core::rtp::{Kind, Packet};

/// A jump ahead of this many sequence numbers or more is not a gap but
/// possibly a restarted sender (RFC 3550 A.1).
const MAX_DROPOUT: u16 = 3000;
/// A packet at most this far behind the highest sequence number is late
/// (reordered or duplicated); further behind is a possible restart.
const MAX_MISORDER: u16 = 100;
/// How many recent sequence numbers are remembered to spot duplicates.
const SEEN_WINDOW: u64 = 1024;
/// Extended sequence numbers start one cycle up so that late packets just
/// before the first one still have a place.
const FIRST_CYCLE: u64 = 1 << 16;

/// Receive statistics of every SSRC seen.
#[derive(Debug, Default)]
pub struct RtpStats {
    sources: HashMap<u32, SourceStats>,
}

/// Totals over all SSRCs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RtpSummary {
    /// RTP packets that arrived, duplicates included.
    pub packets_received: u64,
    /// Packets expected from the sequence numbers that never arrived.
    pub packets_lost: u64,
    /// Bytes of all RTP packets that arrived (headers included).
    pub bytes: u64,
    /// The largest interarrival jitter of any SSRC, in milliseconds.
    pub jitter_ms: f64,
    /// Packets that arrived more than once.
    pub duplicates: u64,
}

impl RtpStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Accounts one packet; RTCP packets are ignored.
    pub fn on_packet(&mut self, packet: &Packet<'_>, arrival: Instant) {
        if packet.kind() != Kind::Rtp {
            return;
        }
        self.sources
            .entry(packet.ssrc())
            .or_insert_with(|| SourceStats::new(packet.sequence(), arrival))
            .on_packet(packet, arrival);
    }

    pub fn summary(&self) -> RtpSummary {
        let mut total = RtpSummary::default();
        for source in self.sources.values() {
            total.packets_received += source.packets;
            total.packets_lost += source.lost();
            total.bytes += source.bytes;
            total.duplicates += source.duplicates;
            total.jitter_ms = total.jitter_ms.max(source.jitter_ms());
        }
        total
    }
}

/// One SSRC's counters.
#[derive(Debug)]
struct SourceStats {
    packets: u64,
    bytes: u64,
    duplicates: u64,
    /// Extended sequence number of the lowest packet of this run.
    base: u64,
    /// Highest extended sequence number seen.
    max: u64,
    /// Distinct packets of this run.
    received: u64,
    /// Expected and lost packets of earlier runs (before a restart).
    lost_before: u64,
    /// The sequence number that confirms a restart (RFC 3550 `bad_seq`).
    restart_at: Option<u16>,
    /// Bit `ext % SEEN_WINDOW` set when that extended sequence number
    /// arrived, for the `SEEN_WINDOW` numbers up to `max`.
    seen: [u64; (SEEN_WINDOW / 64) as usize],
    clock_rate: Option<u32>,
    epoch: Instant,
    /// Arrival (in RTP clock units since `epoch`) and RTP timestamp of the
    /// previous packet, for the jitter.
    previous: Option<(f64, u32)>,
    /// Interarrival jitter in RTP clock units.
    jitter: f64,
}

impl SourceStats {
    fn new(first_sequence: u16, arrival: Instant) -> Self {
        let ext = FIRST_CYCLE + u64::from(first_sequence);
        SourceStats {
            packets: 0,
            bytes: 0,
            duplicates: 0,
            base: ext,
            max: ext - 1,
            received: 0,
            lost_before: 0,
            restart_at: None,
            seen: [0; (SEEN_WINDOW / 64) as usize],
            clock_rate: None,
            epoch: arrival,
            previous: None,
            jitter: 0.0,
        }
    }

    fn on_packet(&mut self, packet: &Packet<'_>, arrival: Instant) {
        self.packets += 1;
        self.bytes += packet.bytes().len() as u64;
        let sequence = packet.sequence();
        let ahead = sequence.wrapping_sub(self.max as u16);
        let ext = if ahead < MAX_DROPOUT {
            self.max + u64::from(ahead)
        } else if ahead > u16::MAX - MAX_MISORDER {
            let behind = u64::from(ahead.wrapping_neg());
            self.max - behind
        } else if self.restart_at == Some(sequence) {
            self.restart(sequence);
            FIRST_CYCLE + u64::from(sequence)
        } else {
            // A wild jump: ignored unless the next packet follows it.
            self.restart_at = Some(sequence.wrapping_add(1));
            return;
        };
        self.restart_at = None;
        if self.was_seen(ext) {
            self.duplicates += 1;
            return;
        }
        self.mark_seen(ext);
        self.received += 1;
        self.base = self.base.min(ext);
        self.update_jitter(packet, arrival);
    }

    /// Packets lost: expected from the sequence number range, minus the
    /// distinct packets received, over all runs.
    fn lost(&self) -> u64 {
        let expected = (self.max + 1).saturating_sub(self.base);
        self.lost_before + expected.saturating_sub(self.received)
    }

    fn jitter_ms(&self) -> f64 {
        match self.clock_rate {
            Some(rate) => self.jitter / f64::from(rate) * 1000.0,
            None => 0.0,
        }
    }

    /// The sender restarted its sequence numbers: keep what was lost so
    /// far and count afresh from `sequence`.
    fn restart(&mut self, sequence: u16) {
        self.lost_before = self.lost();
        let ext = FIRST_CYCLE + u64::from(sequence);
        self.base = ext;
        self.max = ext - 1;
        self.received = 0;
        self.seen = [0; (SEEN_WINDOW / 64) as usize];
        self.previous = None;
    }

    fn was_seen(&self, ext: u64) -> bool {
        let slot = ext % SEEN_WINDOW;
        ext <= self.max && self.max - ext < SEEN_WINDOW && self.seen[(slot / 64) as usize] & (1 << (slot % 64)) != 0
    }

    /// Records `ext` as seen, forgetting the numbers that fall out of the
    /// window when the highest number advances.
    fn mark_seen(&mut self, ext: u64) {
        if ext > self.max {
            let advance = ext - self.max;
            if advance >= SEEN_WINDOW {
                self.seen = [0; (SEEN_WINDOW / 64) as usize];
            } else {
                for stale in self.max + 1..ext {
                    let slot = stale % SEEN_WINDOW;
                    self.seen[(slot / 64) as usize] &= !(1 << (slot % 64));
                }
            }
            self.max = ext;
        }
        let slot = ext % SEEN_WINDOW;
        self.seen[(slot / 64) as usize] |= 1 << (slot % 64);
    }

    /// RFC 3550 A.8: J += (|D| - J) / 16, where D is the difference of the
    /// transit times of this packet and the previous one.
    fn update_jitter(&mut self, packet: &Packet<'_>, arrival: Instant) {
        let Some(rate) = crate::clock_rate(packet.payload_type()) else {
            return;
        };
        if self.clock_rate != Some(rate) {
            self.clock_rate = Some(rate);
            self.previous = None;
            self.jitter = 0.0;
        }
        let arrived = arrival.saturating_duration_since(self.epoch).as_secs_f64() * f64::from(rate);
        let timestamp = packet.timestamp();
        if let Some((previous_arrival, previous_timestamp)) = self.previous {
            let media_step = f64::from(timestamp.wrapping_sub(previous_timestamp) as i32);
            let d = (arrived - previous_arrival) - media_step;
            self.jitter += (d.abs() - self.jitter) / 16.0;
        }
        self.previous = Some((arrived, timestamp));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use overlay_core::rtp::write_header;

    use super::*;

    /// Feeds packets `(ssrc, pt, sequence, timestamp, arrival ms)`.
    fn feed(stats: &mut RtpStats, t0: Instant, packets: &[(u32, u8, u16, u32, u64)]) {
        let mut buf = [0u8; 100];
        for &(ssrc, pt, seq, ts, ms) in packets {
            write_header(&mut buf, pt, seq, ts, ssrc);
            let packet = Packet::parse(&buf).unwrap();
            stats.on_packet(&packet, t0 + Duration::from_millis(ms));
        }
    }

    /// Video packets of one SSRC, one every 10 ms, 900 ticks apart.
    fn video(sequences: impl IntoIterator<Item = u16>) -> Vec<(u32, u8, u16, u32, u64)> {
        sequences.into_iter().enumerate().map(|(i, seq)| (7, 96, seq, 900 * u32::from(seq), 10 * i as u64)).collect()
    }

    #[test]
    fn gaps_count_as_loss() {
        let mut stats = RtpStats::new();
        let seqs = (100..110).chain(113..120).chain(130..131);
        feed(&mut stats, Instant::now(), &video(seqs));
        let s = stats.summary();
        assert_eq!(s.packets_received, 18);
        assert_eq!(s.packets_lost, 3 + 10);
        assert_eq!(s.bytes, 18 * 100);
        assert_eq!(s.duplicates, 0);
    }

    #[test]
    fn sequence_wrap_is_not_loss() {
        let mut stats = RtpStats::new();
        let seqs = (65530..=65535).chain(0..10);
        feed(&mut stats, Instant::now(), &video(seqs));
        assert_eq!(stats.summary().packets_lost, 0);

        let mut stats = RtpStats::new();
        let seqs = (65530..=65533).chain(1..10); // 65534, 65535 and 0 lost
        feed(&mut stats, Instant::now(), &video(seqs));
        let s = stats.summary();
        assert_eq!(s.packets_received, 13);
        assert_eq!(s.packets_lost, 3);
    }

    #[test]
    fn duplicates_are_not_loss_and_do_not_hide_it() {
        let mut stats = RtpStats::new();
        // 5 arrives twice, 7 never.
        feed(&mut stats, Instant::now(), &video([1, 2, 3, 4, 5, 5, 6, 8, 9]));
        let s = stats.summary();
        assert_eq!(s.packets_received, 9);
        assert_eq!(s.duplicates, 1);
        assert_eq!(s.packets_lost, 1);
    }

    #[test]
    fn reordering_is_not_loss() {
        let mut stats = RtpStats::new();
        feed(&mut stats, Instant::now(), &video([10, 12, 11, 14, 13, 9, 15]));
        let s = stats.summary();
        assert_eq!(s.packets_lost, 0);
        assert_eq!(s.duplicates, 0);
    }

    #[test]
    fn restarted_sender_keeps_earlier_loss() {
        let mut stats = RtpStats::new();
        let seqs = [1, 2, 4, 30000, 30001, 30002];
        feed(&mut stats, Instant::now(), &video(seqs));
        let s = stats.summary();
        // The first 30000 is held back until 30001 confirms the restart.
        assert_eq!(s.packets_lost, 1);
        assert_eq!(s.packets_received, 6);
    }

    #[test]
    fn jitter_is_zero_for_steady_pacing_and_grows_with_variation() {
        let t0 = Instant::now();
        let mut stats = RtpStats::new();
        // 48 kHz audio, 20 ms apart, exactly on time.
        let steady: Vec<_> = (0..50u16).map(|i| (9, 97, i, 960 * u32::from(i), 20 * u64::from(i))).collect();
        feed(&mut stats, t0, &steady);
        let s = stats.summary();
        assert!(s.jitter_ms >= 0.0 && s.jitter_ms < 0.01, "{}", s.jitter_ms);

        let mut stats = RtpStats::new();
        let bumpy: Vec<_> = (0..50u16)
            .map(|i| {
                let late = if i % 2 == 0 { 0 } else { 10 };
                (9, 97, i, 960 * u32::from(i), 20 * u64::from(i) + late)
            })
            .collect();
        feed(&mut stats, t0, &bumpy);
        let jitter = stats.summary().jitter_ms;
        assert!(jitter > 5.0 && jitter <= 10.0, "{jitter}");
    }

    #[test]
    fn jitter_survives_timestamp_wrap() {
        let t0 = Instant::now();
        let mut stats = RtpStats::new();
        let packets: Vec<_> = (0..20u16)
            .map(|i| (3, 96, i, (u32::MAX - 9000).wrapping_add(900 * u32::from(i)), 10 * u64::from(i)))
            .collect();
        feed(&mut stats, t0, &packets);
        assert!(stats.summary().jitter_ms < 0.01);
    }

    #[test]
    fn ssrcs_are_counted_apart_and_rtcp_ignored() {
        let t0 = Instant::now();
        let mut stats = RtpStats::new();
        feed(&mut stats, t0, &[(1, 96, 10, 0, 0), (2, 97, 500, 0, 0), (1, 96, 12, 0, 5), (2, 97, 501, 0, 5)]);
        let mut rtcp = [0u8; 28];
        rtcp[0] = 0x80;
        rtcp[1] = 200;
        stats.on_packet(&Packet::parse(&rtcp).unwrap(), t0);
        let s = stats.summary();
        assert_eq!(s.packets_received, 4);
        assert_eq!(s.packets_lost, 1);
    }
}
