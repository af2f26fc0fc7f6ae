//! Trace context survives a trip through gRPC metadata: what a client
//! injects, a server extracts, and the server's span joins the same trace.

use std::sync::OnceLock;

use opentelemetry::trace::TraceContextExt;
use tonic::metadata::MetadataMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `init` sets process-wide state, so every test here shares one set-up.
fn init_once() {
    static TELEMETRY: OnceLock<telemetry::Telemetry> = OnceLock::new();
    TELEMETRY.get_or_init(|| {
        std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT");
        std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        telemetry::init("test-propagation")
    });
}

#[tokio::test]
async fn inject_then_extract_keeps_the_trace_id() {
    init_once();
    let client = tracing::info_span!("client_call");
    let _entered = client.enter();
    let sent = client.context().span().span_context().clone();
    assert!(sent.is_valid(), "the OpenTelemetry layer gives spans ids");

    let mut metadata = MetadataMap::new();
    telemetry::inject(&mut metadata);
    assert!(metadata.get("traceparent").is_some());

    let received = telemetry::extract(&metadata);
    let received = received.span().span_context().clone();
    assert!(received.is_remote());
    assert_eq!(received.trace_id(), sent.trace_id());
    assert_eq!(received.span_id(), sent.span_id());
}

#[tokio::test]
async fn server_span_joins_the_callers_trace() {
    init_once();
    let mut metadata = MetadataMap::new();
    let caller = tracing::info_span!("client_call");
    let sent = caller.context().span().span_context().clone();
    caller.in_scope(|| telemetry::inject(&mut metadata));
    drop(caller);

    let server = telemetry::server_span("Probe", &metadata);
    let joined = server.context().span().span_context().clone();
    assert_eq!(joined.trace_id(), sent.trace_id());
    assert_ne!(joined.span_id(), sent.span_id());
}

#[tokio::test]
async fn server_span_without_caller_context_starts_a_trace() {
    init_once();
    let server = telemetry::server_span("Probe", &MetadataMap::new());
    assert!(server.context().span().span_context().is_valid());
}
