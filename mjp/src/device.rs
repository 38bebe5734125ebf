//! Run-time choice of the compute backend: `flex` (pure-Rust CPU, the default build),
//! `tch-cpu` and `tch-cuda:N` (LibTorch, only in binaries built with the `tch` feature).

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::error::{MjpError, Result};

/// A backend and device named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// burn's pure-Rust CPU backend.
    #[default]
    Flex,
    /// LibTorch on the CPU.
    TchCpu,
    /// LibTorch on CUDA device N.
    TchCuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = MjpError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "flex" | "cpu" => Ok(Self::Flex),
            "tch-cpu" => Ok(Self::TchCpu),
            "tch-cuda" | "cuda" => Ok(Self::TchCuda(0)),
            other => other
                .strip_prefix("tch-cuda:")
                .or_else(|| other.strip_prefix("cuda:"))
                .and_then(|n| n.parse().ok())
                .map(Self::TchCuda)
                .ok_or_else(|| MjpError::UnknownDevice(other.to_string())),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = MjpError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flex => write!(f, "flex"),
            Self::TchCpu => write!(f, "tch-cpu"),
            Self::TchCuda(n) => write!(f, "tch-cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The burn device (without autodiff), or a clear error when this binary cannot provide it.
    pub fn device(&self) -> Result<Device> {
        match self {
            Self::Flex => flex_device(self),
            Self::TchCpu => tch_cpu(self),
            Self::TchCuda(n) => tch_cuda(self, *n),
        }
    }
}

#[cfg(feature = "flex")]
fn flex_device(_: &DeviceSpec) -> Result<Device> {
    Ok(Device::flex())
}

#[cfg(not(feature = "flex"))]
fn flex_device(spec: &DeviceSpec) -> Result<Device> {
    Err(MjpError::BackendNotBuilt {
        device: spec.to_string(),
        feature: "flex",
    })
}

// burn 0.22 marks burn-tch deprecated in favour of CubeCL backends, but CubeCL's CUDA build
// downloads an LLVM bundle (impossible offline), so LibTorch stays our GPU path.
#[cfg(feature = "tch")]
#[allow(deprecated)]
fn tch_cpu(_: &DeviceSpec) -> Result<Device> {
    Ok(Device::libtorch())
}

#[cfg(feature = "tch")]
#[allow(deprecated)]
fn tch_cuda(spec: &DeviceSpec, n: usize) -> Result<Device> {
    let visible = if tch::Cuda::is_available() {
        usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
    } else {
        0
    };
    if n >= visible {
        return Err(MjpError::NoGpu {
            device: spec.to_string(),
            visible,
        });
    }
    Ok(Device::libtorch_cuda(n))
}

#[cfg(not(feature = "tch"))]
fn tch_cpu(spec: &DeviceSpec) -> Result<Device> {
    Err(MjpError::BackendNotBuilt {
        device: spec.to_string(),
        feature: "tch",
    })
}

#[cfg(not(feature = "tch"))]
fn tch_cuda(spec: &DeviceSpec, _: usize) -> Result<Device> {
    tch_cpu(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_strings() {
        assert_eq!("flex".parse::<DeviceSpec>().unwrap(), DeviceSpec::Flex);
        assert_eq!("tch-cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::TchCpu);
        assert_eq!(
            "tch-cuda:2".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::TchCuda(2)
        );
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("tch-cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[cfg(not(feature = "tch"))]
    #[test]
    fn tch_devices_need_the_feature() {
        let err = DeviceSpec::TchCuda(0).device().unwrap_err().to_string();
        assert!(err.contains("--features tch"), "{err}");
    }
}
