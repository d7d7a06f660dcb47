//! The state store migrates forward from every released schema version and refuses a
//! database from a newer agent (issue 15, "upgrades without VM restarts").
//!
//! Fixtures: `tests/data/state/v<N>.sql`, the schema text of each release (copied from
//! the commit that introduced it) with rows as that release wrote them. Each test
//! builds the file with SQLite, opens it with today's store and image cache, and checks
//! that nothing was lost and that the store works on it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use plfm_node_agent::image::reference::Digest;
use plfm_node_agent::image::store::CacheDb;
use plfm_node_agent::state::{StatusRecord, Store, StoreError, SCHEMA_VERSION};
use rusqlite::Connection;

fn fixture(version: u32, dir: &Path) -> PathBuf {
    let sql = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/state/v{version}.sql")),
    )
    .expect("read the fixture");
    let path = dir.join("state.db");
    let c = Connection::open(&path).unwrap();
    c.execute_batch(&sql).expect("the fixture loads");
    let v: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, 0, "released versions 1-3 did not record their version");
    path
}

/// The first column of every row of `sql` (text).
fn strings(path: &Path, sql: &str) -> Vec<String> {
    let c = Connection::open(path).unwrap();
    let mut st = c.prepare(sql).unwrap();
    let v = st
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<Vec<String>, _>>()
        .unwrap();
    v
}

fn user_version(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

/// Opens fixture `version` with today's store and checks every table's rows survived
/// and the store works on the migrated file.
fn migrates(version: u32) {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture(version, dir.path());
    let s = Store::open(&path).expect("today's store opens the old database");
    assert_eq!(user_version(&path), SCHEMA_VERSION);

    // Instances: every row and field as written, the crash-loop count of versions
    // before 2 starting at 0.
    let mut rows = s.load_instances().unwrap();
    rows.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    let ids: Vec<_> = rows.iter().map(|r| r.instance_id.as_str()).collect();
    assert_eq!(ids, ["job-7", "old-3", "web-1"]);
    let job = &rows[0];
    assert_eq!(
        (
            job.status.as_str(),
            job.reason_code.as_deref(),
            job.exit_code,
            job.seq,
            job.restarts
        ),
        ("failed", Some("exited_nonzero"), Some(3), 2, 2)
    );
    assert_eq!(job.consecutive_failures, if version >= 2 { 2 } else { 0 });
    assert_eq!(rows[1].operator_stopped_generation, Some(4));
    assert_eq!(rows[1].desired_json, None);
    let web = &rows[2];
    assert_eq!(
        (web.status.as_str(), web.seq, web.boot_id.as_deref()),
        ("ready", 3, Some("boot-web-1"))
    );
    assert!(web.desired_json.as_deref().unwrap().contains("web-1"));

    // The outbox still holds the two undelivered reports, in order.
    let ob = s.outbox_peek(10).unwrap();
    let seqs: Vec<_> = ob.iter().map(|r| (r.instance_id.as_str(), r.seq)).collect();
    assert_eq!(seqs, [("web-1", 2), ("web-1", 3)]);
    // The standalone sink's reports, the plan cursor, the node state, the ledger.
    assert_eq!(s.delivered_reports(Some("job-7")).unwrap().len(), 2);
    assert_eq!(s.meta_get("plan_cursor").unwrap().as_deref(), Some("41"));
    assert_eq!(s.meta_get("node_state").unwrap().as_deref(), Some("active"));
    let mut res: Vec<_> = s
        .resources()
        .unwrap()
        .into_iter()
        .map(|r| (r.kind, r.instance_id))
        .collect();
    res.sort();
    assert_eq!(
        res,
        [
            ("disk".into(), "web-1".into()),
            ("tap".into(), "web-1".into())
        ]
    );

    // The store works on it: a new status with a crash-loop count, delivery moving
    // reports to the history (a table version 1 did not have), reopened.
    let mut r = job.clone();
    r.seq = 3;
    r.consecutive_failures = 3;
    s.commit_statuses(&[StatusRecord {
        row: r,
        report_json: Some(r#"{"instance_id":"job-7","status":"failed","seq":3}"#.into()),
    }])
    .unwrap();
    let ids: Vec<i64> = s.outbox_peek(10).unwrap().iter().map(|r| r.id).collect();
    s.outbox_ack(&ids[..2]).unwrap();
    let hist = s.report_history(Some("web-1"), 10).unwrap();
    let expected_history = if version >= 3 { 3 } else { 2 };
    assert_eq!(hist.len(), expected_history, "{hist:?}");
    assert!(hist.iter().all(|(_, pending)| !pending));
    drop(s);
    let s = Store::open(&path).unwrap();
    let job = s
        .load_instances()
        .unwrap()
        .into_iter()
        .find(|r| r.instance_id == "job-7")
        .unwrap();
    assert_eq!((job.seq, job.consecutive_failures), (3, 3));
    assert_eq!(s.outbox_depth().unwrap(), 1);

    // The image cache's tables: created in a version-1 file, kept in later ones.
    let cache = CacheDb::open(&path).expect("the image cache opens the migrated file");
    let digest = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
    let hit = cache.lookup_and_touch(&digest).unwrap();
    if version >= 2 {
        let (disk, meta) = hit.expect("the cached disk of the old release is kept");
        assert_eq!(
            disk,
            PathBuf::from(format!("images/disks/{}.ext4", "ab".repeat(32)))
        );
        assert_eq!(meta.size_bytes, 67_108_864);
    } else {
        assert!(hit.is_none());
    }
}

#[test]
fn a_version_1_database_migrates_forward() {
    migrates(1);
}

#[test]
fn a_version_2_database_migrates_forward() {
    migrates(2);
}

#[test]
fn a_version_3_database_migrates_forward() {
    migrates(3);
}

#[test]
fn a_current_database_is_opened_without_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    drop(Store::open(&path).unwrap());
    assert_eq!(user_version(&path), SCHEMA_VERSION);
    let schema = |p: &Path| {
        strings(
            p,
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name",
        )
    };
    let before = schema(&path);
    drop(Store::open(&path).unwrap());
    assert_eq!(schema(&path), before);
}

/// A database that a newer agent wrote (a downgrade) is refused with a message naming
/// the file and both versions, and is left as it was.
#[test]
fn a_database_from_a_newer_agent_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let newer = SCHEMA_VERSION + 1;
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE instances (instance_id TEXT PRIMARY KEY, shape_of_the_future BLOB);",
        )
        .unwrap();
        c.pragma_update(None, "user_version", newer).unwrap();
    }
    let tables = |p: &Path| {
        strings(
            p,
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
        )
    };
    let err = match Store::open(&path) {
        Err(e) => e,
        Ok(_) => panic!("a newer database was opened"),
    };
    assert!(
        matches!(err, StoreError::NewerSchema { found, supported, .. } if found == newer && supported == SCHEMA_VERSION),
        "{err}"
    );
    let msg = err.to_string();
    for part in [
        path.display().to_string(),
        format!("schema version {newer}"),
        format!("this agent's {SCHEMA_VERSION}"),
        "newer plfm-node-agent".to_string(),
    ] {
        assert!(msg.contains(&part), "{msg:?} lacks {part:?}");
    }
    let cache_err = match CacheDb::open(&path) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("the image cache opened a newer database"),
    };
    assert!(cache_err.contains("newer plfm-node-agent"), "{cache_err}");
    assert_eq!(tables(&path), ["instances"]);
    assert_eq!(user_version(&path), newer);

    // The daemon itself refuses to start on it, saying why.
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = \"n\"\ndata_dir = {:?}\n[api]\nsocket = {:?}\n[control_plane]\nmode = \"standalone\"\ndesired_dir = {:?}\n[runtime]\nkind = \"mock\"\n",
            dir.path().display().to_string(),
            dir.path().join("agent.sock").display().to_string(),
            dir.path().join("desired").display().to_string(),
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("desired")).unwrap();
    let out = Command::new(common::agent::BIN)
        .arg("--config")
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent started: {stderr}");
    assert!(
        stderr.contains(&format!("schema version {newer}"))
            && stderr.contains("newer plfm-node-agent"),
        "{stderr}"
    );
    assert_eq!(tables(&path), ["instances"]);
}
