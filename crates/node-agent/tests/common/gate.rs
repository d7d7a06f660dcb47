//! The system-test gate, one for every test crate of the workspace (the guest-init
//! tests include this file by path, so it uses `std` only).
//!
//! A system test needs things a build machine may lack (root, QEMU, a registry, a
//! kernel, KVM, the Firecracker stand-in). Without one, it skips: it prints
//! `SKIP <test>: system test prerequisite missing: <why>` and returns. With
//! `PLFM_REQUIRE_SYSTEM_TESTS=1` (CI, `scripts/test.sh` as root) a missing prerequisite
//! fails the test instead, so a broken environment cannot turn the suite green.
#![allow(dead_code)]

use std::io::Write;

/// The variable that turns a skip into a failure.
pub const REQUIRE_ENV: &str = "PLFM_REQUIRE_SYSTEM_TESTS";

/// Whether a missing prerequisite must fail the test (`PLFM_REQUIRE_SYSTEM_TESTS=1`).
pub fn system_tests_required() -> bool {
    std::env::var(REQUIRE_ENV).as_deref() == Ok("1")
}

/// A prerequisite is missing: panics under `PLFM_REQUIRE_SYSTEM_TESTS=1`, otherwise
/// prints the skip (straight to stderr: libtest swallows `eprintln!` of a passing test)
/// and returns, so the caller returns too.
pub fn skip_or_fail(why: &str) {
    assert!(
        !system_tests_required(),
        "system test prerequisite missing: {why} ({REQUIRE_ENV}=1)"
    );
    // libtest runs each test on a thread named after it.
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(|n| format!(" {n}"))
        .unwrap_or_default();
    let _ = writeln!(
        std::io::stderr(),
        "SKIP{test}: system test prerequisite missing: {why}"
    );
}

/// `Ok(v)` → `Some(v)`; `Err(why)` → [`skip_or_fail`]`(why)` → `None`.
pub fn require<T, E: std::fmt::Display>(found: Result<T, E>) -> Option<T> {
    match found {
        Ok(v) => Some(v),
        Err(why) => {
            skip_or_fail(&why.to_string());
            None
        }
    }
}

/// `true` when `present`, else [`skip_or_fail`]`(why)` and `false`.
pub fn present(present: bool, why: &str) -> bool {
    if !present {
        skip_or_fail(why);
    }
    present
}
