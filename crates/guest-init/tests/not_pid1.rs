//! Guest init kills every other process and reboots at its end, so it must refuse to run
//! anywhere but as PID 1 (of a VM, or of a PID namespace in test mode).

use std::process::Command;

#[test]
fn refuses_to_run_unless_pid_1() {
    for test_mode in ["0", "1"] {
        let out = Command::new(env!("CARGO_BIN_EXE_plfm-guest-init"))
            .env_clear()
            .env("PLFM_GUEST_TEST_MODE", test_mode)
            .env("PLFM_GUEST_STAGING", "/nonexistent")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("refusing to run: must be PID 1"),
            "{stderr}"
        );
    }
}
