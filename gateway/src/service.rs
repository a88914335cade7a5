//! The public API (`strata.v1.Strata`). Each streaming call validates its request once, hands
//! it to the scheduler with a bounded channel and returns that channel as the response stream;
//! when the client goes away the channel closes and the scheduler cancels the sequence.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_proto::v1::strata_server::Strata;
use strata_proto::v1::{
    ChatRequest, DetokenizeRequest, DetokenizeResponse, GenerateRequest, GenerateResponse,
    ModelInfoRequest, ModelInfoResponse, TokenizeRequest, TokenizeResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::GatewayError;
use crate::scheduler::{Scheduler, StreamOutput};
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
}

impl StrataService {
    pub fn new(
        tokenizer: Arc<ModelTokenizer>,
        limits: Limits,
        scheduler: Scheduler,
        info: InfoFn,
    ) -> Self {
        StrataService {
            tokenizer,
            limits,
            scheduler,
            info,
        }
    }

    async fn stream(
        &self,
        req: ValidRequest,
        deadline: Option<Instant>,
    ) -> Result<Response<ReceiverStream<Result<GenerateResponse, Status>>>, Status> {
        // Room for every token event and the final message: a full channel never blocks the scheduler.
        let (tx, rx) = mpsc::channel(req.max_new_tokens as usize + 2);
        let output = StreamOutput::new(&self.tokenizer, &req, tx);
        self.scheduler.submit(req, output, deadline).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
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
        let deadline = deadline_of(request.metadata());
        let req = validation::generate(request.into_inner(), &self.tokenizer, &self.limits)?;
        self.stream(req, deadline).await
    }

    async fn chat(
        &self,
        request: Request<ChatRequest>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let deadline = deadline_of(request.metadata());
        let req = validation::chat(request.into_inner(), &self.tokenizer, &self.limits)?;
        self.stream(req, deadline).await
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
