//! The group-of-pictures cache a POP keeps per video stream: the RTP
//! packets since the last H.264 keyframe, so that a viewer who starts (or
//! resumes) playing gets a decodable picture at once instead of waiting for
//! the next keyframe. Packets are copied into one reusable arena; nothing
//! is allocated per packet once the arena has grown.

use overlay_core::rtp::{Kind, Packet};

const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const STAP_A: u8 = 24;
const FU_A: u8 = 28;

/// Upper bound of one cached GOP; a longer one is dropped, not truncated.
const MAX_BYTES: usize = 4 << 20;

/// Whether an H.264 RTP payload (RFC 6184) starts a keyframe: an SPS (sent
/// in band before every IDR), an aggregate starting with one, or the first
/// fragment of an IDR slice.
pub fn starts_keyframe(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else { return false };
    match first & 0x1f {
        NAL_SPS | NAL_IDR => true,
        STAP_A => payload.get(3).is_some_and(|b| matches!(b & 0x1f, NAL_SPS | NAL_IDR)),
        FU_A => payload.get(1).is_some_and(|b| b & 0x80 != 0 && b & 0x1f == NAL_IDR),
        _ => false,
    }
}

/// How far (in RTP timestamp units) a packet may be from the newest one
/// and still be a copy of a recent packet: beyond, it is another source
/// (a re-root to another server numbers its packets anew).
const SAME_SOURCE_TS: u32 = 1_000_000;
/// Sequence numbers remembered behind the newest.
const WINDOW: u32 = 128;

/// The sequence numbers of one SSRC seen lately: a packet seen again is a
/// duplicate (the upstream's GOP burst after a join or a refresh overlaps
/// the live packets that already came).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqWindow {
    /// The newest sequence number and its timestamp.
    newest: Option<(u16, u32)>,
    /// Bit k: newest - k was seen.
    seen: u128,
}

impl SeqWindow {
    /// Records a packet; false if it is a copy of one seen lately.
    pub fn admit(&mut self, seq: u16, timestamp: u32) -> bool {
        let Some((newest, newest_ts)) = self.newest else {
            self.newest = Some((seq, timestamp));
            self.seen = 1;
            return true;
        };
        let far = timestamp.wrapping_sub(newest_ts).min(newest_ts.wrapping_sub(timestamp)) > SAME_SOURCE_TS;
        let ahead = seq.wrapping_sub(newest) as i16;
        if far {
            *self = SeqWindow { newest: Some((seq, timestamp)), seen: 1 };
            return true;
        }
        if ahead > 0 {
            let shift = ahead as u32;
            self.seen = if shift >= WINDOW { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.newest = Some((seq, timestamp));
            return true;
        }
        let back = u32::from(ahead.unsigned_abs());
        if back >= WINDOW {
            return true; // very late: let the player's jitter buffer judge
        }
        let bit = 1u128 << back;
        let fresh = self.seen & bit == 0;
        self.seen |= bit;
        fresh
    }
}

#[derive(Debug, Default)]
pub struct GopCache {
    arena: Vec<u8>,
    /// (offset in the arena, length, sequence number) per packet.
    packets: Vec<(usize, usize, u16)>,
    /// RTP timestamp of the keyframe the cache starts with.
    key_timestamp: Option<u32>,
    overflowed: bool,
    window: SeqWindow,
    /// Bit per sequence number cached (65,536 bits once used), so that a
    /// packet that comes twice is cached once.
    cached: Vec<u64>,
}

impl GopCache {
    /// Takes one packet of the video SSRC on its way through: false (and
    /// not cached) if it is a copy of one that came lately.
    pub fn admit(&mut self, packet: &Packet<'_>) -> bool {
        if packet.kind() != Kind::Rtp {
            return true;
        }
        // A copy still goes to the cache: after a burst's keyframe the
        // cache starts again from it and needs every packet that follows.
        let fresh = self.window.admit(packet.sequence(), packet.timestamp());
        self.cache(packet);
        fresh
    }

    fn forget_all(&mut self) {
        for &(_, _, seq) in &self.packets {
            let seq = usize::from(seq);
            self.cached[seq / 64] &= !(1 << (seq % 64));
        }
        self.arena.clear();
        self.packets.clear();
    }

    /// Records one forwarded packet of the video SSRC.
    pub fn push(&mut self, bytes: &[u8]) {
        if let Ok(packet) = Packet::parse(bytes) {
            if packet.kind() == Kind::Rtp {
                self.cache(&packet);
            }
        }
    }

    /// [`GopCache::push`] of a packet already parsed.
    fn cache(&mut self, packet: &Packet<'_>) {
        let bytes = packet.bytes();
        if self.cached.is_empty() {
            self.cached = vec![0; 65_536 / 64];
        }
        let payload = packet.payload().unwrap_or_default();
        if starts_keyframe(payload) && self.key_timestamp != Some(packet.timestamp()) {
            self.forget_all();
            self.key_timestamp = Some(packet.timestamp());
            self.overflowed = false;
        }
        if self.key_timestamp.is_none() || self.overflowed {
            return;
        }
        if self.arena.len() + bytes.len() > MAX_BYTES {
            self.overflowed = true;
            self.forget_all();
            return;
        }
        let seq = usize::from(packet.sequence());
        let bit = 1u64 << (seq % 64);
        if self.cached[seq / 64] & bit != 0 {
            return;
        }
        self.cached[seq / 64] |= bit;
        self.packets.push((self.arena.len(), bytes.len(), packet.sequence()));
        self.arena.extend_from_slice(bytes);
    }

    /// Packets from the last keyframe on, oldest first.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.packets.iter().map(|&(at, len, _)| &self.arena[at..at + len])
    }

    pub fn len(&self) -> usize {
        self.packets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }
}

const NAL_PPS: u8 = 8;

/// The H.264 SPS and PPS (NAL units, no start codes) found in RTP packets
/// of a stream, as single-NAL packets or inside STAP-A aggregates: what a
/// stream description needs (sprop-parameter-sets). The last of each wins.
pub fn parameter_sets<'a>(packets: impl IntoIterator<Item = &'a [u8]>) -> Option<(Vec<u8>, Vec<u8>)> {
    let (mut sps, mut pps) = (None, None);
    let mut take = |nal: &[u8]| match nal.first().map(|b| b & 0x1f) {
        Some(NAL_SPS) => sps = Some(nal.to_vec()),
        Some(NAL_PPS) => pps = Some(nal.to_vec()),
        _ => {}
    };
    for bytes in packets {
        let Some(payload) = Packet::parse(bytes).ok().and_then(|p| p.payload()) else { continue };
        match payload.first().map(|b| b & 0x1f) {
            Some(STAP_A) => {
                let mut rest = &payload[1..];
                while rest.len() >= 2 {
                    let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                    let Some(nal) = rest.get(2..2 + len) else { break };
                    take(nal);
                    rest = &rest[2 + len..];
                }
            }
            Some(_) => take(payload),
            None => {}
        }
    }
    Some((sps?, pps?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_core::rtp::write_header;

    fn pkt(seq: u16, ts: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 12];
        write_header(&mut b, 96, seq, ts, 5);
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn recognises_keyframe_starts() {
        assert!(starts_keyframe(&[0x67, 0x42]));
        assert!(starts_keyframe(&[0x65, 0x88]));
        assert!(starts_keyframe(&[0x78, 0x00, 0x10, 0x67, 0x42]));
        assert!(starts_keyframe(&[0x7c, 0x85]));
        assert!(!starts_keyframe(&[0x7c, 0x05]), "a middle fragment");
        assert!(!starts_keyframe(&[0x7c, 0x81]), "a P slice fragment");
        assert!(!starts_keyframe(&[0x41, 0x9a]));
        assert!(!starts_keyframe(&[]));
    }

    #[test]
    fn finds_the_parameter_sets_alone_or_aggregated() {
        let single = [pkt(1, 0, &[0x67, 0x42, 0xc0, 0x1f]), pkt(2, 0, &[0x68, 0xce]), pkt(3, 0, &[0x65, 1])];
        let (sps, pps) = parameter_sets(single.iter().map(Vec::as_slice)).unwrap();
        assert_eq!((sps, pps), (vec![0x67, 0x42, 0xc0, 0x1f], vec![0x68, 0xce]));
        let stap = pkt(4, 0, &[0x78, 0, 3, 0x67, 0x4d, 0x00, 0, 2, 0x68, 0xee, 0, 9]);
        let (sps, pps) = parameter_sets([stap.as_slice()]).unwrap();
        assert_eq!((sps, pps), (vec![0x67, 0x4d, 0x00], vec![0x68, 0xee]), "a truncated tail is ignored");
        assert!(parameter_sets([pkt(5, 0, &[0x41, 1]).as_slice()]).is_none());
        assert!(parameter_sets(single[..1].iter().map(Vec::as_slice)).is_none(), "no PPS");
    }

    #[test]
    fn keeps_packets_from_the_last_keyframe() {
        let mut c = GopCache::default();
        c.push(&pkt(1, 100, &[0x41, 1]));
        assert!(c.is_empty(), "nothing before the first keyframe");
        c.push(&pkt(2, 200, &[0x67, 1]));
        c.push(&pkt(3, 200, &[0x68, 1]));
        c.push(&pkt(4, 200, &[0x7c, 0x85, 1]));
        c.push(&pkt(5, 300, &[0x41, 1]));
        assert_eq!(c.len(), 4);
        c.push(&pkt(6, 400, &[0x78, 0, 4, 0x67, 1]));
        c.push(&pkt(7, 400, &[0x7c, 0x85, 1]));
        let seqs: Vec<u16> = c.packets().map(|p| u16::from_be_bytes([p[2], p[3]])).collect();
        assert_eq!(seqs, [6, 7], "an IDR in the same access unit as its SPS does not reset");
    }

    #[test]
    fn copies_of_recent_packets_are_found() {
        let mut w = SeqWindow::default();
        assert!(w.admit(65_530, 1000));
        for seq in [65_531u16, 65_532, 65_535, 0, 1] {
            assert!(w.admit(seq, 1000 + u32::from(seq.wrapping_sub(65_530)) * 3000), "{seq}");
        }
        assert!(!w.admit(65_532, 7000), "seen");
        assert!(w.admit(65_533, 10_000), "late but new");
        assert!(!w.admit(65_533, 10_000), "seen now");
        assert!(!w.admit(1, 22_000), "the newest, again");
        assert!(w.admit(1u16.wrapping_sub(200), 0), "older than the window: not judged");
        // Another server's numbering (same SSRC, a timestamp far away):
        // a new line, even where its numbers fall among the old ones.
        assert!(w.admit(65_532, 90_000_000));
        assert!(w.admit(65_533, 90_003_000));
        assert!(!w.admit(65_532, 90_000_000));
    }

    #[test]
    fn a_burst_overlapping_live_packets_is_forwarded_once_and_cached_whole() {
        // A join: live packets 10..=12 arrive, then the upstream's GOP
        // burst (keyframe at 8, packets 8..=12), then live 13.
        let mut c = GopCache::default();
        let key = |seq| pkt(seq, 800, &[0x67, 1]);
        let p = |seq: u16, ts| pkt(seq, ts, &[0x41, 1]);
        let forwarded: Vec<bool> =
            [p(10, 900), p(11, 900), p(12, 1000), key(8), p(9, 800), p(10, 900), p(11, 900), p(12, 1000), p(13, 1100)]
                .iter()
                .map(|b| c.admit(&Packet::parse(b).unwrap()))
                .collect();
        assert_eq!(forwarded, [true, true, true, true, true, false, false, false, true]);
        let seqs: Vec<u16> = c.packets().map(|p| u16::from_be_bytes([p[2], p[3]])).collect();
        assert_eq!(seqs, [8, 9, 10, 11, 12, 13], "the cache starts at the burst's keyframe, each packet once");
        // A refresh of the same GOP again adds nothing.
        assert!(!c.admit(&Packet::parse(&key(8)).unwrap()));
        assert_eq!(c.len(), 6);
    }
}
