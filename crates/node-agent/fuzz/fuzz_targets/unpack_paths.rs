//! Fuzz target for the layer unpacker: arbitrary inputs become layers of hostile
//! entries (or a raw tar stream). Unpacking on disk may fail but must never write
//! outside the build tree, and the same layers through the default direct builder
//! (in-memory tree, ext4 image) may be refused but must never panic or leave a
//! malformed image (see `image::testtar::check_unpack_containment` and
//! `check_direct_build`).
#![no_main]

use libfuzzer_sys::fuzz_target;

thread_local! {
    static SCRATCH: std::path::PathBuf = {
        // A tmpfs when there is one: each iteration fsyncs the disk it builds.
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let dir = base.join(format!("plfm-fuzz-unpack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    };
}

fuzz_target!(|data: &[u8]| {
    SCRATCH.with(|s| plfm_node_agent::image::testtar::check_unpack_containment(data, s));
});
