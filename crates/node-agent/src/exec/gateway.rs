//! The listener the platform's exec gateway connects to (`[exec] listen`, DESIGN §4a):
//! TCP, then either TLS with a client certificate signed by `exec.ca_file` (and, when
//! `allowed_subjects` is set, naming one of them), or plaintext from an address in
//! `allow_plaintext_from`. Every other connection is closed before a frame is read.
//!
//! The first byte tells the two apart: a TLS client starts with a handshake record
//! (0x16); a plaintext gateway starts with a frame length, whose first byte is 0 for
//! any frame this protocol accepts (at most 1 MiB). Sessions are [`ExecService::serve`]'s.
//! This module must not relay frames itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::ExecService;
use crate::config::ExecConfig;

/// Longest TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being handshaken or served at once (sessions are limited per instance
/// further down; this bounds what unauthenticated peers can hold open).
const MAX_CONNECTIONS: usize = 256;

/// How the listener authenticates a gateway.
pub struct GatewayAuth {
    tls: Option<tokio_rustls::TlsAcceptor>,
    allowed_subjects: Vec<String>,
    plaintext_from: Vec<std::net::IpAddr>,
}

fn setup(key: &str, path: &std::path::Path, e: impl std::fmt::Display) -> String {
    format!("exec.{key} ({}): {e}", path.display())
}

impl GatewayAuth {
    /// Reads the TLS material of `config` (when set); errors name the key and file.
    pub fn from_config(config: &ExecConfig) -> Result<GatewayAuth, String> {
        crate::control_plane::http::ensure_crypto_provider();
        let tls = match (&config.ca_file, &config.cert_file, &config.key_file) {
            (Some(ca), Some(cert), Some(key)) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).map_err(|e| setup("ca_file", ca, e))? {
                    let c = c.map_err(|e| setup("ca_file", ca, e))?;
                    roots.add(c).map_err(|e| setup("ca_file", ca, e))?;
                }
                if roots.is_empty() {
                    return Err(setup("ca_file", ca, "no certificate in the file"));
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .map_err(|e| setup("ca_file", ca, e))?;
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| setup("cert_file", cert, e))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| setup("cert_file", cert, e))?;
                let key_der =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| setup("key_file", key, e))?;
                let server = rustls::ServerConfig::builder()
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(chain, key_der)
                    .map_err(|e| setup("cert_file", cert, e))?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
            }
            _ => None,
        };
        Ok(GatewayAuth {
            tls,
            allowed_subjects: config.allowed_subjects.clone(),
            plaintext_from: config.allow_plaintext_from.clone(),
        })
    }
}

/// Names a certificate carries: its subject common names and DNS alternative names.
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    Ok(names)
}

/// Binds `[exec] listen` and serves gateway connections until `stop` changes.
pub async fn serve(
    addr: SocketAddr,
    auth: GatewayAuth,
    service: Arc<ExecService>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("exec.listen {addr}: {e}"))?;
    tracing::info!(%addr, tls = auth.tls.is_some(), plaintext_from = ?auth.plaintext_from, "exec gateway listener up");
    let auth = Arc::new(auth);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let (conn, peer) = tokio::select! {
                _ = stop.changed() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "exec gateway: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "exec gateway: too many connections; closing this one");
                continue;
            };
            let (auth, service) = (auth.clone(), service.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(why) = handle(conn, peer, &auth, &service).await {
                    tracing::warn!(target: "plfm::audit", %peer, why, "exec gateway connection refused");
                    service.count(plfm_guest_protocol::exec::EndReason::Refused);
                }
            });
        }
    }))
}

async fn handle(
    conn: TcpStream,
    peer: SocketAddr,
    auth: &GatewayAuth,
    service: &ExecService,
) -> Result<(), String> {
    let _ = conn.set_nodelay(true);
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return Err("nothing received".into()),
    }
    if first[0] == 0x16 {
        let Some(acceptor) = &auth.tls else {
            return Err(
                "TLS offered but exec.ca_file/cert_file/key_file are not configured".into(),
            );
        };
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let names = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => certificate_names(cert.as_ref())?,
            None => return Err("no client certificate".into()),
        };
        if !auth.allowed_subjects.is_empty()
            && !names.iter().any(|n| auth.allowed_subjects.contains(n))
        {
            return Err(format!(
                "client certificate names {names:?}, none of exec.allowed_subjects"
            ));
        }
        let who = format!("gateway {peer} (certificate {})", names.join(","));
        service.serve(tls, &who, None).await;
        return Ok(());
    }
    if !auth.plaintext_from.contains(&peer.ip()) {
        return Err(format!(
            "plaintext from {} refused: not in exec.allow_plaintext_from",
            peer.ip()
        ));
    }
    let who = format!("gateway {peer} (plaintext)");
    service.serve(conn, &who, None).await;
    Ok(())
}
