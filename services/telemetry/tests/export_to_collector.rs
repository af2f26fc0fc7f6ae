//! Spans reach a collector: an in-process OTLP trace service on 127.0.0.1
//! port 0 receives them at shutdown, named and attributed to the service.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

/// A collector that keeps every request it receives.
#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.received.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test]
async fn spans_are_exported_at_shutdown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let collector = Collector::default();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    let telemetry = telemetry::init("onode-test-o1");
    {
        let span = tracing::info_span!("client_call");
        let _entered = span.enter();
        let mut metadata = MetadataMap::new();
        telemetry::inject(&mut metadata);
        telemetry::server_span("Probe", &metadata).in_scope(|| tracing::info!("handled"));
    }

    let started = Instant::now();
    telemetry.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(8));
    server.abort();

    let received = collector.received.lock().unwrap();
    let resource_spans: Vec<_> = received.iter().flat_map(|r| &r.resource_spans).collect();
    let service_names: Vec<_> = resource_spans
        .iter()
        .filter_map(|rs| rs.resource.as_ref())
        .flat_map(|resource| &resource.attributes)
        .filter(|kv| kv.key == "service.name")
        .filter_map(|kv| kv.value.as_ref()?.value.as_ref())
        .collect();
    assert_eq!(service_names, vec![&Value::StringValue("onode-test-o1".into())]);

    let spans: Vec<_> = resource_spans.iter().flat_map(|rs| &rs.scope_spans).flat_map(|ss| &ss.spans).collect();
    let mut names: Vec<_> = spans.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    // Even under RUST_LOG=trace, the exporter's own gRPC traffic (h2, hyper,
    // tonic spans) must not be exported.
    assert_eq!(names, ["Probe", "client_call"]);
    let client = spans.iter().find(|s| s.name == "client_call").expect("client span");
    let server = spans.iter().find(|s| s.name == "Probe").expect("server span named by otel.name");
    assert_eq!(server.trace_id, client.trace_id);
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(server.kind, 2, "SPAN_KIND_SERVER");
}
