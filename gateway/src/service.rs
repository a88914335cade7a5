//! The public API (`strata.v1.Strata`). Each streaming call validates its request once, hands
//! it to the scheduler with a bounded channel and returns that channel as the response stream;
//! when the client goes away the channel closes and the scheduler cancels the sequence.
//!
//! Each streaming call gets a request id (returned in the `x-request-id` response header) and
//! a `request` span, a child of the client's `traceparent` when it sends one; every log line
//! about the request carries both ids.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use strata_proto::v1::strata_server::Strata;
use strata_proto::v1::{
    ChatRequest, DetokenizeRequest, DetokenizeResponse, GenerateRequest, GenerateResponse,
    ModelInfoRequest, ModelInfoResponse, TokenizeRequest, TokenizeResponse,
};
use strata_shared::telemetry;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::error::GatewayError;
use crate::metrics::GatewayMetrics;
use crate::scheduler::{RequestObserver, Scheduler, StreamOutput};
use crate::tokenizer::ModelTokenizer;
use crate::validation::{self, Limits, ValidRequest};

/// Produces the current ModelInfo (the workers' state changes over time).
pub type InfoFn = Arc<dyn Fn() -> ModelInfoResponse + Send + Sync>;

/// The service state.
#[derive(Clone)]
pub struct StrataService {
    tokenizer: Arc<ModelTokenizer>,
    limits: Limits,
    scheduler: Scheduler,
    info: InfoFn,
    metrics: Arc<GatewayMetrics>,
    /// Set on SIGTERM: new requests are refused.
    draining: Arc<AtomicBool>,
}

impl StrataService {
    pub fn new(
        tokenizer: Arc<ModelTokenizer>,
        limits: Limits,
        scheduler: Scheduler,
        info: InfoFn,
        metrics: Arc<GatewayMetrics>,
        draining: Arc<AtomicBool>,
    ) -> Self {
        StrataService {
            tokenizer,
            limits,
            scheduler,
            info,
            metrics,
            draining,
        }
    }

    /// Validates a streaming call's request (`validate`) within the request's span and hands
    /// it to the scheduler.
    async fn stream<R>(
        &self,
        method: &'static str,
        request: Request<R>,
        validate: impl FnOnce(R, &ModelTokenizer, &Limits) -> Result<ValidRequest, GatewayError>,
    ) -> Result<Response<ReceiverStream<Result<GenerateResponse, Status>>>, Status> {
        if self.draining.load(Ordering::SeqCst) {
            self.metrics.failed(tonic::Code::Unavailable);
            return Err(Status::unavailable(
                "the gateway is shutting down: it finishes the requests it has and takes no new ones",
            ));
        }
        let caller = request.extensions().get::<Caller>().cloned();
        let permit = match &caller {
            Some(c) => c.admit().inspect_err(|s| self.metrics.failed(s.code()))?,
            None => None,
        };
        let deadline = deadline_of(request.metadata());
        let request_id = format!("{:016x}", rand::random::<u64>());
        let span = tracing::info_span!(
            "request",
            request_id = %request_id,
            method,
            api_key = caller.as_ref().map_or("", |c| c.name.as_str()),
            trace_id = tracing::field::Empty,
            prompt_tokens = tracing::field::Empty,
            completion_tokens = tracing::field::Empty,
            finish_reason = tracing::field::Empty,
            status = tracing::field::Empty,
        );
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        telemetry::set_parent(&span, traceparent);
        span.record("trace_id", telemetry::trace_id_of(&span).as_str());
        let validated = tracing::info_span!(parent: &span, "validate")
            .in_scope(|| validate(request.into_inner(), &self.tokenizer, &self.limits));
        let req = match validated {
            Ok(r) => r,
            Err(e) => {
                let status = Status::from(e);
                self.metrics.failed(status.code());
                span.record("status", format!("{:?}", status.code()).as_str());
                tracing::info!(parent: &span, status = ?status.code(), message = status.message(), "request refused");
                return Err(status);
            }
        };
        span.record("prompt_tokens", req.input_ids.len());
        tracing::info!(parent: &span, prompt_tokens = req.input_ids.len(), max_tokens = req.max_new_tokens, "request received");
        // Room for every token event and the final message: a full channel never blocks the scheduler.
        let (tx, rx) = mpsc::channel(req.max_new_tokens as usize + 2);
        let prompt_tokens = u32::try_from(req.input_ids.len()).unwrap_or(u32::MAX);
        let observer =
            RequestObserver::new(Arc::clone(&self.metrics), span, prompt_tokens).holding(permit);
        let output = StreamOutput::new(&self.tokenizer, &req, tx).observed(observer);
        self.scheduler.submit(req, output, deadline).await?;
        let mut response = Response::new(ReceiverStream::new(rx));
        if let Ok(v) = request_id.parse() {
            response.metadata_mut().insert("x-request-id", v);
        }
        Ok(response)
    }
}

#[tonic::async_trait]
impl Strata for StrataService {
    type GenerateStream = ReceiverStream<Result<GenerateResponse, Status>>;
    type ChatStream = ReceiverStream<Result<GenerateResponse, Status>>;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.stream("generate", request, validation::generate).await
    }

    async fn chat(
        &self,
        request: Request<ChatRequest>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        self.stream("chat", request, validation::chat).await
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let r = request.into_inner();
        let ids = self.tokenizer.encode(&r.text, r.add_special_tokens)?;
        let tokens = self.tokenizer.tokens(&ids);
        Ok(Response::new(TokenizeResponse { ids, tokens }))
    }

    async fn detokenize(
        &self,
        request: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        let r = request.into_inner();
        if let Some((i, id)) = r
            .ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= self.limits.vocab_size)
        {
            return Err(GatewayError::invalid(
                format!("ids[{i}]"),
                format!(
                    "{id} is outside the vocabulary of {} tokens",
                    self.limits.vocab_size
                ),
            )
            .into());
        }
        let text = self.tokenizer.decode(&r.ids, !r.include_special_tokens)?;
        Ok(Response::new(DetokenizeResponse { text }))
    }

    async fn model_info(
        &self,
        _request: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        Ok(Response::new((self.info)()))
    }
}

/// When the client stops waiting, from the call's `grpc-timeout` header (gRPC over HTTP/2:
/// up to 8 digits and a unit, `H`, `M`, `S`, `m`, `u` or `n`). A malformed header is ignored.
fn deadline_of(metadata: &tonic::metadata::MetadataMap) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    timeout_of(value).map(|t| Instant::now() + t)
}

fn timeout_of(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(timeout_of("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(timeout_of("2S"), Some(Duration::from_secs(2)));
        assert_eq!(timeout_of("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            timeout_of("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "5", "5x", "123456789S", "-5S", "1.5S"] {
            assert_eq!(timeout_of(bad), None, "{bad:?}");
        }
    }
}
