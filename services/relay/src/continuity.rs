//! What a player sees stays one RTP stream when the POP's upstream changes:
//! a re-root to another server brings other sequence numbers and other
//! timestamps (every server gives a stream the same SSRCs, but each counts
//! on its own), and RTSP players (ffmpeg, VLC) drop or stall on such jumps.
//! A [`Continuity`] per track maps what the POP forwards onto one outgoing
//! line: one SSRC, and sequence numbers and timestamps that go on from the
//! last packet sent. A new source is a new SSRC, or a jump in the sequence
//! numbers no loss or reordering explains. Pure: the data plane rewrites a
//! copy of each packet it sends to such players.

use std::collections::HashMap;

use overlay_core::rtp::{Kind, Packet};

/// How many sources a track remembers (a late packet of an earlier source
/// keeps its mapping instead of starting a new one).
const SOURCES: usize = 8;
/// A sequence number this far behind the newest of its source, or this far
/// ahead, starts a new source (another server's numbering).
const BEHIND: i32 = 3000;
const AHEAD: i32 = 3000;
const SENDER_REPORT: u8 = 200;
const BYE: u8 = 203;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Offsets {
    seq: u16,
    ts: u32,
    /// The newest sequence number that came in on this mapping, and its
    /// timestamp.
    newest_in: u16,
    newest_ts: u32,
}

/// One track's outgoing line; see the module doc.
#[derive(Debug, Clone)]
pub struct Continuity {
    /// Timestamp units between the last packet of a source and the first of
    /// the next (one frame at 30 fps: the clock rate / 30).
    gap: u32,
    ssrc: Option<u32>,
    sources: HashMap<u32, Offsets>,
    /// The newest sequence number and timestamp sent.
    last: Option<(u16, u32)>,
}

impl Continuity {
    /// A track whose media clock runs at `clock_rate` Hz.
    pub fn new(clock_rate: u32) -> Continuity {
        Continuity { gap: (clock_rate / 30).max(1), ssrc: None, sources: HashMap::new(), last: None }
    }

    /// The SSRC players of this track see, once a packet went out.
    pub fn ssrc(&self) -> Option<u32> {
        self.ssrc
    }

    /// Where a source's packets land on the outgoing line: made when its
    /// first packet (`seq`, `ts`) comes, and again when its numbers jump.
    fn offsets(&mut self, ssrc: u32, seq: u16, ts: u32) -> Offsets {
        let jump = self.gap.saturating_mul(30 * 10);
        if let Some(o) = self.sources.get_mut(&ssrc) {
            let ahead = i32::from(seq.wrapping_sub(o.newest_in) as i16);
            let drift = (ts.wrapping_sub(o.newest_ts) as i32).unsigned_abs();
            if (-BEHIND..=AHEAD).contains(&ahead) && drift <= jump {
                if ahead > 0 {
                    (o.newest_in, o.newest_ts) = (seq, ts);
                }
                return *o;
            }
        }
        let o = match self.last {
            None => Offsets { seq: 0, ts: 0, newest_in: seq, newest_ts: ts },
            Some((last_seq, last_ts)) => Offsets {
                seq: last_seq.wrapping_add(1).wrapping_sub(seq),
                ts: last_ts.wrapping_add(self.gap).wrapping_sub(ts),
                newest_in: seq,
                newest_ts: ts,
            },
        };
        if self.sources.len() >= SOURCES {
            self.sources.clear();
        }
        self.sources.insert(ssrc, o);
        o
    }

    /// Rewrites `packet` (a copy of what arrived) onto the outgoing line;
    /// false if it must not go out (not RTP/RTCP, or a sender report of a
    /// source whose media has not been seen yet).
    pub fn rewrite(&mut self, packet: &mut [u8]) -> bool {
        let Ok(p) = Packet::parse(packet) else { return false };
        let ssrc = p.ssrc();
        match p.kind() {
            Kind::Rtp => {
                let (seq, ts) = (p.sequence(), p.timestamp());
                let o = self.offsets(ssrc, seq, ts);
                let out = *self.ssrc.get_or_insert(ssrc);
                let (seq, ts) = (seq.wrapping_add(o.seq), ts.wrapping_add(o.ts));
                packet[2..4].copy_from_slice(&seq.to_be_bytes());
                packet[4..8].copy_from_slice(&ts.to_be_bytes());
                packet[8..12].copy_from_slice(&out.to_be_bytes());
                let newer = self.last.is_none_or(|(last, _)| (seq.wrapping_sub(last) as i16) > 0);
                if newer {
                    self.last = Some((seq, ts));
                }
                true
            }
            Kind::Rtcp => {
                let (Some(o), Some(out)) = (self.sources.get(&ssrc).copied(), self.ssrc) else { return false };
                if packet[1] == BYE && packet.len() >= 8 {
                    // The stream ended: players hear it on the line's SSRC.
                    packet[4..8].copy_from_slice(&out.to_be_bytes());
                    return true;
                }
                if packet[1] != SENDER_REPORT || packet.len() < 20 {
                    return false;
                }
                let ts = u32::from_be_bytes([packet[16], packet[17], packet[18], packet[19]]).wrapping_add(o.ts);
                packet[4..8].copy_from_slice(&out.to_be_bytes());
                packet[16..20].copy_from_slice(&ts.to_be_bytes());
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_core::rtp::{parse_sender_report, sender_report, write_header};

    fn rtp(ssrc: u32, seq: u16, ts: u32) -> Vec<u8> {
        let mut b = vec![0u8; 20];
        write_header(&mut b, 96, seq, ts, ssrc);
        b
    }

    fn line(p: &[u8]) -> (u32, u16, u32) {
        let p = Packet::parse(p).unwrap();
        (p.ssrc(), p.sequence(), p.timestamp())
    }

    #[test]
    fn a_bye_goes_out_on_the_lines_ssrc() {
        let mut c = Continuity::new(90_000);
        let mut bye = [0x81, 203, 0, 1, 0, 0, 0, 9];
        assert!(!c.rewrite(&mut bye), "nothing of source 9 went out yet");
        for (ssrc, seq) in [(7, 100), (9, 5000)] {
            assert!(c.rewrite(&mut rtp(ssrc, seq, 0)));
        }
        assert!(c.rewrite(&mut bye));
        assert_eq!(bye[4..8], 7u32.to_be_bytes(), "the line's SSRC");
    }

    #[test]
    fn a_new_source_goes_on_where_the_last_one_stopped() {
        let mut c = Continuity::new(90_000);
        let mut out = Vec::new();
        for (ssrc, seq, ts) in [(7, 100, 9000), (7, 101, 12000), (9, 40000, 5), (9, 40001, 3005), (7, 102, 15000)] {
            let mut p = rtp(ssrc, seq, ts);
            assert!(c.rewrite(&mut p));
            out.push(line(&p));
        }
        assert_eq!(
            out,
            [(7, 100, 9000), (7, 101, 12000), (7, 102, 15000), (7, 103, 18000), (7, 102, 15000)],
            "the second source continues the line; a late packet of the first keeps its place"
        );
        assert_eq!(c.ssrc(), Some(7));
    }

    #[test]
    fn another_servers_numbering_under_the_same_ssrc_is_a_new_source() {
        let mut c = Continuity::new(90_000);
        let mut out = Vec::new();
        // Loss (100 -> 105) and reordering (104) stay on the mapping; the
        // jump to 20000 is another server.
        for (seq, ts) in [(100, 9000), (105, 24000), (104, 21000), (20000, 7), (20001, 3007)] {
            let mut p = rtp(7, seq, ts);
            assert!(c.rewrite(&mut p));
            out.push(line(&p));
        }
        assert_eq!(out, [(7, 100, 9000), (7, 105, 24000), (7, 104, 21000), (7, 106, 27000), (7, 107, 30000)]);
        // Numbers close by chance, timestamps an hour away: another server too.
        let mut p = rtp(7, 20002, 3007 + 90_000 * 3600);
        c.rewrite(&mut p);
        assert_eq!(line(&p), (7, 108, 33000));
    }

    #[test]
    fn sequence_numbers_and_timestamps_wrap_without_a_jump() {
        let mut c = Continuity::new(48_000);
        let mut p = rtp(1, u16::MAX, u32::MAX - 10);
        c.rewrite(&mut p);
        let mut q = rtp(2, 5, 77);
        c.rewrite(&mut q);
        assert_eq!(line(&q), (1, 0, (u32::MAX - 10).wrapping_add(1600)));
    }

    #[test]
    fn sender_reports_follow_their_source_onto_the_line() {
        let mut c = Continuity::new(90_000);
        let mut early = sender_report(9, 1.0e9, 5, 1, 100).to_vec();
        assert!(!c.rewrite(&mut early), "no media of that source yet");
        c.rewrite(&mut rtp(7, 100, 9000));
        c.rewrite(&mut rtp(9, 40000, 5));
        let mut sr = sender_report(9, 1.0e9, 3005, 1, 100).to_vec();
        assert!(c.rewrite(&mut sr));
        let report = parse_sender_report(&sr).unwrap();
        assert_eq!((report.ssrc, report.rtp_timestamp), (7, 9000 + 3000 + 3000));
        assert!(!c.rewrite(&mut b"junk".to_vec()));
    }
}

/// A [`Continuity`] shared by the control plane (which keeps one per track
/// of a stream) and the routes of every source of that track.
#[derive(Debug, Clone)]
pub struct SharedContinuity(pub std::sync::Arc<std::sync::Mutex<Continuity>>);

impl SharedContinuity {
    pub fn new(clock_rate: u32) -> SharedContinuity {
        SharedContinuity(std::sync::Arc::new(std::sync::Mutex::new(Continuity::new(clock_rate))))
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Continuity> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PartialEq for SharedContinuity {
    /// The same line, not the same state.
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedContinuity {}
