-- State store fixture, schema version 3: the history table.
-- Schema text copied from `git show e539f7e:crates/node-agent/src/state.rs` (const SCHEMA) and image/store.rs (CacheDb::open), rows
-- as that release wrote them. Files of versions 1-3 carry user_version 0 (the version
-- was not recorded then). tests/state_migration.rs opens each with today's agent.
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    status TEXT NOT NULL,
    reason_code TEXT,
    error_message TEXT,
    exit_code INTEGER,
    seq INTEGER NOT NULL DEFAULT 0,
    boot_id TEXT,
    restarts INTEGER NOT NULL DEFAULT 0,
    desired_json TEXT,
    operator_stopped_generation INTEGER,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    report_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    report_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_by_instance ON reports (instance_id, seq);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    report_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    detail TEXT,
    PRIMARY KEY (kind, name)
);
ALTER TABLE instances ADD COLUMN consecutive_failures INTEGER NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS image_cache (
cache_key TEXT PRIMARY KEY,
digest TEXT NOT NULL,
format_version INTEGER NOT NULL,
source TEXT NOT NULL,
disk_path TEXT NOT NULL,
size_bytes INTEGER NOT NULL,
allocated_bytes INTEGER NOT NULL,
defaults_json TEXT NOT NULL,
created_ms INTEGER NOT NULL,
last_used_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS image_refs (
instance_id TEXT PRIMARY KEY,
digest TEXT NOT NULL,
pinned_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS image_refs_digest ON image_refs(digest);
INSERT INTO instances (instance_id, generation, status, reason_code, error_message, exit_code, seq, boot_id, restarts, desired_json, operator_stopped_generation, updated_at) VALUES
  ('web-1', 2, 'ready', NULL, NULL, NULL, 3, 'boot-web-1', 0, '{"instance_id":"web-1","generation":2}', NULL, '2026-11-26T10:00:03Z'),
  ('job-7', 1, 'failed', 'exited_nonzero', 'workload exited with code 3', 3, 2, NULL, 2, '{"instance_id":"job-7","generation":1}', NULL, '2026-11-26T10:00:02Z'),
  ('old-3', 4, 'stopped', NULL, NULL, NULL, 5, NULL, 0, NULL, 4, '2026-11-26T10:00:05Z');
INSERT INTO outbox (instance_id, seq, report_json) VALUES
  ('web-1', 2, '{"instance_id":"web-1","status":"booting","generation":2,"seq":2,"observed_at":"2026-11-26T10:00:02Z"}'),
  ('web-1', 3, '{"instance_id":"web-1","status":"ready","generation":2,"seq":3,"observed_at":"2026-11-26T10:00:03Z"}');
INSERT INTO reports (instance_id, seq, report_json) VALUES
  ('job-7', 1, '{"instance_id":"job-7","status":"booting","generation":2,"seq":1,"observed_at":"2026-11-26T10:00:01Z"}'),
  ('job-7', 2, '{"instance_id":"job-7","status":"failed","generation":2,"seq":2,"observed_at":"2026-11-26T10:00:02Z","reason_code":"exited_nonzero","exit_code":3}');
INSERT INTO meta (key, value) VALUES ('plan_cursor', '41'), ('node_state', 'active');
INSERT INTO resources (kind, name, instance_id, detail) VALUES
  ('tap', 'plfm0a1b2c3d', 'web-1', '{"ipv4":"169.254.100.2"}'),
  ('disk', 'instances/web-1/scratch.ext4', 'web-1', NULL);
UPDATE instances SET consecutive_failures = 2 WHERE instance_id = 'job-7';
INSERT INTO image_cache (cache_key, digest, format_version, source, disk_path, size_bytes, allocated_bytes, defaults_json, created_ms, last_used_ms) VALUES
  ('sha256:abababababababababababababababababababababababababababababababab#v1', 'sha256:abababababababababababababababababababababababababababababababab', 1, 'registry.local/app', 'images/disks/abababababababababababababababababababababababababababababababab.ext4', 67108864, 12582912, '{}', 1764150000000, 1764150003000);
INSERT INTO image_refs (instance_id, digest, pinned_ms) VALUES ('web-1', 'sha256:abababababababababababababababababababababababababababababababab', 1764150003000);
INSERT INTO history (instance_id, seq, report_json) VALUES ('web-1', 1, '{"instance_id":"web-1","status":"booting","generation":2,"seq":1,"observed_at":"2026-11-26T10:00:01Z"}');
