//! The workload's environment: platform defaults overridden by the config's `env`
//! (which the host already merged from the image and the spec). Pure; must not read
//! guest init's own environment, which belongs to the kernel and test harness.

use std::collections::BTreeMap;

/// `PATH` when the config sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Composes the environment: `PATH` and `HOME` defaults (`/root` for uid 0, else `/`),
/// then every config variable. Refuses names that are empty or contain `=` or NUL and
/// values with NUL (the error names the variable, never its value).
pub fn compose_env(
    config_env: &BTreeMap<String, String>,
    uid: u32,
) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    env.insert(
        "HOME".to_string(),
        if uid == 0 { "/root" } else { "/" }.to_string(),
    );
    for (k, v) in config_env {
        if k.is_empty() || k.contains(['=', '\0']) {
            return Err(format!("environment variable name {k:?} is invalid"));
        }
        if v.contains('\0') {
            return Err(format!(
                "environment variable {k} has a NUL byte in its value"
            ));
        }
        env.insert(k.clone(), v.clone());
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_overridden_by_config() {
        let cfg = BTreeMap::from([
            ("PATH".to_string(), "/app/bin".to_string()),
            ("X".into(), "1".into()),
        ]);
        let env = compose_env(&cfg, 1000).unwrap();
        assert_eq!(env["PATH"], "/app/bin");
        assert_eq!(env["HOME"], "/");
        assert_eq!(env["X"], "1");
        let env = compose_env(&BTreeMap::new(), 0).unwrap();
        assert_eq!(env["PATH"], DEFAULT_PATH);
        assert_eq!(env["HOME"], "/root");
        assert_eq!(env.len(), 2);
    }

    #[test]
    fn bad_names_and_values_are_refused_without_echoing_values() {
        for k in ["", "A=B", "A\0"] {
            let cfg = BTreeMap::from([(k.to_string(), "v".to_string())]);
            assert!(compose_env(&cfg, 0).is_err());
        }
        let cfg = BTreeMap::from([("TOKEN".to_string(), "sec\0ret".to_string())]);
        let err = compose_env(&cfg, 0).unwrap_err();
        assert!(err.contains("TOKEN") && !err.contains("sec"), "{err}");
    }
}
