//! A client's SETUP is one trace: the original topology on loopback, every
//! process exporting over OTLP to a collector this test runs in-process, and
//! one viewer at o5. The trace must hold the client's span, the POP's, one
//! for each relay on the join path and the server's, each the child of the
//! previous hop's; probe floods must not show up as spans.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{seed_topology, wait_output, Overlay};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// One exported span with the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

/// An OTLP/gRPC trace collector on 127.0.0.1, port chosen by the kernel,
/// keeping every span it receives.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                spans.push(Received { service: service.clone(), span });
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts the collector on its own runtime; returns it with its endpoint.
fn start_collector() -> (Collector, String, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let collector = Collector::default();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (collector, endpoint, runtime)
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `service.name` a node exports under.
fn service_of(o: &Overlay, node: &str) -> String {
    if o.addr[node] == o.bootstrapper() {
        format!("onode-bootstrapper-{node}")
    } else {
        format!("onode-{}-{node}", o.role(node))
    }
}

/// The nodes a stream flows through from its server down to `pop`, read
/// from each node's branch (`upstream`), listed from the POP up.
fn join_path(o: &Overlay, pop: &str, stream: &str) -> Vec<String> {
    let mut path = vec![pop.to_string()];
    loop {
        let last = path.last().unwrap().clone();
        let branch = o.branch(&last, stream).unwrap_or_else(|| panic!("{last} carries no {stream} branch"));
        match branch["upstream"].as_str() {
            Some(up) => {
                assert!(!path.iter().any(|n| n == up), "the tree loops: {path:?} then {up}");
                path.push(up.to_string());
            }
            None => return path,
        }
    }
}

#[test]
fn a_client_setup_is_one_trace_from_client_to_server() {
    let (collector, endpoint, _runtime) = start_collector();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")];
    let mut o = Overlay::start_with_env("traces", &seed_topology(), None, &env);

    let mut client = o.client("tracer", "test", Some("o5"), 3.0);
    client.envs(env);
    let child = client.spawn().unwrap();
    o.wait_for("o5 carries test", Duration::from_secs(10), |o| o.branch("o5", "test").is_some());
    // On loopback every link is as fast as the next, so which server and
    // which relays the join takes is measurement noise (o8 may go to s2
    // directly or through o9 to s1): the trace is checked against the path
    // the tree really took.
    let path = join_path(&o, "o5", "test");
    assert!(path.len() >= 4, "join path {path:?}: o5 has no server within two hops");
    assert_eq!(&path[..2], ["o5", "o4"], "join path {path:?}: o5's only neighbour is o4");
    assert!(["s1", "s2"].contains(&path.last().unwrap().as_str()), "join path {path:?} ends at no server");
    let out = wait_output(child, Duration::from_secs(30));
    assert!(out.status.success(), "client failed: {}", o.client_log("tracer"));

    // Batch exporters flush at shutdown: stop every node cleanly first.
    let services: BTreeMap<String, String> = o.addr.keys().map(|n| (n.clone(), service_of(&o, n))).collect();
    for node in services.keys() {
        let status = o.stop(node);
        assert!(status.success(), "{node} exited with {status}; log:\n{}", o.log(node));
    }
    let received = collector.spans.lock().unwrap().clone();
    let report = || {
        received
            .iter()
            .map(|r| {
                format!(
                    "{} {} trace {} span {} parent {}",
                    r.service,
                    r.span.name,
                    hex(&r.span.trace_id),
                    hex(&r.span.span_id),
                    hex(&r.span.parent_span_id)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    // The client's session span is the root of the trace.
    let session = received
        .iter()
        .find(|r| r.service == "oclient-tracer" && r.span.name == "session")
        .unwrap_or_else(|| panic!("no session span from oclient-tracer; received:\n{}", report()));
    assert!(session.span.parent_span_id.is_empty(), "the session span has a parent:\n{}", report());
    let trace: Vec<&Received> = received.iter().filter(|r| r.span.trace_id == session.span.trace_id).collect();

    // Every span of the trace but the root has its parent in the trace.
    let ids: BTreeSet<&[u8]> = trace.iter().map(|r| r.span.span_id.as_slice()).collect();
    for r in &trace {
        if r.span.span_id != session.span.span_id {
            assert!(
                ids.contains(r.span.parent_span_id.as_slice()),
                "{} {}: parent {} is not in the trace:\n{}",
                r.service,
                r.span.name,
                hex(&r.span.parent_span_id),
                report()
            );
        }
    }

    // Hop by hop: the POP's Setup is the child of the client's session, and
    // each node's Join the child of a span of the node below it.
    let by_id: BTreeMap<&[u8], &Received> = trace.iter().map(|r| (r.span.span_id.as_slice(), *r)).collect();
    let mut below = session;
    for (hop, node) in path.iter().enumerate() {
        let (service, name) = (&services[node], if hop == 0 { "Setup" } else { "Join" });
        let span = trace
            .iter()
            .find(|r| &r.service == service && r.span.name == name)
            .unwrap_or_else(|| panic!("no {name} span from {service} in the trace:\n{}", report()));
        assert_eq!(span.span.kind, 2, "{service} {name} is a server span");
        // The parent is the previous hop's handler span or a span under it
        // in the same process.
        let parent = by_id[span.span.parent_span_id.as_slice()];
        assert_eq!(parent.service, below.service, "{service} {name}: parent from the wrong process:\n{}", report());
        below = span;
    }
    eprintln!("trace {}:", hex(&session.span.trace_id));
    for r in &trace {
        eprintln!(
            "  {} {} span {} parent {}",
            r.service,
            r.span.name,
            hex(&r.span.span_id),
            hex(&r.span.parent_span_id)
        );
    }
    let in_trace: BTreeSet<&str> = trace.iter().map(|r| r.service.as_str()).collect();
    let expected: BTreeSet<&str> =
        path.iter().map(|n| services[n].as_str()).chain(std::iter::once("oclient-tracer")).collect();
    assert_eq!(in_trace, expected, "processes in the trace:\n{}", report());

    // Probe floods are counted, not traced: ten nodes probing every 250 ms
    // for seconds would export hundreds of spans; the rest of the run (the
    // client's PLAY and TEARDOWN, prunes) only a few.
    let probe_spans = received
        .iter()
        .filter(|r| r.span.name.eq_ignore_ascii_case("status") || r.span.name.to_lowercase().contains("probe"))
        .count();
    let elsewhere = received.len() - trace.len();
    assert!(probe_spans == 0 && elsewhere < 20, "probe floods were traced:\n{}", report());
}
