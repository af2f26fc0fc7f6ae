//! RTP/RTCP packets: `Packet::parse` and the sender report functions on
//! arbitrary bytes.
//!
//! A packet that parses is a view of exactly the input, its accessors read
//! the header fields where RFC 3550 puts them, and its header is exactly as
//! long as parse demands; a refusal names the input's real length. A sender
//! report that parses is a forwardable RTCP packet and is rebuilt to the
//! same bytes by `sender_report`; and a report built from fields taken from
//! the input parses back to those fields.

#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_core::rtp::{parse_sender_report, sender_report, write_header, Kind, Packet, RtpError};

/// Seconds between the NTP epoch (1900) and the Unix epoch (1970).
const NTP_UNIX_OFFSET: f64 = 2_208_988_800.0;

/// First Unix second NTP era 0 cannot hold (2036-02-07).
const ERA_END: f64 = 4_294_967_296.0 - NTP_UNIX_OFFSET;

/// How far (in 2^-32 s) an NTP timestamp may move through the f64 of a
/// `SenderReport`: an f64 near 2^31 s keeps 2^-21 s.
const NTP_SLACK: i64 = 1 << 12;

fuzz_target!(|data: &[u8]| {
    check_packet(data);
    check_parsed_report(data);
    check_built_report(data);
});

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn ntp(b: &[u8]) -> u64 {
    u64::from(be32(&b[8..12])) << 32 | u64::from(be32(&b[12..16]))
}

fn check_packet(data: &[u8]) {
    let rtcp_type = data.len() >= 2 && (200..=206).contains(&data[1]);
    let p = match Packet::parse(data) {
        Ok(p) => p,
        Err(e) => {
            match e {
                RtpError::TooShort(n) => {
                    assert_eq!(n, data.len());
                    assert!(n < 8 || (n < 12 && !rtcp_type), "{n} bytes are enough");
                }
                RtpError::BadVersion(v) => assert!(v != 2 && v == data[0] >> 6),
                RtpError::Truncated { needed, len } => assert!(len == data.len() && needed > len),
            }
            let _ = e.to_string();
            return;
        }
    };
    assert!(std::ptr::eq(p.bytes(), data), "the view is of the input itself");
    assert_eq!(data[0] >> 6, 2);
    assert_eq!(p.kind() == Kind::Rtcp, rtcp_type);
    match p.kind() {
        Kind::Rtcp => {
            assert_eq!(p.ssrc(), be32(&data[4..8]));
            assert_eq!(p.payload_type(), data[1]);
            assert_eq!((p.sequence(), p.timestamp(), p.marker()), (0, 0, false));
        }
        Kind::Rtp => {
            assert_eq!(p.ssrc(), be32(&data[8..12]));
            assert_eq!(p.sequence(), be16(&data[2..4]));
            assert_eq!(p.timestamp(), be32(&data[4..8]));
            assert_eq!(p.payload_type(), data[1] & 0x7f);
            assert_eq!(p.marker(), data[1] & 0x80 != 0);

            // The header parse demands: fixed part, CSRCs, extension.
            let mut needed = 12 + 4 * usize::from(data[0] & 0x0f);
            if data[0] & 0x10 != 0 {
                needed += 4 + 4 * usize::from(be16(&data[needed + 2..]));
            }
            assert!(data.len() >= needed);
            assert!(Packet::parse(&data[..needed]).is_ok(), "a {needed}-byte header is enough");
            assert!(Packet::parse(&data[..needed - 1]).is_err(), "a {needed}-byte header is needed");

            // write_header makes the same fixed header from the fields.
            let mut header = [0u8; 12];
            write_header(&mut header, p.payload_type(), p.sequence(), p.timestamp(), p.ssrc());
            header[1] |= u8::from(p.marker()) << 7;
            assert_eq!(header[1..], data[1..12]);
            let again = Packet::parse(&header).expect("write_header makes a packet");
            assert_eq!(
                (again.kind(), again.ssrc(), again.sequence(), again.timestamp(), again.payload_type(), again.marker()),
                (Kind::Rtp, p.ssrc(), p.sequence(), p.timestamp(), p.payload_type(), p.marker())
            );
        }
    }
}

fn check_parsed_report(data: &[u8]) {
    let Some(sr) = parse_sender_report(data) else { return };
    assert!(data.len() >= 28 && data[0] >> 6 == 2 && data[1] == 200);
    let p = Packet::parse(data).expect("a sender report is a packet");
    assert_eq!((p.kind(), p.ssrc()), (Kind::Rtcp, sr.ssrc), "forwarded by the sender's SSRC");
    assert_eq!(sr.rtp_timestamp, be32(&data[16..20]));
    assert!(sr.unix_secs.is_finite() && sr.unix_secs >= 0.0 && sr.unix_secs <= ERA_END, "{}", sr.unix_secs);
    for clock_rate in [1, 8_000, 48_000, 90_000] {
        assert_eq!(sr.capture_time(sr.rtp_timestamp, clock_rate), sr.unix_secs);
    }

    let built = sender_report(sr.ssrc, sr.unix_secs, sr.rtp_timestamp, be32(&data[20..24]), be32(&data[24..28]));
    assert_eq!(built[4..8], data[4..8], "ssrc");
    assert_eq!(built[16..28], data[16..28], "RTP timestamp, packet and octet counts");
    // NTP timestamps wrap (era 0 ends in 2036), so compare modulo 2^64.
    let moved = ntp(&built).wrapping_sub(ntp(data)) as i64;
    assert!(moved.abs() <= NTP_SLACK, "NTP time moved by {moved} / 2^32 s");
}

fn check_built_report(data: &[u8]) {
    let Some(fields) = data.get(..24) else { return };
    let ssrc = be32(&fields[0..4]);
    let unix_secs = f64::from_bits(u64::from_be_bytes(fields[4..12].try_into().expect("8 bytes")));
    let rtp_timestamp = be32(&fields[12..16]);
    let (packets, octets) = (be32(&fields[16..20]), be32(&fields[20..24]));

    let b = sender_report(ssrc, unix_secs, rtp_timestamp, packets, octets);
    assert_eq!((b[0], b[1], be16(&b[2..4])), (0x80, 200, 6), "an SR with no report blocks: 7 words");
    assert_eq!((be32(&b[20..24]), be32(&b[24..28])), (packets, octets));
    let p = Packet::parse(&b).expect("a built sender report is a packet");
    assert_eq!((p.kind(), p.ssrc()), (Kind::Rtcp, ssrc));

    if unix_secs >= ERA_END {
        return; // NTP seconds wrap from 2036 on: era 1 is not read back.
    }
    let back = parse_sender_report(&b).unwrap_or_else(|| panic!("report for {unix_secs} s does not parse"));
    assert_eq!((back.ssrc, back.rtp_timestamp), (ssrc, rtp_timestamp));
    // Times before 1970, and NaN, are sent as the Unix epoch.
    let want = if unix_secs > 0.0 { unix_secs } else { 0.0 };
    assert!((back.unix_secs - want).abs() < 1e-6, "{unix_secs} s read back as {}", back.unix_secs);
}
