//! The publish path of a server: whatever bytes an encoder sends as an
//! RTSP request (an ANNOUNCE's SDP above all) or as an SRT stream id,
//! parsing and the server's decision never panic; an ANNOUNCE taken has
//! one video and one audio track at most; every refusal is one well-formed
//! RTSP response; the bitrate bound never overflows.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../onode/src/rtsp"]
mod rtsp {
    #[allow(dead_code)]
    pub mod machine;
}

#[path = "../../onode/src/publish/machine.rs"]
#[allow(dead_code)]
mod publish;

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = std::str::from_utf8(data) {
        if let Ok(name) = publish::srt_stream_id(id) {
            assert!(!name.is_empty() && name.len() <= 255);
        }
    }
    if let Ok(tracks) = publish::announced(data) {
        assert!(!tracks.is_empty() && tracks.len() <= 2);
        let _ = publish::track_for(&tracks, "streamid=0");
    }
    if data.len() >= 12 {
        let kbit = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let mut bound = publish::RateBound::new(kbit);
        let mut now = 0u64;
        for chunk in data[4..].chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            now = now.saturating_add(u64::from(b[0]) * 37);
            let _ = bound.take(u32::from_le_bytes([b[1], b[2], b[3], b[4]]) as usize, now);
        }
    }
    let Ok((rtsp_types::Message::Request(req), _)) = rtsp_types::Message::<Vec<u8>>::parse(data) else { return };
    match publish::parse(&req) {
        Ok(p) => {
            assert!(!p.cseq.is_empty() && p.cseq.len() <= 10);
            if let publish::Command::Announce { tracks, .. } = &p.command {
                assert!(!tracks.is_empty() && tracks.len() <= 2);
            }
        }
        Err(r) => {
            let bytes = rtsp::machine::encode(&rtsp::machine::refusal("1", &r));
            assert!(bytes.len() < 1024, "a refusal stays short: {} bytes", bytes.len());
            match rtsp_types::Message::<Vec<u8>>::parse(&bytes) {
                Ok((rtsp_types::Message::Response(_), n)) => assert_eq!(n, bytes.len(), "one response, nothing after it"),
                other => panic!("the refusal does not parse as a response: {other:?}"),
            }
        }
    }
});
