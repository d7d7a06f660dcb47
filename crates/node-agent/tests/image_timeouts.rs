//! Per-layer and per-image deadlines, against a minimal fake registry on 127.0.0.1
//! that answers the manifest and config but stalls wherever the test says. Needs no
//! system tool: every case fails before anything is built.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plfm_node_agent::image::testtar::Layer;
use plfm_node_agent::image::{Digest, ImageConfig, ImageError, ImageRef, ImageService};
use plfm_node_agent::instance::ReasonCode;

#[derive(Clone, Copy, PartialEq)]
enum Stall {
    Manifest,
    Layer,
}

struct FakeRegistry {
    stop: Arc<AtomicBool>,
    image: ImageRef,
}

impl FakeRegistry {
    fn start(stall: Stall) -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let layer = Layer::new().file("a", &[5u8; 100_000]).tar();
        let layer_digest = Digest::of(&layer);
        let config = br#"{"architecture":"amd64","os":"linux","config":{}}"#.to_vec();
        let config_digest = Digest::of(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest.to_string(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest.to_string(), "size": layer.len()}]
        }))
        .unwrap();
        let manifest_digest = Digest::of(&manifest);
        let image = ImageRef::parse_pinned(&format!("{addr}/app@{manifest_digest}")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (m, c, l, stop) = (
                            manifest.clone(),
                            config.clone(),
                            layer.clone(),
                            stop2.clone(),
                        );
                        let (cd, ld) = (config_digest.clone(), layer_digest.clone());
                        std::thread::spawn(move || serve(conn, stall, &m, &cd, &c, &ld, &l, &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeRegistry { stop, image }
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn stall_until(stop: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[allow(clippy::too_many_arguments)]
fn serve(
    mut conn: TcpStream,
    stall: Stall,
    manifest: &[u8],
    config_digest: &Digest,
    config: &[u8],
    layer_digest: &Digest,
    layer: &[u8],
    stop: &AtomicBool,
) {
    conn.set_nonblocking(false).ok();
    loop {
        // Read one request head.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match conn.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
        let reply = |conn: &mut TcpStream, ctype: &str, body: &[u8]| {
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(body);
        };
        if path == "/v2/" {
            reply(&mut conn, "application/json", b"{}");
        } else if path.contains("/manifests/") {
            if stall == Stall::Manifest {
                return stall_until(stop);
            }
            reply(
                &mut conn,
                "application/vnd.oci.image.manifest.v1+json",
                manifest,
            );
        } else if path.ends_with(config_digest.as_str()) {
            reply(&mut conn, "application/octet-stream", config);
        } else if path.ends_with(layer_digest.as_str()) {
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                layer.len()
            );
            let _ = conn.write_all(&layer[..1000]);
            let _ = conn.flush();
            return stall_until(stop);
        } else {
            let _ = write!(conn, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        }
    }
}

fn run(stall: Stall, config: ImageConfig) -> (ImageError, Duration) {
    let reg = FakeRegistry::start(stall);
    let data = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let svc = ImageService::open(data.path(), config).unwrap();
    let t0 = Instant::now();
    let err = rt
        .block_on(svc.ensure_root_disk(&reg.image, "i"))
        .unwrap_err();
    let took = t0.elapsed();
    assert!(
        std::fs::read_dir(data.path().join("images/tmp"))
            .unwrap()
            .next()
            .is_none(),
        "partial files left behind"
    );
    (err, took)
}

#[test]
fn a_stalled_layer_hits_the_layer_timeout_and_names_it() {
    let cfg = ImageConfig {
        layer_timeout_secs: 1,
        ..Default::default()
    };
    let (err, took) = run(Stall::Layer, cfg);
    assert_eq!(err.reason(), ReasonCode::ImagePullFailed);
    let msg = err.to_string();
    assert!(
        msg.contains("layer_timeout_secs") && msg.contains("blob sha256:"),
        "{msg}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_stalled_manifest_hits_the_layer_timeout() {
    let cfg = ImageConfig {
        layer_timeout_secs: 1,
        ..Default::default()
    };
    let (err, took) = run(Stall::Manifest, cfg);
    assert_eq!(err.reason(), ReasonCode::ImagePullFailed);
    assert!(err.to_string().contains("manifest sha256:"), "{err}");
    assert!(err.to_string().contains("layer_timeout_secs"), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn the_image_deadline_bounds_the_whole_pull() {
    let cfg = ImageConfig {
        layer_timeout_secs: 60,
        image_timeout_secs: 1,
        ..Default::default()
    };
    let (err, took) = run(Stall::Layer, cfg);
    assert_eq!(err.reason(), ReasonCode::ImagePullFailed);
    assert!(err.to_string().contains("image_timeout_secs"), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
