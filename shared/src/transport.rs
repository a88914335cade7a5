//! The data-plane transport: how frames move between the gateway and the stages. One trait so
//! that TCP, plain or under mutual TLS (here), and NCCL (later) fit behind it.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::tls::LinkSecurity;
use crate::wire::{DEFAULT_MAX_FRAME_BYTES, Frame, FrameCodec, WireError};

/// How often a sender with nothing to send sends a heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);

/// How long a receiver waits for any frame (a heartbeat at least) before it counts the link as
/// stalled, or half-open, and drops it with an error.
pub const LINK_DEADLINE: Duration = Duration::from_millis(1500);

/// Sends frames to one peer, in order.
pub trait FrameSender: Send + 'static {
    fn send(&mut self, frame: &Frame) -> impl Future<Output = Result<(), WireError>> + Send;
}

/// Receives frames from one peer, in order; `Ok(None)` when the peer closed cleanly.
pub trait FrameReceiver: Send + 'static {
    fn recv(&mut self) -> impl Future<Output = Result<Option<Frame>, WireError>> + Send;
}

/// Accepts inbound frame streams.
pub trait FrameListener: Send + 'static {
    type Receiver: FrameReceiver;
    fn accept(
        &mut self,
    ) -> impl Future<Output = Result<(Self::Receiver, String), WireError>> + Send;
    fn local_addr(&self) -> String;
}

/// A way of moving frames: connect to a peer, or listen for peers.
pub trait Transport: Clone + Send + Sync + 'static {
    type Sender: FrameSender;
    type Listener: FrameListener;
    fn connect(&self, addr: &str) -> impl Future<Output = Result<Self::Sender, WireError>> + Send;
    fn bind(&self, addr: &str) -> impl Future<Output = Result<Self::Listener, WireError>> + Send;
}

/// Frames over TCP: persistent connections, `TCP_NODELAY`, a frame-size limit; under mutual
/// TLS unless `security` is plaintext.
#[derive(Debug, Clone)]
pub struct TcpTransport {
    pub max_frame_bytes: usize,
    pub connect_timeout: Duration,
    pub security: LinkSecurity,
}

impl TcpTransport {
    /// Plaintext frames with the default limits (tests, and `--insecure`).
    pub fn plaintext() -> TcpTransport {
        TcpTransport::new(LinkSecurity::Plaintext)
    }

    pub fn new(security: LinkSecurity) -> TcpTransport {
        TcpTransport {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            connect_timeout: Duration::from_secs(10),
            security,
        }
    }
}

type BoxedRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxedWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// The sending half of a TCP frame connection.
pub struct TcpFrameSender {
    peer: String,
    writer: FramedWrite<BoxedWrite, FrameCodec>,
}

/// The receiving half of a TCP frame connection.
pub struct TcpFrameReceiver {
    peer: String,
    max_frame_bytes: usize,
    state: Inbound,
}

/// An inbound connection: under TLS, its handshake runs in the first `recv` (so that a slow
/// or hostile peer holds up only its own connection, within the hello deadline).
enum Inbound {
    Handshake(Box<tokio_rustls::Accept<TcpStream>>),
    Open(FramedRead<BoxedRead, FrameCodec>),
}

/// A TLS stream whose peer may close without a `close_notify` alert: senders here end a link by
/// dropping it, as on plain TCP. The end of the stream is then a plain end of file, so the codec
/// tells a close between frames (clean) from one inside a frame (an error), as it does on TCP.
struct EofAsClose<R>(R);

impl<R: AsyncRead + Unpin> AsyncRead for EofAsClose<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
            std::task::Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                std::task::Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// A TCP listener for frame connections.
pub struct TcpFrameListener {
    listener: TcpListener,
    max_frame_bytes: usize,
    security: LinkSecurity,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> WireError {
    let context = context.into();
    move |source| WireError::Io { context, source }
}

/// Gives an I/O error from the codec the context of the connection it happened on.
fn in_context(e: WireError, context: impl FnOnce() -> String) -> WireError {
    match e {
        WireError::Io { source, .. } => WireError::Io {
            context: context(),
            source,
        },
        other => other,
    }
}

impl Transport for TcpTransport {
    type Sender = TcpFrameSender;
    type Listener = TcpFrameListener;

    async fn connect(&self, addr: &str) -> Result<TcpFrameSender, WireError> {
        let context = || format!("connecting to data-plane peer {addr}");
        let open = async {
            let stream = TcpStream::connect(addr).await.map_err(io_err(context()))?;
            stream
                .set_nodelay(true)
                .map_err(io_err(format!("setting TCP_NODELAY on {addr}")))?;
            let write: BoxedWrite = match &self.security {
                LinkSecurity::Plaintext => {
                    // The sender never reads. Dropping the read half leaves the socket open.
                    Box::new(stream.into_split().1)
                }
                LinkSecurity::Mtls(tls) => {
                    let name = tls.server_name_for(addr);
                    let server = ServerName::try_from(name.clone()).map_err(|e| WireError::Io {
                        context: context(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!("`{name}` is not a TLS server name: {e}"),
                        ),
                    })?;
                    let tls = tls
                        .connector()
                        .connect(server, stream)
                        .await
                        .map_err(io_err(format!("TLS handshake with data-plane peer {addr}")))?;
                    Box::new(tls)
                }
            };
            Ok::<_, WireError>(write)
        };
        let write = tokio::time::timeout(self.connect_timeout, open)
            .await
            .map_err(|_| WireError::Io {
                context: context(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            })??;
        Ok(TcpFrameSender {
            peer: addr.to_string(),
            writer: FramedWrite::new(write, FrameCodec::new(self.max_frame_bytes)),
        })
    }

    async fn bind(&self, addr: &str) -> Result<TcpFrameListener, WireError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(io_err(format!("binding data-plane listener on {addr}")))?;
        Ok(TcpFrameListener {
            listener,
            max_frame_bytes: self.max_frame_bytes,
            security: self.security.clone(),
        })
    }
}

impl FrameSender for TcpFrameSender {
    async fn send(&mut self, frame: &Frame) -> Result<(), WireError> {
        // The codec refuses what the peer would refuse, before a byte is written; the
        // connection stays usable.
        let peer = &self.peer;
        self.writer
            .send(frame)
            .await
            .map_err(|e| in_context(e, || format!("sending a frame to {peer}")))
    }
}

impl FrameReceiver for TcpFrameReceiver {
    async fn recv(&mut self) -> Result<Option<Frame>, WireError> {
        // A clean close comes between frames; one inside a frame (even inside its prelude)
        // is an error.
        let peer = &self.peer;
        if let Inbound::Handshake(accept) = &mut self.state {
            // Cancel-safe: a handshake cut short resumes in the next call.
            let tls = accept
                .as_mut()
                .await
                .map_err(io_err(format!("TLS handshake with {peer}")))?;
            let read: BoxedRead = Box::new(EofAsClose(tls));
            self.state =
                Inbound::Open(FramedRead::new(read, FrameCodec::new(self.max_frame_bytes)));
        }
        let Inbound::Open(reader) = &mut self.state else {
            return Ok(None);
        };
        reader
            .next()
            .await
            .transpose()
            .map_err(|e| in_context(e, || format!("reading a frame from {peer}")))
    }
}

impl FrameListener for TcpFrameListener {
    type Receiver = TcpFrameReceiver;

    async fn accept(&mut self) -> Result<(TcpFrameReceiver, String), WireError> {
        let (stream, peer) = self
            .listener
            .accept()
            .await
            .map_err(io_err("accepting a data-plane connection"))?;
        stream
            .set_nodelay(true)
            .map_err(io_err("setting TCP_NODELAY"))?;
        let state = match &self.security {
            LinkSecurity::Plaintext => {
                let (read, write) = stream.into_split();
                // Receivers never write.
                drop(write);
                let read: BoxedRead = Box::new(read);
                Inbound::Open(FramedRead::new(read, FrameCodec::new(self.max_frame_bytes)))
            }
            LinkSecurity::Mtls(tls) => Inbound::Handshake(Box::new(tls.acceptor().accept(stream))),
        };
        let peer = peer.to_string();
        Ok((
            TcpFrameReceiver {
                peer: peer.clone(),
                max_frame_bytes: self.max_frame_bytes,
                state,
            },
            peer,
        ))
    }

    fn local_addr(&self) -> String {
        self.listener
            .local_addr()
            .map(|a: SocketAddr| a.to_string())
            .unwrap_or_default()
    }
}

/// Accepts peers on `listener` forever; every frame any of them sends (and the error that ends a
/// connection, if any) goes to `sink`, wrapped by `wrap`. Ends when `sink` closes.
///
/// A connection must open with a hello frame carrying the current `session` token (see
/// [`hello`]); one that opens with anything else, or while no session is set, is dropped and
/// logged, and none of its frames reach `sink`: only the peers the gateway linked get in. A new
/// session (the gateway rebuilt the ring) ends every connection opened under the old one: no
/// frame of a step from before the rebuild gets in after it.
///
/// Heartbeats keep a connection alive and go no further. A connection that sends nothing for
/// [`LINK_DEADLINE`] (a stalled or half-open link) ends with an error to `sink`, as does one
/// that breaks, while its session is current: the receiver handles it as a failure of the
/// peer behind it.
pub async fn accept_frames<L: FrameListener, T: Send + 'static>(
    mut listener: L,
    sink: tokio::sync::mpsc::Sender<T>,
    wrap: fn(Result<Frame, WireError>) -> T,
    session: tokio::sync::watch::Receiver<String>,
) {
    loop {
        let (mut rx, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "data plane: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if sink.is_closed() {
            return;
        }
        tracing::debug!(%peer, "data plane: inbound connection");
        let sink = sink.clone();
        let session = session.clone();
        tokio::spawn(async move {
            let mut session = session;
            let opened = tokio::time::timeout(LINK_DEADLINE, rx.recv()).await;
            let expected = session.borrow_and_update().clone();
            match opened {
                Ok(Ok(Some(Frame::Hello(h)))) if !expected.is_empty() && h.session == expected => {}
                Ok(Ok(None)) => return,
                other => {
                    let what = match other {
                        Ok(Ok(Some(Frame::Hello(_)))) => "a wrong session token".to_string(),
                        Ok(Ok(Some(_))) => "a frame before its hello".to_string(),
                        Ok(Err(e)) => e.to_string(),
                        Ok(Ok(None)) => String::new(),
                        Err(_) => format!("no hello within {LINK_DEADLINE:?}"),
                    };
                    tracing::warn!(%peer, reason = %what, "data plane: refused a connection that did not present this session's token");
                    return;
                }
            }
            // Nobody can change a session whose sender is gone.
            let mut watching = true;
            loop {
                let received = tokio::select! {
                    r = tokio::time::timeout(LINK_DEADLINE, rx.recv()) => r.unwrap_or_else(|_| {
                        Err(WireError::Io {
                            context: format!(
                                "no frame from {peer} for {LINK_DEADLINE:?}: the link stalled"
                            ),
                            source: std::io::ErrorKind::TimedOut.into(),
                        })
                    }),
                    changed = session.changed(), if watching => {
                        if changed.is_err() {
                            watching = false;
                        } else if *session.borrow_and_update() != expected {
                            tracing::debug!(%peer, "data plane: closing a connection of an earlier session");
                            return;
                        }
                        continue;
                    }
                };
                let item = match received {
                    Ok(Some(Frame::Heartbeat)) => continue,
                    Ok(Some(f)) => Ok(f),
                    Ok(None) => return,
                    // An earlier session's link going away is no failure of this one.
                    Err(_) if *session.borrow() != expected => return,
                    Err(e) => Err(e),
                };
                let last = item.is_err();
                if sink.send(wrap(item)).await.is_err() || last {
                    return;
                }
            }
        });
    }
}

/// The next frame to send from `queue`, or a heartbeat when none came for
/// [`HEARTBEAT_EVERY`]; `None` once the queue is closed and empty.
pub async fn next_or_heartbeat(queue: &mut tokio::sync::mpsc::Receiver<Frame>) -> Option<Frame> {
    match tokio::time::timeout(HEARTBEAT_EVERY, queue.recv()).await {
        Ok(frame) => frame,
        Err(_) => Some(Frame::Heartbeat),
    }
}

/// Connects to a data-plane peer and presents the session token, as [`accept_frames`] requires.
pub async fn hello<T: Transport>(
    transport: &T,
    addr: &str,
    session: &str,
) -> Result<T::Sender, WireError> {
    let mut sender = transport.connect(addr).await?;
    sender
        .send(&Frame::Hello(crate::wire::HelloFrame {
            session: session.to_string(),
        }))
        .await?;
    Ok(sender)
}

/// The address peers should use for a listener bound to `local`: its port on `host` when one is
/// given (needed when listening on 0.0.0.0), else `local` itself.
pub fn advertised_address(local: &str, host: Option<&str>) -> String {
    match (host, local.rsplit_once(':')) {
        (Some(h), Some((_, port))) => format!("{h}:{port}"),
        _ => local.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::wire::{ErrorFrame, PRELUDE_LEN, SamplesFrame};

    #[tokio::test]
    async fn frames_cross_a_tcp_connection_in_order() {
        let t = TcpTransport::plaintext();
        let mut listener = t.bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr();
        let recv = tokio::spawn(async move {
            let (mut r, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            while let Some(f) = r.recv().await.unwrap() {
                got.push(f);
            }
            got
        });
        let mut s = t.connect(&addr).await.unwrap();
        let frames: Vec<Frame> = (0..3)
            .map(|i| {
                Frame::Samples(SamplesFrame {
                    times: Default::default(),
                    step_id: i,
                    samples: vec![],
                })
            })
            .chain([Frame::Error(ErrorFrame {
                step_id: 9,
                stage: 1,
                to: 2,
                message: "x".into(),
            })])
            .collect();
        for f in &frames {
            s.send(f).await.unwrap();
        }
        drop(s);
        assert_eq!(recv.await.unwrap(), frames);
    }

    fn mtls(dir: &std::path::Path) -> TcpTransport {
        use crate::tls::{CertSet, Tls};
        let files = CertSet::generate(&["127.0.0.1".into()], 1)
            .unwrap()
            .write(dir)
            .unwrap();
        TcpTransport::new(LinkSecurity::Mtls(std::sync::Arc::new(
            Tls::load(&files, None).unwrap(),
        )))
    }

    #[tokio::test]
    async fn frames_cross_a_mutual_tls_link_and_strangers_are_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ours, theirs) = (mtls(a.path()), mtls(b.path()));
        let mut listener = ours.bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr();
        let frame = Frame::Samples(SamplesFrame {
            times: Default::default(),
            step_id: 3,
            samples: vec![],
        });

        // A peer whose certificate our CA signed gets its frames through.
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..3 {
                let (mut r, _) = listener.accept().await.unwrap();
                got.push(r.recv().await.map_err(|e| e.to_string()));
                if i == 0 {
                    // A sender that drops its link closes it cleanly, as on TCP.
                    got.push(r.recv().await.map_err(|e| e.to_string()));
                }
            }
            got
        });
        let mut s = ours.connect(&addr).await.unwrap();
        s.send(&frame).await.unwrap();
        drop(s);
        // A certificate from another CA: the handshake fails (the stranger refuses ours first).
        if let Ok(mut s) = theirs.connect(&addr).await {
            let _ = s.send(&frame).await;
        }
        // Plaintext: not TLS at all.
        let mut plain = TcpTransport::plaintext().connect(&addr).await.unwrap();
        let _ = plain.send(&frame).await;
        let got = server.await.unwrap();
        assert_eq!(got[..2], [Ok(Some(frame)), Ok(None)]);
        for refused in &got[2..] {
            let e = refused.as_ref().unwrap_err();
            assert!(e.starts_with("TLS handshake with 127.0.0.1:"), "{e}");
        }

        // And a listener with a certificate our CA did not sign is refused by us.
        let mut foreign = theirs.bind("127.0.0.1:0").await.unwrap();
        let foreign_addr = foreign.local_addr();
        tokio::spawn(async move {
            let (mut r, _) = foreign.accept().await.unwrap();
            let _ = r.recv().await;
        });
        let e = ours.connect(&foreign_addr).await.err().unwrap().to_string();
        assert!(
            e.contains("TLS handshake with data-plane peer") && e.contains("UnknownIssuer"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_sender_refuses_frames_over_its_limit() {
        let mut listener = TcpTransport::plaintext().bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr();
        let small = TcpTransport {
            max_frame_bytes: 32,
            ..TcpTransport::plaintext()
        };
        let mut s = small.connect(&addr).await.unwrap();
        let (mut r, _) = listener.accept().await.unwrap();
        let big = Frame::Error(ErrorFrame {
            step_id: 1,
            stage: 0,
            to: 1,
            message: "a message that makes the frame longer than 32 bytes".into(),
        });
        let err = s.send(&big).await.unwrap_err();
        assert!(matches!(err, WireError::TooLarge { .. }), "{err}");
        // The connection stays usable for frames within the limit.
        let ok = Frame::Samples(SamplesFrame {
            times: Default::default(),
            step_id: 2,
            samples: vec![],
        });
        s.send(&ok).await.unwrap();
        assert_eq!(r.recv().await.unwrap(), Some(ok));
    }

    #[tokio::test]
    async fn oversized_frames_are_refused() {
        let t = TcpTransport {
            max_frame_bytes: 16,
            ..TcpTransport::plaintext()
        };
        let mut listener = t.bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr();
        let recv = tokio::spawn(async move {
            let (mut r, _) = listener.accept().await.unwrap();
            r.recv().await
        });
        let mut s = TcpTransport::plaintext().connect(&addr).await.unwrap();
        s.send(&Frame::Error(ErrorFrame {
            step_id: 1,
            stage: 0,
            to: 1,
            message: "a message longer than sixteen bytes".into(),
        }))
        .await
        .unwrap();
        let err = recv.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }

    #[tokio::test]
    async fn a_connection_cut_inside_a_frame_is_an_error_not_a_close() {
        let mut listener = TcpTransport::plaintext().bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr();
        let frame = Frame::Samples(SamplesFrame {
            times: Default::default(),
            step_id: 7,
            samples: vec![],
        });
        let head = frame.to_bytes().unwrap();
        for cut in [1, PRELUDE_LEN - 1, PRELUDE_LEN + 1] {
            let mut raw = TcpStream::connect(&addr).await.unwrap();
            let (mut r, _) = listener.accept().await.unwrap();
            raw.write_all(&head[..cut]).await.unwrap();
            drop(raw);
            let err = r.recv().await.unwrap_err().to_string();
            assert!(err.contains("reading a frame from"), "cut at {cut}: {err}");
        }
        // Closed between frames: a clean end.
        let raw = TcpStream::connect(&addr).await.unwrap();
        let (mut r, _) = listener.accept().await.unwrap();
        drop(raw);
        assert_eq!(r.recv().await.unwrap(), None);
    }
}
