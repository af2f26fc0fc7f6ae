//! Translation between wire messages and core types, at the edge.

use overlay_core::routing::{LinkNotice, Probe};
use overlay_core::tree::{Nak, NakReason, StreamDesc};
use overlay_proto as pb;

pub fn probe_from_wire(p: pb::Probe) -> Probe {
    Probe {
        server: p.server,
        seq: p.seq,
        send_time_unix_us: p.send_time_unix_us,
        hops: p.hops,
        visited: p.visited,
        path_delay_us: p.path_delay_us,
        best_delay_us: p.best_delay_us,
        streams: p.streams,
        sender: p.sender,
        withdrawn: p.withdrawn,
    }
}

pub fn probe_to_wire(p: Probe) -> pb::Probe {
    pb::Probe {
        server: p.server,
        seq: p.seq,
        send_time_unix_us: p.send_time_unix_us,
        hops: p.hops,
        visited: p.visited,
        path_delay_us: p.path_delay_us,
        best_delay_us: p.best_delay_us,
        streams: p.streams,
        sender: p.sender,
        withdrawn: p.withdrawn,
    }
}

pub fn link_notice_from_wire(n: pb::LinkNotice, sender: String) -> LinkNotice {
    LinkNotice { a: n.a, b: n.b, id: n.id, up: n.up, sender }
}

pub fn link_notice_to_wire(n: LinkNotice) -> pb::LinkNotice {
    pb::LinkNotice { a: n.a, b: n.b, id: n.id, up: n.up }
}

pub fn desc_to_wire(d: &StreamDesc, data_port: u16) -> pb::StreamInfo {
    pb::StreamInfo {
        stream: d.stream.clone(),
        server: d.server.clone(),
        ssrcs: d.ssrcs.clone(),
        depth: d.depth,
        data_port: u32::from(data_port),
        route: d.route.clone(),
        delay_us: d.delay_us,
    }
}

pub fn desc_from_wire(i: &pb::StreamInfo) -> StreamDesc {
    StreamDesc {
        stream: i.stream.clone(),
        server: i.server.clone(),
        ssrcs: i.ssrcs.clone(),
        depth: i.depth,
        route: i.route.clone(),
        delay_us: i.delay_us,
    }
}

pub fn nak_to_wire(n: &Nak) -> pb::Nak {
    let reason = match n.reason {
        NakReason::UnknownStream => pb::NakReason::UnknownStream,
        NakReason::NoRoute => pb::NakReason::NoRoute,
        NakReason::Loop => pb::NakReason::Loop,
        NakReason::Timeout => pb::NakReason::Timeout,
    };
    pb::Nak { reason: reason as i32, detail: n.detail.clone() }
}

pub fn nak_from_wire(n: &pb::Nak) -> Nak {
    let reason = match pb::NakReason::try_from(n.reason) {
        Ok(pb::NakReason::UnknownStream) => NakReason::UnknownStream,
        Ok(pb::NakReason::Loop) => NakReason::Loop,
        Ok(pb::NakReason::Timeout) => NakReason::Timeout,
        _ => NakReason::NoRoute,
    };
    Nak { reason, detail: n.detail.clone() }
}

/// The gRPC status a client sees for a NAK.
pub fn nak_status(n: &Nak) -> tonic::Status {
    match n.reason {
        NakReason::UnknownStream => tonic::Status::not_found(n.detail.clone()),
        NakReason::NoRoute | NakReason::Loop => tonic::Status::unavailable(n.detail.clone()),
        NakReason::Timeout => tonic::Status::deadline_exceeded(n.detail.clone()),
    }
}
