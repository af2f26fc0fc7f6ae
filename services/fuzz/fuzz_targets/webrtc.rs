//! The WHEP offer path of a POP: whatever a browser (or anyone) POSTs as
//! an offer, checking and answering it never panics, a refusal is a 4xx
//! with a short reason, and an answer is ICE-lite with the POP's one
//! candidate. The same bytes as RTP on the POP's line: the payload view
//! stays inside the packet, and sequence numbers extend monotonically.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;

#[path = "../../onode/src/webrtc/machine.rs"]
#[allow(dead_code)]
mod machine;

fuzz_target!(|data: &[u8]| {
    if let Some(payload) = overlay_core::rtp::Packet::parse(data).ok().and_then(|p| p.payload()) {
        assert!(payload.len() <= data.len());
    }
    let mut track = machine::TrackOut::new(90_000);
    for pair in data.chunks_exact(2).take(64) {
        let seq = u16::from_be_bytes([pair[0], pair[1]]);
        if let Some(ext) = track.extend(seq) {
            assert_eq!(ext as u16, seq);
        }
    }
    let _ = machine::profile_level_id(data);
    let Ok(offer) = std::str::from_utf8(data) else { return };
    let format = machine::StreamFormat { profile_level_id: 0x42c01e, audio: data.len() % 2 == 0 };
    match machine::answer(offer, format, "10.0.6.2:8889".parse().unwrap(), Instant::now()) {
        Ok((_, sdp, _)) => {
            assert!(sdp.contains("a=ice-lite"), "{sdp}");
            assert!(sdp.contains("10.0.6.2 8889 typ host"), "{sdp}");
        }
        Err(r) => {
            assert!((400..500).contains(&r.status) || r.status == 500, "{r:?}");
            assert!(r.reason.len() < 300, "a refusal stays short: {} bytes", r.reason.len());
        }
    }
});
