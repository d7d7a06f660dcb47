//! Fuzz target for the layer unpacker's path handling: arbitrary inputs become
//! layers of hostile entries (or a raw tar stream); unpacking may fail but must never
//! write outside the build tree (see `image::testtar::check_unpack_containment`).
#![no_main]

use libfuzzer_sys::fuzz_target;

thread_local! {
    static SCRATCH: std::path::PathBuf = {
        let dir = std::env::temp_dir().join(format!("plfm-fuzz-unpack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    };
}

fuzz_target!(|data: &[u8]| {
    SCRATCH.with(|s| plfm_node_agent::image::testtar::check_unpack_containment(data, s));
});
