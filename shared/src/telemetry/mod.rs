//! Logs, traces and metrics, set up the same way in every Strata process.
//!
//! - **Logs** go to stderr: human-readable text (coloured only when stderr is a terminal) or one
//!   JSON object per line ([`LogFormat`]). A line written inside a request's span carries the
//!   span's fields, its request id and trace id among them.
//! - **Traces**: every `tracing` span is also an OpenTelemetry span, so it has a trace id and
//!   its context travels to other processes as a W3C `traceparent` ([`traceparent_of`],
//!   [`set_parent`]): in gRPC metadata on the control plane, and in every step frame on the data
//!   plane. Spans are exported over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. The export is configured by the standard
//!   variables (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`...). It runs on a
//!   runtime of its own behind the SDK's bounded batch queue, so a slow or absent collector
//!   never holds up a request: spans past the queue are dropped (and counted by the SDK).
//! - **Metrics**: a Prometheus registry per process, served by [`metrics::serve`].

pub mod metrics;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::str::FromStr;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Errors setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OpenTelemetry export: {0}")]
    Export(String),
    #[error("logging: {0}")]
    Logging(String),
    #[error("--metrics-listen {addr}: {source}")]
    MetricsListen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line, with the fields of the spans it was written in.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format `{s}` (expected text or json)")),
        }
    }
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Keeps the trace exporter alive; flushes it when dropped.
pub struct Telemetry {
    provider: SdkTracerProvider,
    /// The exporter's own runtime (only when exporting).
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if self.runtime.is_some() {
            let _ = self.provider.force_flush();
        }
        let _ = self.provider.shutdown();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Whether the environment asks for OTLP export.
fn export_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
}

/// Installs logging and tracing for this process. `service` names it in traces unless
/// `OTEL_SERVICE_NAME` does; `default_filter` applies when `RUST_LOG` is unset. Keep the
/// returned guard until the process ends.
pub fn init(
    service: &str,
    format: LogFormat,
    default_filter: &str,
) -> Result<Telemetry, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut resource = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "process.pid",
        i64::from(std::process::id()),
    ));
    if std::env::var_os("OTEL_SERVICE_NAME").is_none_or(|v| v.is_empty()) {
        resource = resource.with_service_name(service.to_string());
    }
    let builder = SdkTracerProvider::builder().with_resource(resource.build());
    // Without export, spans still get ids and contexts (log lines and other processes use
    // them); nothing is recorded.
    let (provider, runtime) = if export_configured() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()
            .map_err(|e| TelemetryError::Export(format!("runtime: {e}")))?;
        let exporter = {
            let _in = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Export(e.to_string()))?
        };
        (builder.with_batch_exporter(exporter).build(), Some(runtime))
    } else {
        (builder.build(), None)
    };
    let tracer = provider.tracer("strata");

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => registry
            .with(fmt.with_ansi(std::io::stderr().is_terminal()))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .flatten_event(true),
            )
            .try_init(),
    };
    installed.map_err(|e| TelemetryError::Logging(e.to_string()))?;
    Ok(Telemetry { provider, runtime })
}

/// The W3C `traceparent` of `span`, to send to another process; empty when it has no valid
/// context (tracing not installed, or the span disabled).
pub fn traceparent_of(span: &tracing::Span) -> String {
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

/// Makes `span` a child of the remote span in `traceparent` (ignored when empty or malformed).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    use opentelemetry::trace::TraceContextExt as _;
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the span `other` (e.g. a request's span to the batch step it was part of).
pub fn link(span: &tracing::Span, other: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt as _;
    let cx = other.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// The trace id of `span` as 32 hex digits; empty when it has none.
pub fn trace_id_of(span: &tracing::Span) -> String {
    use opentelemetry::trace::TraceContextExt as _;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_and_name_themselves() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        let err = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(err.contains("`yaml`"), "{err}");
        assert_eq!(LogFormat::Json.as_str(), "json");
    }

    #[test]
    fn a_span_without_tracing_installed_has_no_traceparent() {
        let span = tracing::info_span!("x");
        assert_eq!(traceparent_of(&span), "");
        assert_eq!(trace_id_of(&span), "");
        // A malformed parent is ignored, not an error.
        set_parent(&span, "not-a-traceparent");
    }
}
