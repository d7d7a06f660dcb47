//! Control-plane TLS material that changes while the agent runs: the agent binary
//! against the in-test control plane over mTLS, which records the serial of the client
//! certificate of every request's connection.

mod common;
#[path = "support/control_plane.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::agent::AgentProcess;
use common::wait::poll_until_async;
use serde_json::Value;
use support::{new_state, FakeCp};

const NODE: &str = "cert-node";

struct Pki {
    ca_pem: String,
    ca_der: rustls_pki_types::CertificateDer<'static>,
    server_cert: rustls_pki_types::CertificateDer<'static>,
    server_key: rustls_pki_types::PrivateKeyDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A client certificate (PEM) with this serial and its key (PEM); with `days`, it
/// expires that many days from now (rcgen's default otherwise: 4096).
fn client_cert(pki: &Pki, serial: u8, days: Option<i64>) -> (String, String) {
    use chrono::Datelike;
    use rcgen::{CertificateParams, DnType, KeyPair, SerialNumber};
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    if let Some(days) = days {
        let end = chrono::Utc::now() + chrono::Duration::days(days);
        p.not_after = rcgen::date_time_ymd(end.year(), end.month() as u8, end.day() as u8);
    }
    p.distinguished_name
        .push(DnType::CommonName, format!("{NODE}-{serial:02x}"));
    p.serial_number = Some(SerialNumber::from(vec![serial]));
    let cert = p.signed_by(&key, &pki.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "plfm test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    sp.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let server = sp.signed_by(&server_key, &issuer).unwrap();
    Pki {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        server_cert: server.der().clone(),
        server_key: rustls_pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        issuer,
    }
}

/// Server config that requires a client certificate of the test CA.
fn server_config(p: &Pki) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(p.ca_der.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![p.server_cert.clone()], p.server_key.clone_key())
        .unwrap()
}

/// Writes `text` to `path` the way cert-manager or step do: a new file renamed over
/// the old one (a new inode at the same path).
fn replace_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The value of one sample of the agent's `/metrics`.
fn metric(agent: &AgentProcess, sample: &str) -> Option<f64> {
    let (code, body) = agent.api_get("/metrics").ok()?;
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

fn node_status(agent: &AgentProcess) -> Value {
    let out = agent.cli(&["status", "--json", "--node"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Requests after index `from` and the serials they presented.
fn serials_since(cp: &FakeCp, from: usize) -> Vec<Option<String>> {
    cp.client_serials().into_iter().skip(from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_client_certificate_is_used_without_a_restart_and_a_bad_one_is_kept_out() {
    let pki = pki();
    let cp = FakeCp::start_tls_recording(new_state(NODE, 1, None), server_config(&pki)).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let w = |name: &str, text: &str| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (cert_a, key_a) = client_cert(&pki, 0x1a, Some(3));
    let (cert_b, key_b) = client_cert(&pki, 0x2b, None);
    let ca = w("ca.pem", &pki.ca_pem);
    let cert = w("client.pem", &cert_a);
    let key = w("client.key", &key_a);
    let token = w("token", "reload-token-1-3c9a\n");
    let cfg = format!(
        "node_id = \"{NODE}\"\ndata_dir = \"data\"\n[api]\nlisten = \"127.0.0.1:{}\"\n[control_plane]\nmode = \"http\"\nurl = \"https://localhost:{}\"\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\ntoken_file = \"{}\"\npoll_interval_ms = 200\nheartbeat_interval_secs = 1\nreload_interval_ms = 100\n[runtime]\nkind = \"mock\"\n",
        common::free_port(),
        cp.addr.port(),
        ca.display(),
        cert.display(),
        key.display(),
        token.display()
    );
    let config = w("agent.toml", &cfg);
    let agent = AgentProcess::spawn(&config, &dir.join("agent.log"));
    let pid = agent.pid();
    let a = Some("1a".to_string());
    let b = Some("2b".to_string());

    poll_until_async(
        "a request with certificate 1a",
        Duration::from_secs(20),
        || {
            agent.assert_running();
            let s = cp.client_serials();
            if s.contains(&a) {
                Ok(())
            } else {
                Err(s)
            }
        },
    )
    .await;
    let st = node_status(&agent);
    assert_eq!(
        st["node"]["control_plane_tls"]["client_cert"]["serial"], "1a",
        "{st}"
    );
    let expiry = metric(&agent, "plfm_agent_cert_expiry_seconds").unwrap();
    assert!(
        expiry > 86_400.0,
        "rcgen's certificates run for years: {expiry}"
    );

    assert!(cp
        .state
        .authorizations
        .lock()
        .unwrap()
        .iter()
        .all(|a| a.as_deref() == Some("Bearer reload-token-1-3c9a")));

    // The key, then the certificate, each by atomic rename (as a renewal writes them),
    // and a new token.
    replace_atomically(&key, &key_b);
    replace_atomically(&cert, &cert_b);
    replace_atomically(&token, "reload-token-2-77d1\n");
    let mark = cp.client_serials().len();
    poll_until_async(
        "a request with certificate 2b",
        Duration::from_secs(20),
        || {
            agent.assert_running();
            let s = serials_since(&cp, mark);
            if s.contains(&b) {
                Ok(())
            } else {
                Err(s)
            }
        },
    )
    .await;
    assert_eq!(agent.pid(), pid, "no restart");
    poll_until_async(
        "reload ok counted",
        Duration::from_secs(5),
        || match metric(&agent, "plfm_agent_cert_reload_total{outcome=\"ok\"}") {
            Some(v) if v >= 1.0 => Ok(v),
            other => Err(other),
        },
    )
    .await;
    let st = node_status(&agent);
    assert_eq!(
        st["node"]["control_plane_tls"]["client_cert"]["serial"], "2b",
        "{st}"
    );
    assert!(
        st["node"]["control_plane_tls"]["last_error"].is_null(),
        "{st}"
    );

    // A corrupt certificate: reported (log, metric, status), the old one stays in use.
    replace_atomically(
        &cert,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    poll_until_async("reload error counted", Duration::from_secs(10), || {
        agent.assert_running();
        match metric(&agent, "plfm_agent_cert_reload_total{outcome=\"error\"}") {
            Some(v) if v >= 1.0 => Ok(v),
            other => Err(other),
        }
    })
    .await;
    let st = node_status(&agent);
    let err = st["node"]["control_plane_tls"]["last_error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("status shows the reload error: {st}"))
        .to_string();
    assert!(
        err.contains("client_cert_file") && err.contains(&cert.display().to_string()),
        "the error names the file: {err}"
    );
    assert_eq!(
        st["node"]["control_plane_tls"]["client_cert"]["serial"], "2b",
        "{st}"
    );
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("cannot be loaded") && l.contains("client.pem")),
        "a log line names the file:\n{log}"
    );
    let human = agent.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("CERTIFICATE RELOAD FAILED"),
        "{human:?}"
    );
    // Requests go on, with certificate 2b.
    let mark = cp.client_serials().len();
    let after = poll_until_async("3 more requests", Duration::from_secs(20), || {
        agent.assert_running();
        let s = serials_since(&cp, mark);
        if s.len() >= 3 {
            Ok(s)
        } else {
            Err(s)
        }
    })
    .await;
    assert!(after.iter().all(|s| *s == b), "{after:?}");

    // A valid certificate whose key is not the one in the key file: refused too.
    replace_atomically(&cert, &cert_a);
    poll_until_async(
        "a second reload error",
        Duration::from_secs(10),
        || match metric(&agent, "plfm_agent_cert_reload_total{outcome=\"error\"}") {
            Some(v) if v >= 2.0 => Ok(v),
            other => Err(other),
        },
    )
    .await;
    let mark = cp.client_serials().len();
    let after = poll_until_async("3 more requests", Duration::from_secs(20), || {
        let s = serials_since(&cp, mark);
        if s.len() >= 3 {
            Ok(s)
        } else {
            Err(s)
        }
    })
    .await;
    assert!(after.iter().all(|s| *s == b), "{after:?}");
    let st = node_status(&agent);
    assert!(
        st["node"]["control_plane_tls"]["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("client_key_file")),
        "{st}"
    );
    assert_eq!(agent.pid(), pid, "no restart");
    let log = agent.log();
    assert!(
        !log.contains("reload-token-1") && !log.contains("reload-token-2"),
        "a token is in the agent's log:\n{log}"
    );
}
