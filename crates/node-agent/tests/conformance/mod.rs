//! The runtime conformance suite (issue 12, item 6): every scenario of
//! [`scenarios`] is written once and run against every runtime — `mock` always,
//! `qemu` (real VMs under TCG) and `firecracker` (the stand-in VMM of
//! `tests/fc_standin/`) where the host allows. Each scenario is a test per runtime,
//! named `conformance::<runtime>::<scenario>`. A runtime that cannot play a scenario
//! says why it skips; a missing host prerequisite goes through the system-test gate
//! (`PLFM_REQUIRE_SYSTEM_TESTS=1` fails it). Fixtures: [`lab`].

pub mod lab;
pub mod scenarios;

/// One test per scenario for the runtime `$kind`. The list of scenarios is here, once.
macro_rules! runtime_suite {
    ($kind:expr) => {
        use super::lab::Kind;
        use super::scenarios as s;
        const KIND: Kind = $kind;

        #[test]
        fn ready_with_http_health_check() {
            s::ready_with_http_health_check(KIND)
        }
        #[test]
        fn ready_with_tcp_health_check() {
            s::ready_with_tcp_health_check(KIND)
        }
        #[test]
        fn health_check_that_never_passes_fails_with_healthcheck_failed() {
            s::health_check_that_never_passes_fails_with_healthcheck_failed(KIND)
        }
        #[test]
        fn workload_exit_0_is_stopped_with_exit_code_0() {
            s::workload_exit_0_is_stopped_with_exit_code_0(KIND)
        }
        #[test]
        fn workload_exit_3_fails_with_exit_code_3() {
            s::workload_exit_3_fails_with_exit_code_3(KIND)
        }
        #[test]
        fn workload_killed_by_sigkill_fails_with_exit_code_137() {
            s::workload_killed_by_sigkill_fails_with_exit_code_137(KIND)
        }
        #[test]
        fn guest_oom_fails_with_oom_killed() {
            s::guest_oom_fails_with_oom_killed(KIND)
        }
        #[test]
        fn vmm_killed_after_the_handshake_fails_without_reason_or_exit_code() {
            s::vmm_killed_after_the_handshake_fails_without_reason_or_exit_code(KIND)
        }
        #[test]
        fn drain_of_a_workload_ignoring_sigterm_is_forced_at_the_grace_deadline() {
            s::drain_of_a_workload_ignoring_sigterm_is_forced_at_the_grace_deadline(KIND)
        }
        #[test]
        fn agent_killed_while_ready_adopts_the_same_vm_without_a_report() {
            s::agent_killed_while_ready_adopts_the_same_vm_without_a_report(KIND)
        }
        #[test]
        fn agent_killed_between_vmm_spawn_and_record_leaves_no_orphan() {
            s::agent_killed_between_vmm_spawn_and_record_leaves_no_orphan(KIND)
        }
        #[test]
        fn cleanup_twice_leaves_nothing_behind() {
            s::cleanup_twice_leaves_nothing_behind(KIND)
        }
        #[test]
        fn next_event_for_an_unknown_vm_is_vmm_exited_at_once() {
            s::next_event_for_an_unknown_vm_is_vmm_exited_at_once(KIND)
        }
        #[test]
        fn non_utf8_secrets_fail_with_secrets_injection_failed() {
            s::non_utf8_secrets_fail_with_secrets_injection_failed(KIND)
        }
        #[test]
        fn image_user_is_the_workload_user() {
            s::image_user_is_the_workload_user(KIND)
        }
        #[test]
        fn a_guest_cannot_open_a_connection_to_another_guest() {
            s::a_guest_cannot_open_a_connection_to_another_guest(KIND)
        }
        #[test]
        fn vmm_processes_run_unprivileged_and_confined() {
            s::vmm_processes_run_unprivileged_and_confined(KIND)
        }
        #[test]
        fn a_vm_whose_sandbox_cannot_be_set_up_is_not_started() {
            s::a_vm_whose_sandbox_cannot_be_set_up_is_not_started(KIND)
        }
        #[test]
        fn resources_beyond_the_node_are_refused_naming_the_field() {
            s::resources_beyond_the_node_are_refused_naming_the_field(KIND)
        }
        #[test]
        fn data_dir_is_unreachable_for_a_local_user_while_a_vm_runs() {
            s::data_dir_is_unreachable_for_a_local_user_while_a_vm_runs(KIND)
        }
    };
}

pub mod mock {
    runtime_suite!(Kind::Mock);
}

pub mod qemu {
    runtime_suite!(Kind::Qemu);
}

pub mod firecracker {
    runtime_suite!(Kind::Firecracker);
}
