//! The process defaults an image carries (entrypoint, cmd, env, user, workdir) and
//! how they merge under a WorkloadSpec: the spec always wins.
//!
//! Pure data and functions; parsing takes the image config JSON document, bounded in
//! size by the caller.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Process defaults from the image's config (`config` object of the OCI image config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDefaults {
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `Env`, `KEY=VALUE` in image order.
    #[serde(default)]
    pub env: Vec<String>,
    /// `User` (`name`, `uid`, `uid:gid`, `name:group`), resolved in the guest.
    #[serde(default)]
    pub user: Option<String>,
    /// `WorkingDir`.
    #[serde(default)]
    pub workdir: Option<String>,
}

#[derive(Deserialize)]
struct RawImageConfig {
    #[serde(default)]
    config: Option<RawProcess>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawProcess {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    working_dir: Option<String>,
}

impl ImageDefaults {
    /// Reads the defaults from an OCI/Docker image config document.
    pub fn from_config_json(doc: &[u8]) -> Result<Self, String> {
        let raw: RawImageConfig = serde_json::from_slice(doc).map_err(|e| e.to_string())?;
        let p = match raw.config {
            Some(p) => p,
            None => return Ok(Self::default()),
        };
        Ok(ImageDefaults {
            entrypoint: p.entrypoint.unwrap_or_default(),
            cmd: p.cmd.unwrap_or_default(),
            env: p.env.unwrap_or_default(),
            user: p.user.filter(|u| !u.is_empty()),
            workdir: p.working_dir.filter(|w| !w.is_empty()),
        })
    }
}

/// The process to start in the guest after merging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedProcess {
    /// Full argv.
    pub argv: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Working directory (`/` when neither gives one).
    pub cwd: String,
    /// User from the image (the spec has none), to resolve in the guest.
    pub user: Option<String>,
}

/// Merges image defaults under the spec's `command`, `env_vars` and `workdir`.
///
/// - `command` non-empty replaces the image's entrypoint and cmd entirely; otherwise
///   argv is entrypoint followed by cmd.
/// - env: the image's variables, then the spec's, which override by key. An image
///   entry without `=` is kept with an empty value.
/// - cwd: the spec's, else the image's, else `/`.
pub fn merge_process(
    defaults: &ImageDefaults,
    command: &[String],
    env_vars: Option<&BTreeMap<String, String>>,
    workdir: Option<&str>,
) -> MergedProcess {
    let argv = if command.is_empty() {
        defaults
            .entrypoint
            .iter()
            .chain(&defaults.cmd)
            .cloned()
            .collect()
    } else {
        command.to_vec()
    };
    let mut env = BTreeMap::new();
    for kv in &defaults.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        if !k.is_empty() {
            env.insert(k.to_string(), v.to_string());
        }
    }
    if let Some(spec_env) = env_vars {
        for (k, v) in spec_env {
            env.insert(k.clone(), v.clone());
        }
    }
    let cwd = workdir
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .or_else(|| defaults.workdir.clone())
        .unwrap_or_else(|| "/".to_string());
    MergedProcess {
        argv,
        env,
        cwd,
        user: defaults.user.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn image() -> ImageDefaults {
        ImageDefaults::from_config_json(
            br#"{"architecture":"amd64","os":"linux","config":{
                "Entrypoint":["/bin/app"],"Cmd":["--serve"],
                "Env":["PATH=/usr/bin:/bin","MODE=image","EMPTY"],
                "User":"1000:1000","WorkingDir":"/srv"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn image_config_is_parsed() {
        let d = image();
        assert_eq!(d.entrypoint, s(&["/bin/app"]));
        assert_eq!(d.cmd, s(&["--serve"]));
        assert_eq!(d.user.as_deref(), Some("1000:1000"));
        assert_eq!(d.workdir.as_deref(), Some("/srv"));
        assert_eq!(
            ImageDefaults::from_config_json(b"{}").unwrap(),
            ImageDefaults::default()
        );
        assert!(ImageDefaults::from_config_json(b"[").is_err());
    }

    #[test]
    fn without_spec_values_image_defaults_apply() {
        let m = merge_process(&image(), &[], None, None);
        assert_eq!(m.argv, s(&["/bin/app", "--serve"]));
        assert_eq!(m.env["MODE"], "image");
        assert_eq!(m.env["EMPTY"], "");
        assert_eq!(m.cwd, "/srv");
        assert_eq!(m.user.as_deref(), Some("1000:1000"));
    }

    #[test]
    fn spec_command_replaces_entrypoint_and_cmd() {
        let m = merge_process(&image(), &s(&["/bin/sh", "-c", "echo hi"]), None, None);
        assert_eq!(m.argv, s(&["/bin/sh", "-c", "echo hi"]));
    }

    #[test]
    fn spec_env_overrides_by_key_and_keeps_others() {
        let spec: BTreeMap<String, String> = [
            ("MODE".to_string(), "spec".to_string()),
            ("NEW".to_string(), "1".to_string()),
        ]
        .into();
        let m = merge_process(&image(), &[], Some(&spec), None);
        assert_eq!(m.env["MODE"], "spec");
        assert_eq!(m.env["NEW"], "1");
        assert_eq!(m.env["PATH"], "/usr/bin:/bin");
    }

    #[test]
    fn spec_workdir_wins_and_root_is_the_fallback() {
        assert_eq!(
            merge_process(&image(), &[], None, Some("/work")).cwd,
            "/work"
        );
        assert_eq!(
            merge_process(&ImageDefaults::default(), &[], None, None).cwd,
            "/"
        );
        assert_eq!(
            merge_process(&ImageDefaults::default(), &[], None, Some("")).cwd,
            "/"
        );
    }
}
