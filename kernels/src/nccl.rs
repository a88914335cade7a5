//! NCCL hops between GPU workers (the `cuda` feature): a communicator of two ranks per hop, the
//! sending stage's worker rank 0 (it made the unique id, and runs the bootstrap root), the
//! receiving stage's worker rank 1. Activations go device to device: the sender copies a step's
//! bytes to its GPU and `ncclSend`s them, the receiver `ncclRecv`s them on its GPU and copies
//! them to the host, where its stage reads them.
//!
//! A communicator lives on one thread of its own ([`NcclPeer`]) with a CUDA stream of its own:
//! NCCL calls block until the other rank takes part, and neither a worker's compute thread nor
//! its products should wait on that. Transfers on one peer happen in the order they were asked
//! for, which is the order of the data-plane frames they go with.
//!
//! Architecture Invariant: a hop's sender queues each transfer, then the frame that announces
//! it; the receiver asks for it on taking that frame: both ranks walk the same sequence of
//! transfers. A transfer that fails or times out fails the peer for good (every later one
//! fails at once), and its worker reports itself failed, so that the gateway rebuilds the ring
//! with new communicators.

use std::ffi::c_char;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut, DriverError};
use cudarc::nccl::result::NcclError;
use cudarc::nccl::safe::{Comm, Id};

use crate::KernelError;
use crate::cuda::{CudaDevice, nccl_present};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

fn nccl_error(what: &str, e: &NcclError) -> KernelError {
    KernelError::Device(format!("NCCL: {what}: {:?}", e.0))
}

fn driver_error(what: &str, e: &DriverError) -> KernelError {
    KernelError::Device(format!("NCCL hop: {what}: {e}"))
}

/// A fresh unique id for a communicator: this process becomes its bootstrap root, so rank 0
/// must join from here.
///
/// # Errors
///
/// [`KernelError::Device`] when the NCCL library cannot be loaded, or NCCL's own error.
pub fn unique_id() -> Result<Vec<u8>, KernelError> {
    if !nccl_present() {
        return Err(KernelError::Device(
            "libnccl.so cannot be loaded (install NCCL, or put its directory on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    let id = Id::new().map_err(|e| nccl_error("ncclGetUniqueId", &e))?;
    // `c_char` to `u8`: the same byte.
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// The id in `bytes`, checked to be one.
fn parse_id(bytes: &[u8]) -> Result<Id, KernelError> {
    let id: [u8; ID_BYTES] = bytes.try_into().map_err(|_| {
        KernelError::Device(format!(
            "an NCCL unique id is {ID_BYTES} bytes, this one {}",
            bytes.len()
        ))
    })?;
    // `u8` to `c_char`: the same byte.
    Ok(Id::uninit(id.map(|b| b as c_char)))
}

/// What the communicator's thread is asked to do.
enum Transfer {
    /// Send these bytes to the other rank.
    Send(Vec<u8>),
    /// Receive this many bytes from the other rank, and answer with them.
    Recv(usize, mpsc::SyncSender<Result<Vec<u8>, KernelError>>),
}

/// One end of an NCCL hop: its communicator on a thread of its own.
#[derive(Debug)]
pub struct NcclPeer {
    transfers: mpsc::Sender<Transfer>,
    /// Why the communicator's thread stopped, once it has.
    failed: Arc<Mutex<Option<String>>>,
}

impl NcclPeer {
    /// Joins the two-rank communicator `id` on `device` as `rank` (0 sends, 1 receives), on a
    /// thread of its own. Returns at once: the communicator forms when the other rank joins,
    /// and the first transfer waits for that.
    ///
    /// # Errors
    ///
    /// [`KernelError::Device`] for an id that is not one, a rank other than 0 or 1, or a
    /// device that cannot give the hop a stream or a thread.
    pub fn join(device: &CudaDevice, id: &[u8], rank: usize) -> Result<Self, KernelError> {
        let id = parse_id(id)?;
        if rank > 1 {
            return Err(KernelError::Device(format!(
                "an NCCL hop has ranks 0 and 1, not {rank}"
            )));
        }
        let stream = device
            .new_stream()
            .map_err(|e| driver_error("cannot create a stream", &e))?;
        let (transfers, queue) = mpsc::channel();
        let failed = Arc::new(Mutex::new(None));
        let failure = Arc::clone(&failed);
        std::thread::Builder::new()
            .name(format!("strata-nccl-{rank}"))
            .spawn(move || {
                // cudarc's `Comm` panics if NCCL fails to abort it on drop: a failure too.
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    serve(&stream, id, rank, &queue)
                }));
                let why = match served {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "NCCL hop: the communicator failed while closing".to_string(),
                };
                record(&failure, why);
            })
            .map_err(|e| KernelError::Device(format!("cannot start an NCCL thread: {e}")))?;
        Ok(NcclPeer { transfers, failed })
    }

    /// Fails the hop for good: every later transfer fails at once with `why`.
    fn fail(&self, why: String) -> KernelError {
        record(&self.failed, why.clone());
        KernelError::Device(why)
    }

    /// Why the hop stopped working, if it has.
    fn failure(&self) -> Option<KernelError> {
        let why = self.failed.lock().ok()?.clone()?;
        Some(KernelError::Device(why))
    }

    /// Queues `data` to be sent to the other rank (after everything queued before).
    ///
    /// # Errors
    ///
    /// [`KernelError::Device`] when the hop has failed.
    pub fn send(&self, data: Vec<u8>) -> Result<(), KernelError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        self.transfers
            .send(Transfer::Send(data))
            .map_err(|_| self.failure().unwrap_or_else(gone))
    }

    /// Receives `len` bytes from the other rank (after everything asked for before), waiting
    /// at most `deadline`.
    ///
    /// # Errors
    ///
    /// [`KernelError::Device`] when the hop has failed, or nothing arrived in time.
    pub fn recv(&self, len: usize, deadline: Duration) -> Result<Vec<u8>, KernelError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let (reply, answer) = mpsc::sync_channel(1);
        self.transfers
            .send(Transfer::Recv(len, reply))
            .map_err(|_| self.failure().unwrap_or_else(gone))?;
        match answer.recv_timeout(deadline) {
            Ok(result) => result,
            // The transfer still waits on the thread: the transfers after it could never line
            // up again.
            Err(mpsc::RecvTimeoutError::Timeout) => Err(self.fail(format!(
                "NCCL hop: {len} bytes from the previous stage did not arrive within {deadline:?}"
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self.failure().unwrap_or_else(gone)),
        }
    }
}

fn gone() -> KernelError {
    KernelError::Device("NCCL hop: its thread is gone".into())
}

/// Records why a hop failed, keeping the first reason.
fn record(failed: &Mutex<Option<String>>, why: String) {
    if let Ok(mut f) = failed.lock() {
        f.get_or_insert(why);
    }
}

/// The communicator's thread: joins, then runs the transfers in order until the peer is
/// dropped or one fails.
fn serve(
    stream: &Arc<CudaStream>,
    id: Id,
    rank: usize,
    queue: &mpsc::Receiver<Transfer>,
) -> Result<(), KernelError> {
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| driver_error("cannot bind the device", &e))?;
    let comm = Comm::from_rank(Arc::clone(stream), rank, 2, id)
        .map_err(|e| nccl_error("ncclCommInitRank", &e))?;
    let peer = if rank == 0 { 1 } else { 0 };
    // One device buffer for every transfer, grown to the largest.
    let mut buffer = None;
    while let Ok(transfer) = queue.recv() {
        match transfer {
            Transfer::Send(data) => {
                let mut staged = staging(stream, &mut buffer, data.len())?;
                stream
                    .memcpy_htod(&data, &mut staged)
                    .map_err(|e| driver_error("copy to the device", &e))?;
                comm.send(&staged, peer)
                    .map_err(|e| nccl_error("ncclSend", &e))?;
                stream.synchronize().map_err(|e| driver_error("send", &e))?;
            }
            Transfer::Recv(len, reply) => {
                let received = staging(stream, &mut buffer, len)
                    .and_then(|mut staged| receive(stream, &comm, peer, &mut staged));
                let failure = received.as_ref().err().map(ToString::to_string);
                let _ = reply.send(received);
                if let Some(why) = failure {
                    return Err(KernelError::Device(why));
                }
            }
        }
    }
    Ok(())
}

/// The first `len` bytes of the hop's device buffer, which is made (or replaced by a larger
/// one) when it has fewer.
fn staging<'b>(
    stream: &Arc<CudaStream>,
    buffer: &'b mut Option<CudaSlice<u8>>,
    len: usize,
) -> Result<CudaViewMut<'b, u8>, KernelError> {
    if buffer.as_ref().is_none_or(|b| b.len() < len) {
        *buffer = None;
        let grown = stream
            .alloc_zeros::<u8>(len)
            .map_err(|e| driver_error("allocate the transfer buffer", &e))?;
        *buffer = Some(grown);
    }
    buffer.as_mut().map(|b| b.slice_mut(..len)).ok_or_else(gone)
}

/// Receives `staged.len()` bytes from `peer` into `staged`, then copies them to the host.
fn receive(
    stream: &Arc<CudaStream>,
    comm: &Comm,
    peer: i32,
    staged: &mut CudaViewMut<'_, u8>,
) -> Result<Vec<u8>, KernelError> {
    comm.recv(staged, peer)
        .map_err(|e| nccl_error("ncclRecv", &e))?;
    let mut data = vec![0u8; staged.len()];
    stream
        .memcpy_dtoh(staged, &mut data)
        .map_err(|e| driver_error("copy to the host", &e))?;
    stream
        .synchronize()
        .map_err(|e| driver_error("receive", &e))?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_must_be_128_bytes() {
        let err = parse_id(&[0; 12]).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("128 bytes, this one 12"), "{err}");
        assert!(parse_id(&[7; ID_BYTES]).is_ok());
    }
}
