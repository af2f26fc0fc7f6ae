//! W3C trace context (`traceparent`, `tracestate`) carried in gRPC metadata,
//! so one trace follows a request from node to node.
//!
//! These functions use the TraceContext propagator directly rather than the
//! global one, so they behave the same whether or not [`crate::init`] ran;
//! without the OpenTelemetry layer installed, though, spans have no trace
//! context and [`inject`] writes nothing.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Writes the current span's trace context into `metadata` (the headers of
/// an outgoing gRPC request). Writes nothing when there is no current span.
pub fn inject(metadata: &mut MetadataMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
}

/// The trace context a caller sent in `metadata` (the headers of an incoming
/// gRPC request), to be set as the parent of the handler's span with
/// `OpenTelemetrySpanExt::set_parent`. An empty context when the caller sent
/// none or an invalid one.
pub fn extract(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// An info span for a gRPC handler, child of the trace context the caller
/// sent in `metadata`, or of the current span when the caller sent none.
///
/// A `tracing` span's name must be a literal, so the span is named `rpc` and
/// `name` goes into the `otel.name` field, which the OpenTelemetry layer uses
/// as the exported span's name; `otel.kind` is `server`. On stderr it reads
/// `rpc{otel.name="Probe" otel.kind="server"}`.
pub fn server_span(name: &'static str, metadata: &MetadataMap) -> tracing::Span {
    let span = tracing::info_span!("rpc", otel.name = name, otel.kind = "server");
    let parent = extract(metadata);
    if parent.span().span_context().is_valid() {
        // Fails only when the span is disabled or the layer is absent, and
        // then there is no trace to join.
        let _ = span.set_parent(parent);
    }
    span
}

/// Writes propagation fields as ASCII metadata entries.
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator only produces valid lowercase keys and ASCII values;
        // anything else is skipped rather than sent malformed.
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(key, value);
        }
    }
}

/// Reads propagation fields from ASCII metadata entries.
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn extracts_a_valid_traceparent() {
        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", TRACEPARENT.parse().unwrap());
        let context = extract(&metadata);
        let span_context = context.span().span_context().clone();
        assert!(span_context.is_valid());
        assert!(span_context.is_remote());
        assert_eq!(span_context.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span_context.span_id().to_string(), "00f067aa0ba902b7");
    }

    #[test]
    fn missing_or_malformed_traceparent_gives_an_empty_context() {
        assert!(!extract(&MetadataMap::new()).span().span_context().is_valid());
        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", "00-zz-yy-01".parse().unwrap());
        assert!(!extract(&metadata).span().span_context().is_valid());
    }

    #[test]
    fn inject_without_a_span_writes_nothing() {
        let mut metadata = MetadataMap::new();
        inject(&mut metadata);
        assert!(metadata.get("traceparent").is_none());
    }

    #[test]
    fn injector_writes_what_extractor_reads() {
        let mut metadata = MetadataMap::new();
        MetadataInjector(&mut metadata).set("traceparent", TRACEPARENT.to_owned());
        let extractor = MetadataExtractor(&metadata);
        assert_eq!(extractor.get("traceparent"), Some(TRACEPARENT));
        assert_eq!(extractor.keys(), vec!["traceparent"]);
    }
}
