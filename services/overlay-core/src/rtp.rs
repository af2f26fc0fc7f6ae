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
#[derive(Debug, Clone, Copy)]
pub struct Packet<'a> {
    bytes: &'a [u8],
    kind: Kind,
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
            return Ok(Packet { bytes, kind: Kind::Rtcp });
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
        Ok(Packet { bytes, kind: Kind::Rtp })
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
}
