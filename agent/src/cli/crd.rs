//! `meshward crd`: the CustomResourceDefinitions generated from the policy
//! types, as `kubectl apply -f -` and the Helm chart's `crds/` take them.

use std::io::Write;

use anyhow::{Context, Result};

pub fn run() -> Result<()> {
    let yaml = meshward_policy::crds_yaml().context("generating the CRDs")?;
    std::io::stdout()
        .lock()
        .write_all(yaml.as_bytes())
        .context("writing to stdout")
}
