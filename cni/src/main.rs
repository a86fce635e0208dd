//! `meshward-cni`: the CNI plugin binary. Reads the `CNI_*` environment and
//! the configuration on stdin, prints the result or the spec's error object.

use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        // Nothing was decided yet, so report it as a decode failure.
        let err = meshward_cni::error::CniError::new(
            meshward_cni::error::ErrorCode::IoFailure,
            "could not read the network configuration from stdin",
            e.to_string(),
        );
        return emit(&err.to_json(meshward_cni::spec::LATEST_VERSION), false);
    }
    match meshward_cni::plugin::run(|k| std::env::var(k).ok(), &stdin) {
        Ok(Some(out)) => emit(&out, true),
        Ok(None) => ExitCode::SUCCESS,
        Err(failure) => emit(&failure.error.to_json(&failure.cni_version), false),
    }
}

fn emit(value: &serde_json::Value, ok: bool) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    let written = writeln!(stdout, "{text}").and_then(|()| stdout.flush());
    if ok && written.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
