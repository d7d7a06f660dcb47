//! `events [<id>]`: the report history of the node or of one instance (`GET
//! /v1/reports`), newest last, as a table or JSON.
//!
//! Formatting only; the history is the agent's (delivered reports and those still
//! queued for the control plane).

use anyhow::Context;
use chrono::{DateTime, Utc};

use super::{human, Api};
use crate::status::view::EventView;

/// `events [<id>] [--limit N] [--json]`.
pub async fn events(api: &Api, id: Option<&str>, limit: usize, json: bool) -> anyhow::Result<()> {
    let mut path = format!("/v1/reports?limit={limit}");
    if let Some(id) = id {
        crate::spec::InstanceId::parse(id)?;
        path.push_str(&format!("&instance_id={id}"));
    }
    let body = api.send(api.get(&path), "events").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let list: Vec<EventView> = serde_json::from_value(body).context("unexpected report history")?;
    if list.is_empty() {
        println!(
            "no reports{}",
            id.map(|i| format!(" for {i}")).unwrap_or_default()
        );
        return Ok(());
    }
    print!("{}", table(&list, id.is_none(), Utc::now()));
    Ok(())
}

/// Renders reports as a table, in the order given (oldest first); the instance column
/// only when the reports may be of several instances.
pub fn table(list: &[EventView], with_instance: bool, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let row = |out: &mut String, cols: [&str; 8]| {
        let [time, age, inst, gen, status, reason, exit, msg] = cols;
        let inst = if with_instance {
            format!("{inst:<24} ")
        } else {
            String::new()
        };
        out.push_str(&format!(
            "{time:<19} {age:>7}  {inst}{gen:>4} {status:<9} {reason:<24} {exit:>5}  {msg}\n"
        ));
    };
    row(
        &mut out,
        [
            "TIME (UTC)",
            "AGO",
            "INSTANCE",
            "GEN",
            "STATUS",
            "REASON",
            "EXIT",
            "MESSAGE",
        ],
    );
    for e in list {
        let r = &e.report;
        let mut msg = r.error_message.clone().unwrap_or_default();
        if let Some(ms) = r.boot_duration_ms {
            let boot = format!(
                "booted in {}",
                human::duration(std::time::Duration::from_millis(ms))
            );
            msg = if msg.is_empty() {
                boot
            } else {
                format!("{boot}; {msg}")
            };
        }
        if e.pending {
            msg = format!("(not yet delivered) {msg}");
        }
        row(
            &mut out,
            [
                &human::time(&r.observed_at),
                &human::age(&r.observed_at, now),
                &r.instance_id,
                &r.generation.to_string(),
                r.status.as_str(),
                r.reason_code.map(|c| c.as_str()).unwrap_or("-"),
                &r.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                msg.trim_end(),
            ],
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: serde_json::Value) -> EventView {
        serde_json::from_value(json).expect("event")
    }

    #[test]
    fn table_lists_reports_in_order_with_age_and_pending_marker() {
        let now = DateTime::parse_from_rfc3339("2026-11-29T23:40:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let list = [
            event(
                serde_json::json!({"instance_id": "web-1", "status": "ready", "generation": 2,
                "observed_at": "2026-11-29T23:36:48Z", "seq": 1, "boot_duration_ms": 1500}),
            ),
            event(
                serde_json::json!({"instance_id": "web-1", "status": "failed", "generation": 2,
                "reason_code": "healthcheck_failed", "error_message": "GET /healthz: 500",
                "observed_at": "2026-11-29T23:39:30Z", "seq": 2, "pending": true}),
            ),
        ];
        let t = table(&list, true, now);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[0].starts_with("TIME (UTC)") && lines[0].contains("INSTANCE"),
            "{t}"
        );
        assert!(
            lines[1].contains("2026-11-29 23:36:48") && lines[1].contains("3m12s"),
            "{t}"
        );
        assert!(
            lines[1].contains("ready") && lines[1].contains("booted in 1s"),
            "{t}"
        );
        assert!(
            lines[2].contains("healthcheck_failed")
                && lines[2].contains("(not yet delivered) GET /healthz: 500"),
            "{t}"
        );
        assert!(!table(&list, false, now).contains("INSTANCE"));
    }
}
