//! Strata's gRPC contracts, generated from `proto/`.
//!
//! - [`v1`]: the public API (`strata.v1.Strata`), served by the gateway.
//! - [`worker::v1`]: the control plane (`strata.worker.v1.Worker`), served by each worker.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod health;

/// The public API.
pub mod v1 {
    tonic::include_proto!("strata.v1");
}

/// The worker control plane.
pub mod worker {
    pub mod v1 {
        tonic::include_proto!("strata.worker.v1");
    }
}

/// Encoded `FileDescriptorSet` of `strata.v1`, for the gateway's server reflection.
pub const STRATA_V1_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("strata_v1_descriptor");

/// Encoded `FileDescriptorSet` of `strata.worker.v1`, for the workers' server reflection.
pub const WORKER_V1_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("strata_worker_v1_descriptor");

/// A gRPC server's TLS: its certificate and key (PEM) and, where given, the CA whose
/// certificates every client must present.
pub fn server_tls(
    cert_pem: impl AsRef<[u8]>,
    key_pem: impl AsRef<[u8]>,
    client_ca_pem: Option<impl AsRef<[u8]>>,
) -> tonic::transport::ServerTlsConfig {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let config = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    match client_ca_pem {
        Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
        None => config,
    }
}

/// The connections a gRPC server accepts on `listener`, each without Nagle's delay. A
/// stream's replies are small writes (one token's message each); one held back until the
/// client's delayed acknowledgement costs up to 40 ms, which is what a first token took before.
/// (tonic applies its `tcp_nodelay` only to listeners it binds itself.)
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    /// A connection accepted through `incoming` has Nagle's algorithm off.
    #[tokio::test]
    async fn accepted_connections_have_no_delay() -> Result<(), Box<dyn std::error::Error>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut accepted = super::incoming(listener);
        let client = tokio::net::TcpStream::connect(addr).await?;
        let server = accepted.next().await.ok_or("the listener stopped")??;
        assert!(
            server.nodelay()?,
            "TCP_NODELAY is off on an accepted connection"
        );
        drop(client);
        Ok(())
    }
}
