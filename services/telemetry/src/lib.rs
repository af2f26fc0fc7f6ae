//! Tracing and OpenTelemetry set-up for every overlay process, and trace
//! context propagation across gRPC hops.
//!
//! A binary calls [`init`] once at start (inside its tokio runtime) and
//! [`Telemetry::shutdown`] once before it exits. Logs always go to stderr,
//! filtered by `RUST_LOG` (default `info`). When `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, spans are also exported
//! over OTLP/gRPC to that collector; a missing or silent collector costs at
//! most about a second per batch and never blocks the caller.
//!
//! Spans get OpenTelemetry trace and span ids even when nothing is exported,
//! so a process without a collector still carries a caller's trace on to the
//! next hop. gRPC clients call [`inject`] on each outgoing request's metadata;
//! gRPC handlers open their span with [`server_span`] (or [`extract`] plus
//! `OpenTelemetrySpanExt::set_parent`).

mod propagation;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{RetryPolicy, SpanExporter, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use propagation::{extract, inject, server_span};

/// Bound on one export attempt, connection set-up included, and on the whole
/// retry loop of one batch.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on the final flush and exporter shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(1500);
/// Bound on [`Telemetry::shutdown`] as seen by the caller.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(2);

/// Filter used when `RUST_LOG` is unset or empty.
const DEFAULT_FILTER: &str = "info";
/// Crates whose spans and events must never reach the OpenTelemetry layer:
/// the exporter's own gRPC traffic would otherwise produce spans that are
/// exported in the next batch, and so on forever.
const EXPORTER_INTERNALS: &[&str] = &[
    "h2=off",
    "hyper=off",
    "hyper_util=off",
    "tonic=off",
    "tower=off",
    "opentelemetry=off",
    "opentelemetry_sdk=off",
    "opentelemetry_otlp=off",
];

/// Why the OTLP exporter could not be set up; the process then logs the
/// reason and runs without exporting.
#[derive(Debug, thiserror::Error)]
enum ExporterError {
    #[error("OTLP endpoint {endpoint:?}: not inside a tokio runtime")]
    NoRuntime { endpoint: String },
    #[error("OTLP endpoint {endpoint:?}: https needs TLS support, which is not built in; use http://")]
    Https { endpoint: String },
    #[error("OTLP endpoint {endpoint:?}: {source}")]
    InvalidEndpoint { endpoint: String, source: tonic::transport::Error },
    #[error("OTLP endpoint {endpoint:?}: {source}")]
    Build { endpoint: String, source: opentelemetry_otlp::ExporterBuildError },
}

/// The tracing set-up of a process; hold it until exit and call
/// [`Telemetry::shutdown`] then, or buffered spans are lost.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    /// The collector spans are exported to, if any.
    endpoint: Option<String>,
}

/// Sets up tracing for this process.
///
/// Installs, globally: a fmt layer writing to stderr, filtered by `RUST_LOG`
/// (default `info`); an OpenTelemetry layer whose spans carry the resource
/// `service.name = service_name`; and the W3C TraceContext propagator. When
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set
/// (`http://host:port`; a bare `host:port` is taken as http), finished spans
/// are batched and exported there over OTLP/gRPC.
///
/// Call it inside a tokio runtime. It never blocks and never panics: an
/// unusable endpoint is reported on stderr and spans are then not exported;
/// a second call leaves the first subscriber in place.
pub fn init(service_name: &str) -> Telemetry {
    let endpoint = otlp_endpoint_from_env();
    let exporter = endpoint.as_deref().map(build_exporter);

    let resource = Resource::builder().with_service_name(service_name.to_owned()).build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let mut setup_error = None;
    let mut exported_to = None;
    match exporter {
        Some(Ok(exporter)) => {
            builder = builder.with_batch_exporter(exporter);
            exported_to = endpoint;
        }
        Some(Err(error)) => setup_error = Some(error),
        None => {}
    }
    let provider = builder.build();
    let tracer = provider.tracer(env!("CARGO_PKG_NAME"));

    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());

    let otel_filter = EXPORTER_INTERNALS.iter().fold(env_filter(), |filter, directive| {
        filter.add_directive(directive.parse().expect("static directive parses"))
    });
    let installed = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(env_filter()))
        .with(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(otel_filter))
        .try_init();

    if let Err(error) = installed {
        tracing::warn!(%error, "telemetry: a global subscriber was already set; keeping it");
    }
    match (&setup_error, &exported_to) {
        (Some(error), _) => tracing::warn!(%error, "telemetry: spans will not be exported"),
        (None, Some(endpoint)) => {
            tracing::info!(service = service_name, %endpoint, "telemetry: exporting spans")
        }
        (None, None) => tracing::debug!(
            service = service_name,
            "telemetry: OTEL_EXPORTER_OTLP_ENDPOINT unset, spans are not exported"
        ),
    }

    Telemetry { provider, endpoint: exported_to }
}

impl Telemetry {
    /// The collector spans are exported to, or `None` when they are not.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Exports the spans still buffered and shuts the exporter down.
    ///
    /// Returns within about two seconds even when the collector is missing or
    /// never answers; whatever is not exported by then is lost. Spans that end
    /// after this call are dropped.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let flush = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT));
        match tokio::time::timeout(SHUTDOWN_DEADLINE, flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => {
                tracing::warn!(%error, "telemetry: shutdown did not complete cleanly")
            }
            Ok(Err(error)) => tracing::warn!(%error, "telemetry: shutdown task failed"),
            Err(_) => tracing::warn!(
                deadline_ms = SHUTDOWN_DEADLINE.as_millis() as u64,
                "telemetry: shutdown timed out, buffered spans are lost"
            ),
        }
    }
}

/// `RUST_LOG`, or [`DEFAULT_FILTER`] when it is unset, empty or invalid.
fn env_filter() -> EnvFilter {
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => {
            EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
        }
        _ => EnvFilter::new(DEFAULT_FILTER),
    }
}

/// The collector endpoint from the environment, with `http://` added when no
/// scheme is given; `None` when neither variable is set to something.
fn otlp_endpoint_from_env() -> Option<String> {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .into_iter()
        .filter_map(|name| std::env::var(name).ok())
        .find_map(|value| endpoint_url(&value))
}

/// `value` as an endpoint URL: trimmed, `http://` added when it names no
/// scheme; `None` when it is blank.
fn endpoint_url(value: &str) -> Option<String> {
    let value = value.trim();
    if value.is_empty() {
        None
    } else if value.contains("://") {
        Some(value.to_owned())
    } else {
        Some(format!("http://{value}"))
    }
}

/// An OTLP/gRPC span exporter for `endpoint` whose every attempt, connection
/// set-up included, and whose retries together are bounded by
/// [`EXPORT_TIMEOUT`].
fn build_exporter(endpoint: &str) -> Result<SpanExporter, ExporterError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(ExporterError::NoRuntime { endpoint: endpoint.to_owned() });
    }
    if endpoint.starts_with("https://") {
        return Err(ExporterError::Https { endpoint: endpoint.to_owned() });
    }
    // The exporter's own channel has no connect timeout, so a collector
    // address that drops SYNs would hold each export for the TCP connect
    // timeout (minutes). Build the channel here with both bounds.
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(|source| ExporterError::InvalidEndpoint { endpoint: endpoint.to_owned(), source })?
        .connect_timeout(EXPORT_TIMEOUT)
        .timeout(EXPORT_TIMEOUT)
        .connect_lazy();
    SpanExporter::builder()
        .with_tonic()
        .with_channel(channel)
        .with_timeout(EXPORT_TIMEOUT)
        .with_retry_policy(RetryPolicy::recommended().with_max_retries(2).with_max_delay(Duration::from_millis(400)))
        .build()
        .map_err(|source| ExporterError::Build { endpoint: endpoint.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_without_scheme_is_http() {
        assert_eq!(endpoint_url(" 10.0.0.1:4317 ").as_deref(), Some("http://10.0.0.1:4317"));
        assert_eq!(endpoint_url("http://collector:4317").as_deref(), Some("http://collector:4317"));
        assert_eq!(endpoint_url("  "), None);
    }

    #[test]
    fn exporter_internals_are_valid_directives() {
        for directive in EXPORTER_INTERNALS {
            assert!(directive.parse::<tracing_subscriber::filter::Directive>().is_ok(), "{directive}");
        }
    }

    #[test]
    fn exporter_outside_a_runtime_is_an_error_not_a_panic() {
        let error = build_exporter("http://127.0.0.1:1").unwrap_err();
        assert!(matches!(error, ExporterError::NoRuntime { .. }), "{error}");
    }

    #[test]
    fn https_endpoint_is_refused() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = runtime.enter();
        let error = build_exporter("https://collector:4317").unwrap_err();
        assert!(matches!(error, ExporterError::Https { .. }), "{error}");
    }

    #[test]
    fn exporter_builds_inside_a_runtime() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = runtime.enter();
        assert!(build_exporter("http://127.0.0.1:4317").is_ok());
    }
}
