//! The CNI error object and the spec's well-known error codes.

use serde::Serialize;

/// Error codes from the CNI specification (0-99) and our own (100+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 1: the configuration names a cniVersion this plugin does not speak.
    IncompatibleVersion,
    /// 2: a field of the configuration is known but not supported.
    UnsupportedField,
    /// 3: the container (its network namespace) is unknown or gone.
    UnknownContainer,
    /// 4: a required `CNI_*` variable is missing or malformed.
    InvalidEnvironment,
    /// 5: reading or writing local state failed.
    IoFailure,
    /// 6: stdin is not valid JSON.
    DecodeFailure,
    /// 7: the JSON is well formed but the configuration is invalid.
    InvalidNetworkConfig,
    /// 11: a transient condition (e.g. the IPAM lock is busy); retry.
    TryAgainLater,
    /// 50: STATUS: the plugin cannot serve ADD right now.
    NotAvailable,
    /// 100: the kernel refused a data path change (netlink).
    Datapath,
    /// 101: CHECK found the container's networking not as expected.
    CheckFailed,
    /// 102: no free address is left in the pod CIDR.
    RangeExhausted,
    /// 103: the interface to create already exists in the container.
    InterfaceExists,
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::IoFailure => 5,
            ErrorCode::DecodeFailure => 6,
            ErrorCode::InvalidNetworkConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::NotAvailable => 50,
            ErrorCode::Datapath => 100,
            ErrorCode::CheckFailed => 101,
            ErrorCode::RangeExhausted => 102,
            ErrorCode::InterfaceExists => 103,
        }
    }
}

/// A failed command, as the spec's error object: a short `msg` and `details`
/// that say exactly what was wrong and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON object printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_value(Wire {
            cni_version,
            code: self.code.code(),
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_default()
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code.code())?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}
