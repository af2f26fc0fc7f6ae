//! The RTSP request path of a POP: whatever bytes a player sends, parsing
//! and the POP's decision never panic, the header bound holds, and every
//! refusal is one well-formed RTSP response (nothing a player sent can add
//! headers or lines to it). The same bytes as a player's RTCP: reading
//! its receiver reports never panics and takes a bounded number of blocks.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../onode/src/rtsp/machine.rs"]
#[allow(dead_code)]
mod machine;

fuzz_target!(|data: &[u8]| {
    if let Some(blocks) = machine::report_blocks(data) {
        assert!(blocks.len() <= 62);
    }
    let _ = machine::too_many_headers(data);
    let Ok((rtsp_types::Message::Request(req), used)) = rtsp_types::Message::<Vec<u8>>::parse(data) else { return };
    assert!(used <= data.len());
    match machine::parse(&req, "10.0.6.20".parse().unwrap()) {
        Ok(p) => {
            assert!(!p.cseq.is_empty() && p.cseq.len() <= 10);
            if let machine::Command::Setup { delivery: machine::Delivery::Udp { rtp_port, .. }, .. } = p.command {
                assert!(rtp_port != 0);
            }
        }
        Err(r) => {
            let bytes = machine::encode(&machine::refusal("1", &r));
            assert!(bytes.len() < 1024, "a refusal stays short: {} bytes", bytes.len());
            match rtsp_types::Message::<Vec<u8>>::parse(&bytes) {
                Ok((rtsp_types::Message::Response(_), n)) => assert_eq!(n, bytes.len(), "one response, nothing after it"),
                other => panic!("the refusal does not parse as a response: {other:?}"),
            }
        }
    }
});
