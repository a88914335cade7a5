//! Where each stage's output goes: the data-plane queue of its next hop, and, between GPU
//! workers (the `cuda` feature), the NCCL hops that carry the activations device to device
//! while the frame carries only the step header ([`Carrier::Nccl`]).
//!
//! Architecture Invariant: a frame that says NCCL carries its activations is sent only after
//! the transfer is queued on the stage's hop, and the next stage asks its hop for them when it
//! takes that frame; frames and transfers keep one order on both ends.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use strata_shared::wire::{Carrier, Frame, StepFrame};
use tokio::sync::mpsc;

use crate::device::Placement;
use crate::error::{Result, WorkerError};

/// How long a stage waits for activations that a frame says NCCL carries.
pub const NCCL_DEADLINE: Duration = Duration::from_secs(60);

/// One end of an NCCL hop. A build without the `cuda` feature has none (the type has no
/// values).
#[cfg(feature = "cuda")]
pub type NcclLink = strata_kernels::nccl::NcclPeer;
/// One end of an NCCL hop. A build without the `cuda` feature has none (the type has no
/// values).
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub enum NcclLink {}

/// The routes of a worker's stages, by stage index.
#[derive(Debug, Default)]
pub struct Routes {
    /// The outbound data-plane queue of each stage's next hop.
    pub next: HashMap<u32, mpsc::Sender<Frame>>,
    /// The NCCL hop each stage's activations leave by (this worker rank 0), where they do.
    pub nccl_out: HashMap<u32, NcclLink>,
    /// The NCCL hop each stage's input arrives by (this worker rank 1), where it does.
    pub nccl_in: HashMap<u32, NcclLink>,
}

impl Routes {
    /// Fills in the activations of a step that its frame says NCCL carries, from the hop that
    /// leads to its stage.
    ///
    /// # Errors
    ///
    /// [`WorkerError::Step`] when no NCCL hop leads to the stage, or the transfer failed.
    pub fn receive(&self, step: &mut StepFrame) -> Result<()> {
        let Some(a) = &mut step.hidden else {
            return Ok(());
        };
        if a.carrier != Carrier::Nccl {
            return Ok(());
        }
        let Some(link) = self.nccl_in.get(&step.stage) else {
            return Err(WorkerError::Step(format!(
                "stage {}: the step's activations come over NCCL, but no NCCL hop leads to this stage",
                step.stage
            )));
        };
        let len = usize::try_from(a.expected_len()).map_err(|_| {
            WorkerError::Step(format!(
                "stage {}: activations of {} bytes do not fit this machine's memory",
                step.stage,
                a.expected_len()
            ))
        })?;
        let data = receive(link, len).map_err(|e| {
            WorkerError::Step(format!(
                "stage {}: receiving its activations over NCCL: {e}",
                step.stage
            ))
        })?;
        a.data = Bytes::from(data);
        Ok(())
    }

    /// Where stage `stage`'s output frame carries activations and the stage has an NCCL hop,
    /// moves them out of the frame onto the hop (without a copy: the stage's bytes are owned
    /// by the frame alone), and the frame says so.
    ///
    /// # Errors
    ///
    /// [`WorkerError::Step`] when the hop has failed; the frame has lost its activations then,
    /// and goes no further (the step fails).
    pub fn send(&self, stage: u32, frame: &mut Frame) -> Result<()> {
        let Frame::Step(step) = frame else {
            return Ok(());
        };
        let (Some(a), Some(link)) = (&mut step.hidden, self.nccl_out.get(&stage)) else {
            return Ok(());
        };
        send(link, Vec::from(std::mem::take(&mut a.data))).map_err(|e| {
            WorkerError::Step(format!(
                "stage {stage}: sending its activations over NCCL: {e}"
            ))
        })?;
        a.carrier = Carrier::Nccl;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
fn receive(link: &NcclLink, len: usize) -> std::result::Result<Vec<u8>, String> {
    link.recv(len, NCCL_DEADLINE).map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn receive(link: &NcclLink, _len: usize) -> std::result::Result<Vec<u8>, String> {
    match *link {}
}

#[cfg(feature = "cuda")]
fn send(link: &NcclLink, data: Vec<u8>) -> std::result::Result<(), String> {
    link.send(data).map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn send(link: &NcclLink, _data: Vec<u8>) -> std::result::Result<(), String> {
    match *link {}
}

/// Why a worker on `placement` cannot take part in an NCCL hop, or `None` when it can.
fn nccl_unsupported(placement: Option<&Placement>, device: &str) -> Option<String> {
    let device = if device.is_empty() { "cpu[0]" } else { device };
    if !crate::device::CUDA_BUILT {
        return Some(format!(
            "an NCCL hop needs a `cuda` device and a build with the `cuda` feature; this worker runs {device}, built without it"
        ));
    }
    match placement {
        Some(p) if p.nccl() => None,
        Some(p) if p.is_cuda() => Some(format!(
            "this worker's {device} cannot load the NCCL library (libnccl.so)"
        )),
        Some(_) => Some(format!(
            "an NCCL hop needs a `cuda` device; this worker runs {device}"
        )),
        None => Some("this worker has loaded nothing yet".into()),
    }
}

/// A fresh NCCL unique id for a hop from a stage of this worker.
///
/// # Errors
///
/// [`WorkerError::Device`] saying why this worker cannot make one.
pub fn unique_id(placement: Option<&Placement>, device: &str) -> Result<Vec<u8>> {
    if let Some(why) = nccl_unsupported(placement, device) {
        return Err(WorkerError::Device(why));
    }
    #[cfg(feature = "cuda")]
    {
        strata_kernels::nccl::unique_id().map_err(|e| WorkerError::Device(e.to_string()))
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(WorkerError::Device(
            "built without the `cuda` feature".into(),
        ))
    }
}

/// Joins the NCCL hop `id` of stage `stage` as `rank` (0: its activations leave by it; 1:
/// they arrive by it).
///
/// # Errors
///
/// [`WorkerError::Device`] naming the stage and why this worker cannot join.
pub fn join(
    placement: Option<&Placement>,
    device: &str,
    stage: u32,
    id: &[u8],
    rank: usize,
) -> Result<NcclLink> {
    if let Some(why) = nccl_unsupported(placement, device) {
        return Err(WorkerError::Device(format!("stage {stage}: {why}")));
    }
    #[cfg(feature = "cuda")]
    {
        match placement {
            Some(Placement::Cuda(gpu)) => strata_kernels::nccl::NcclPeer::join(gpu, id, rank)
                .map_err(|e| WorkerError::Device(format!("stage {stage}: {e}"))),
            _ => Err(WorkerError::Device(format!(
                "stage {stage}: an NCCL hop needs a `cuda` device"
            ))),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (id, rank);
        Err(WorkerError::Device(format!(
            "stage {stage}: built without the `cuda` feature"
        )))
    }
}

#[cfg(test)]
mod tests {
    use strata_shared::wire::{ActDType, Activations};

    use super::*;

    fn step(carrier: Carrier, data: Bytes) -> StepFrame {
        StepFrame {
            times: Default::default(),
            step_id: 4,
            stage: 1,
            releases: vec![],
            seqs: vec![],
            hidden: Some(Activations {
                dtype: ActDType::F32,
                rows: 1,
                cols: 2,
                carrier,
                data,
            }),
            trace: String::new(),
            concurrent: 1,
        }
    }

    #[test]
    fn frames_without_nccl_hops_pass_untouched() {
        let routes = Routes::default();
        let mut s = step(Carrier::Frame, Bytes::from(vec![0u8; 8]));
        routes.receive(&mut s).unwrap();
        assert_eq!(s, step(Carrier::Frame, Bytes::from(vec![0u8; 8])));
        let mut frame = Frame::Step(s.clone());
        routes.send(1, &mut frame).unwrap();
        assert_eq!(frame, Frame::Step(s));
    }

    #[test]
    fn activations_announced_over_nccl_need_a_hop_to_the_stage() {
        let mut s = step(Carrier::Nccl, Bytes::new());
        let err = Routes::default().receive(&mut s).unwrap_err().to_string();
        assert!(
            err.contains("stage 1") && err.contains("no NCCL hop leads to this stage"),
            "{err}"
        );
    }

    #[test]
    fn a_cpu_worker_says_why_it_cannot_join_an_nccl_hop() {
        let err = join(Some(&Placement::Cpu), "cpu[1]", 2, &[0; 128], 0)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("stage 2: "), "{err}");
        assert!(err.contains("cuda") && err.contains("cpu[1]"), "{err}");
        let err = unique_id(Some(&Placement::Cpu), "cpu[0]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cpu[0]"), "{err}");
        let err = unique_id(None, "").unwrap_err().to_string();
        assert!(
            err.contains("loaded nothing") || err.contains("cpu[0]"),
            "{err}"
        );
    }
}
