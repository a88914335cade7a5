//! The gateway's errors, and the one place they become gRPC statuses.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A request field is invalid; `field` names it as the client wrote it.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// The request is valid but the served model cannot do it (e.g. no chat template).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The model's files or metadata are unusable.
    #[error("{0}")]
    Model(String),
    /// A worker is unreachable, failed or the pipeline broke.
    #[error("{0}")]
    Unavailable(String),
    /// The server is shutting down or the request was cancelled.
    #[error("{0}")]
    Cancelled(String),
    /// The request's deadline passed before it finished.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The service cannot take more work now (the waiting queue is full).
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Internal(String),
    /// Certificates that cannot be used (files given on the command line).
    #[error(transparent)]
    Tls(#[from] strata_shared::TlsError),
}

impl GatewayError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        GatewayError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Status {
        let code = match &e {
            GatewayError::InvalidArgument { .. } => Code::InvalidArgument,
            GatewayError::FailedPrecondition(_) => Code::FailedPrecondition,
            GatewayError::Model(_) | GatewayError::Internal(_) | GatewayError::Tls(_) => {
                Code::Internal
            }
            GatewayError::Unavailable(_) => Code::Unavailable,
            GatewayError::Cancelled(_) => Code::Cancelled,
            GatewayError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            GatewayError::ResourceExhausted(_) => Code::ResourceExhausted,
        };
        Status::new(code, e.to_string())
    }
}

impl From<strata_shared::ModelError> for GatewayError {
    fn from(e: strata_shared::ModelError) -> Self {
        GatewayError::Model(e.to_string())
    }
}
