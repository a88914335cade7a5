//! Device names as a topology writes them: `cpu`, `cpu[N]`, `cuda[N]`, `metal[N]`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A device one worker process owns. `cpu` is `cpu[0]`; `cpu[N]` is Strata's extension so that
/// several CPU worker processes can be named in one topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum DeviceSpec {
    Cpu(u32),
    Cuda(u32),
    Metal(u32),
}

impl Default for DeviceSpec {
    fn default() -> Self {
        DeviceSpec::Cpu(0)
    }
}

impl DeviceSpec {
    pub fn is_cpu(self) -> bool {
        matches!(self, DeviceSpec::Cpu(_))
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = InvalidDevice;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu(n) => write!(f, "cpu[{n}]"),
            DeviceSpec::Cuda(n) => write!(f, "cuda[{n}]"),
            DeviceSpec::Metal(n) => write!(f, "metal[{n}]"),
        }
    }
}

/// A device string that is not `cpu`, `cpu[N]`, `cuda[N]` or `metal[N]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid device `{given}`; expected `cpu`, `cpu[N]`, `cuda[N]` or `metal[N]` (N a device ordinal)"
)]
pub struct InvalidDevice {
    pub given: String,
}

impl FromStr for DeviceSpec {
    type Err = InvalidDevice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidDevice {
            given: s.to_string(),
        };
        let t = s.trim();
        if t == "cpu" {
            return Ok(DeviceSpec::Cpu(0));
        }
        let (kind, rest) = t.split_once('[').ok_or_else(err)?;
        let ordinal = rest.strip_suffix(']').ok_or_else(err)?;
        if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let n: u32 = ordinal.parse().map_err(|_| err())?;
        match kind {
            "cpu" => Ok(DeviceSpec::Cpu(n)),
            "cuda" => Ok(DeviceSpec::Cuda(n)),
            "metal" => Ok(DeviceSpec::Metal(n)),
            _ => Err(err()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documented_forms() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu(0)));
        assert_eq!("cpu[2]".parse(), Ok(DeviceSpec::Cpu(2)));
        assert_eq!("cuda[0]".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("metal[1]".parse(), Ok(DeviceSpec::Metal(1)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "gpu", "cuda", "cuda[]", "cuda[-1]", "cuda[x]", "cpu[1", "CUDA[0]", "cuda[0]x",
        ] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for d in [
            DeviceSpec::Cpu(0),
            DeviceSpec::Cpu(3),
            DeviceSpec::Cuda(1),
            DeviceSpec::Metal(0),
        ] {
            assert_eq!(d.to_string().parse(), Ok(d));
        }
    }
}
