//! A read-only view over an RTP or RTCP packet as received from the wire.
//!
//! The data plane validates a datagram once with [`Packet::parse`] and then
//! forwards the original bytes untouched; nothing here allocates or copies.
//! RTP and RTCP share a port (RFC 5761): payload types 64..=95 after masking
//! the marker bit are RTCP.

use thiserror::Error;

/// Why a datagram is not an RTP/RTCP packet we can forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RtpError {
    #[error("datagram of {0} bytes is shorter than an RTP header")]
    TooShort(usize),
    #[error("RTP version {0}, expected 2")]
    BadVersion(u8),
    #[error("header claims {needed} bytes but the datagram has {len}")]
    Truncated { needed: usize, len: usize },
}

/// Whether a packet carries media (RTP) or control (RTCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Rtp,
    Rtcp,
}

/// A validated view over one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    bytes: &'a [u8],
    kind: Kind,
    /// Where an RTP payload starts (after CSRCs and extension); 0 for RTCP.
    header_len: usize,
}

const FIXED_HEADER: usize = 12;

impl<'a> Packet<'a> {
    /// Validates the fixed header (and for RTP the CSRC list and extension
    /// lengths) and returns a view; the bytes are not copied.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, RtpError> {
        if bytes.len() < 8 {
            return Err(RtpError::TooShort(bytes.len()));
        }
        let version = bytes[0] >> 6;
        if version != 2 {
            return Err(RtpError::BadVersion(version));
        }
        let second = bytes[1];
        if (200..=206).contains(&second) {
            return Ok(Packet { bytes, kind: Kind::Rtcp, header_len: 0 });
        }
        if bytes.len() < FIXED_HEADER {
            return Err(RtpError::TooShort(bytes.len()));
        }
        let csrc_count = usize::from(bytes[0] & 0x0f);
        let mut needed = FIXED_HEADER + 4 * csrc_count;
        if bytes[0] & 0x10 != 0 {
            if bytes.len() < needed + 4 {
                return Err(RtpError::Truncated { needed: needed + 4, len: bytes.len() });
            }
            let words = u16::from_be_bytes([bytes[needed + 2], bytes[needed + 3]]);
            needed += 4 + 4 * usize::from(words);
        }
        if bytes.len() < needed {
            return Err(RtpError::Truncated { needed, len: bytes.len() });
        }
        Ok(Packet { bytes, kind: Kind::Rtp, header_len: needed })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The sender's SSRC: the stream identity the data plane forwards by.
    pub fn ssrc(&self) -> u32 {
        let at = match self.kind {
            Kind::Rtp => 8,
            Kind::Rtcp => 4,
        };
        be32(&self.bytes[at..at + 4])
    }

    /// RTP payload type (7 bits); for RTCP, the packet type byte.
    pub fn payload_type(&self) -> u8 {
        match self.kind {
            Kind::Rtp => self.bytes[1] & 0x7f,
            Kind::Rtcp => self.bytes[1],
        }
    }

    pub fn marker(&self) -> bool {
        self.kind == Kind::Rtp && self.bytes[1] & 0x80 != 0
    }

    /// RTP sequence number (0 for RTCP).
    pub fn sequence(&self) -> u16 {
        match self.kind {
            Kind::Rtp => u16::from_be_bytes([self.bytes[2], self.bytes[3]]),
            Kind::Rtcp => 0,
        }
    }

    /// RTP media timestamp (0 for RTCP).
    pub fn timestamp(&self) -> u32 {
        match self.kind {
            Kind::Rtp => be32(&self.bytes[4..8]),
            Kind::Rtcp => 0,
        }
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The RTP payload: after the header, its CSRCs and extension, without
    /// padding. None for RTCP, or when the padding is longer than the
    /// payload.
    pub fn payload(&self) -> Option<&'a [u8]> {
        if self.kind != Kind::Rtp {
            return None;
        }
        let mut end = self.bytes.len();
        if self.bytes[0] & 0x20 != 0 {
            end = end.checked_sub(usize::from(*self.bytes.last()?))?;
        }
        self.bytes.get(self.header_len..end)
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Writes a minimal RTP header (no CSRC, no extension) into `out`; used by
/// tests and benchmarks to make packets.
pub fn write_header(out: &mut [u8], payload_type: u8, sequence: u16, timestamp: u32, ssrc: u32) {
    out[0] = 0x80;
    out[1] = payload_type & 0x7f;
    out[2..4].copy_from_slice(&sequence.to_be_bytes());
    out[4..8].copy_from_slice(&timestamp.to_be_bytes());
    out[8..12].copy_from_slice(&ssrc.to_be_bytes());
}

/// Seconds between the NTP epoch (1900) and the Unix epoch (1970).
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// An RTCP sender report's timing: the wall-clock (NTP) time at which the
/// media sampled at `rtp_timestamp` was captured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SenderReport {
    pub ssrc: u32,
    /// Capture time, seconds since the Unix epoch.
    pub unix_secs: f64,
    pub rtp_timestamp: u32,
}

/// Builds a 28-byte RTCP sender report (RFC 3550 6.4.1, no report blocks).
pub fn sender_report(ssrc: u32, unix_secs: f64, rtp_timestamp: u32, packets: u32, octets: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0] = 0x80;
    b[1] = 200;
    b[2..4].copy_from_slice(&6u16.to_be_bytes());
    b[4..8].copy_from_slice(&ssrc.to_be_bytes());
    let secs = unix_secs.max(0.0);
    // NTP seconds are sent modulo 2^32 (one era), so the sum may wrap too:
    // a time beyond u64 seconds (or infinite) must not overflow.
    let whole = (secs.trunc() as u64).wrapping_add(NTP_UNIX_OFFSET);
    let frac = (secs.fract() * 4_294_967_296.0) as u64;
    b[8..12].copy_from_slice(&(whole as u32).to_be_bytes());
    b[12..16].copy_from_slice(&(frac as u32).to_be_bytes());
    b[16..20].copy_from_slice(&rtp_timestamp.to_be_bytes());
    b[20..24].copy_from_slice(&packets.to_be_bytes());
    b[24..28].copy_from_slice(&octets.to_be_bytes());
    b
}

/// Reads the timing of a sender report (the first packet of a compound).
pub fn parse_sender_report(bytes: &[u8]) -> Option<SenderReport> {
    if bytes.len() < 28 || bytes[0] >> 6 != 2 || bytes[1] != 200 {
        return None;
    }
    let whole = u64::from(be32(&bytes[8..12]));
    let frac = f64::from(be32(&bytes[12..16])) / 4_294_967_296.0;
    Some(SenderReport {
        ssrc: be32(&bytes[4..8]),
        unix_secs: whole.checked_sub(NTP_UNIX_OFFSET)? as f64 + frac,
        rtp_timestamp: be32(&bytes[16..20]),
    })
}

impl SenderReport {
    /// Capture time (Unix seconds) of media at `rtp_timestamp`, for a
    /// stream of `clock_rate` Hz; timestamps wrap.
    pub fn capture_time(&self, rtp_timestamp: u32, clock_rate: u32) -> f64 {
        let delta = rtp_timestamp.wrapping_sub(self.rtp_timestamp) as i32;
        self.unix_secs + f64::from(delta) / f64::from(clock_rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rtp_fields() {
        let mut buf = [0u8; 40];
        write_header(&mut buf, 96, 65535, 90_000, 0xdead_beef);
        buf[1] |= 0x80;
        let p = Packet::parse(&buf).unwrap();
        assert_eq!(p.kind(), Kind::Rtp);
        assert_eq!(p.ssrc(), 0xdead_beef);
        assert_eq!(p.sequence(), 65535);
        assert_eq!(p.timestamp(), 90_000);
        assert_eq!(p.payload_type(), 96);
        assert!(p.marker());
    }

    #[test]
    fn the_payload_skips_csrcs_extension_and_padding() {
        let payload = |b: &[u8]| Packet::parse(b).ok().and_then(|p| p.payload()).map(<[u8]>::to_vec);
        let mut p = vec![0x80, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 9, 7, 7];
        assert_eq!(payload(&p), Some(vec![7, 7]));
        // One CSRC, an extension of one word, two bytes of padding.
        p = vec![0xb1, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 9, 1, 2, 3, 4, 0xbe, 0xde, 0, 1, 5, 5, 5, 5, 9, 9, 0, 2];
        assert_eq!(payload(&p), Some(vec![9, 9]));
        assert_eq!(payload(&p[..14]), None);
        assert_eq!(payload(&[0xa0, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 9, 200]), None, "padding longer than the payload");
        assert_eq!(payload(&[0x80, 200, 0, 1, 0, 0, 0, 7]), None, "RTCP has no RTP payload");
    }

    #[test]
    fn parses_rtcp_sender_ssrc() {
        let mut buf = [0u8; 28];
        buf[0] = 0x80;
        buf[1] = 200;
        buf[4..8].copy_from_slice(&7u32.to_be_bytes());
        let p = Packet::parse(&buf).unwrap();
        assert_eq!(p.kind(), Kind::Rtcp);
        assert_eq!(p.ssrc(), 7);
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(Packet::parse(&[0x80, 96, 0]).unwrap_err(), RtpError::TooShort(3));
        assert_eq!(Packet::parse(&[0u8; 20]).unwrap_err(), RtpError::BadVersion(0));
        let mut buf = [0u8; 12];
        write_header(&mut buf, 96, 1, 1, 1);
        buf[0] |= 0x03; // three CSRCs that are not there
        assert_eq!(Packet::parse(&buf).unwrap_err(), RtpError::Truncated { needed: 24, len: 12 });
        buf[0] = 0x90; // extension header missing
        assert!(matches!(Packet::parse(&buf), Err(RtpError::Truncated { .. })));
    }

    #[test]
    fn sender_reports_round_trip_and_map_timestamps() {
        let sr = sender_report(42, 1_790_000_000.25, 4_000_000_000, 10, 1000);
        let p = Packet::parse(&sr).unwrap();
        assert_eq!((p.kind(), p.ssrc()), (Kind::Rtcp, 42));
        let back = parse_sender_report(&sr).unwrap();
        assert_eq!(back.ssrc, 42);
        assert!((back.unix_secs - 1_790_000_000.25).abs() < 1e-6);
        // 5 s later in a 90 kHz clock, and half a second earlier.
        let later = 4_000_000_000u32.wrapping_add(90_000 * 4 + 90_000);
        assert!((back.capture_time(later, 90_000) - 1_790_000_005.25).abs() < 1e-6);
        assert!((back.capture_time(4_000_000_000 - 45_000, 90_000) - 1_789_999_999.75).abs() < 1e-6);
        assert!(parse_sender_report(&sr[..20]).is_none());
    }
}
