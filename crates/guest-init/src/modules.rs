//! Kernel modules shipped in the initramfs: the load order from `modules.dep` and the
//! loading with `finit_module(2)`.
//!
//! The initramfs (built by the node agent's `initramfs` module) holds, under
//! [`crate::settings::DEFAULT_MODULES_DIR`]: `modules.load` (the wanted modules, one path
//! per line, relative to the directory), `modules.dep` (the kernel's file restricted to
//! the shipped modules, same format), and the module files at those paths. Compressed
//! modules (`.ko.xz`, `.ko.zst`, `.ko.gz`) are shipped as they are and handed to the kernel
//! with `MODULE_INIT_COMPRESSED_FILE`, which needs a kernel built with
//! `CONFIG_MODULE_DECOMPRESS`. No `modules.load` means the kernel has everything built in.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;

use crate::{console, sys};

/// Parses `modules.dep`: `path: dep dep …` per line.
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, deps)| {
            (
                m.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            )
        })
        .filter(|(m, _)| !m.is_empty())
        .collect()
}

/// Parses `modules.load`: one module path per line, `#` comments and blanks ignored.
pub fn parse_modules_load(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Load order for `wanted`: every module after all its dependencies, each once, in the
/// order asked for otherwise. Refuses unknown modules and dependency cycles.
pub fn load_order(
    dep: &BTreeMap<String, Vec<String>>,
    wanted: &[String],
) -> Result<Vec<String>, String> {
    fn visit(
        m: &str,
        dep: &BTreeMap<String, Vec<String>>,
        done: &mut BTreeSet<String>,
        in_progress: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<(), String> {
        if done.contains(m) {
            return Ok(());
        }
        if in_progress.iter().any(|p| p == m) {
            return Err(format!(
                "module dependency cycle: {} -> {m}",
                in_progress.join(" -> ")
            ));
        }
        let deps = dep
            .get(m)
            .ok_or_else(|| format!("module {m} is not in modules.dep"))?;
        in_progress.push(m.to_string());
        // modules.dep lists dependencies so that the last one must be loaded first.
        for d in deps.iter().rev() {
            visit(d, dep, done, in_progress, out)?;
        }
        in_progress.pop();
        done.insert(m.to_string());
        out.push(m.to_string());
        Ok(())
    }
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for m in wanted {
        visit(m, dep, &mut done, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// Loads the modules listed in `<dir>/modules.load`, dependencies first. A module that
/// fails to load is reported on the console and skipped: the step that needs it fails
/// later with a precise message. Returns how many modules were loaded (or already
/// present).
pub fn load_modules(dir: &Path) -> Result<usize, String> {
    let load_path = dir.join("modules.load");
    let load = match std::fs::read_to_string(&load_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("read {}: {e}", load_path.display())),
    };
    let dep_path = dir.join("modules.dep");
    let dep = std::fs::read_to_string(&dep_path)
        .map_err(|e| format!("read {}: {e}", dep_path.display()))?;
    let order = load_order(&parse_modules_dep(&dep), &parse_modules_load(&load))?;
    let mut loaded = 0;
    for m in &order {
        let path = dir.join(m);
        let compressed = [".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .any(|s| m.ends_with(s));
        match File::open(&path).and_then(|f| sys::finit_module(&f, compressed)) {
            Ok(()) => loaded += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => loaded += 1,
            Err(e) => console::line(&format!("module {m}: load failed: {e}")),
        }
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";

    fn pos(order: &[String], m: &str) -> usize {
        order.iter().position(|o| o.ends_with(m)).unwrap()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let dep = parse_modules_dep(DEP);
        let wanted = parse_modules_load(
            "# wanted\nkernel/drivers/virtio/virtio_mmio.ko\nkernel/drivers/net/virtio_net.ko\n\nkernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko\nkernel/fs/overlayfs/overlay.ko\n",
        );
        let order = load_order(&dep, &wanted).unwrap();
        assert_eq!(order.len(), 10);
        let set: BTreeSet<_> = order.iter().collect();
        assert_eq!(set.len(), order.len(), "duplicates in {order:?}");
        assert!(pos(&order, "/virtio_ring.ko") < pos(&order, "/virtio_mmio.ko"));
        assert!(pos(&order, "/virtio.ko") < pos(&order, "/virtio_mmio.ko"));
        assert!(pos(&order, "/failover.ko") < pos(&order, "/net_failover.ko"));
        assert!(pos(&order, "/net_failover.ko") < pos(&order, "/virtio_net.ko"));
        assert!(pos(&order, "/vsock.ko") < pos(&order, "/vmw_vsock_virtio_transport_common.ko"));
        assert!(pos(&order, "_common.ko") < pos(&order, "/vmw_vsock_virtio_transport.ko"));
        assert_eq!(order.last().unwrap(), "kernel/fs/overlayfs/overlay.ko");
    }

    #[test]
    fn unknown_modules_and_cycles_are_refused() {
        let dep = parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n");
        assert!(load_order(&dep, &["a.ko".into()])
            .unwrap_err()
            .contains("cycle"));
        let dep = parse_modules_dep(DEP);
        assert!(load_order(&dep, &["nope.ko".into()])
            .unwrap_err()
            .contains("nope.ko"));
        assert!(load_order(&dep, &[]).unwrap().is_empty());
    }

    #[test]
    fn missing_modules_load_means_nothing_to_do() {
        assert_eq!(
            load_modules(Path::new("/nonexistent/plfm-modules")).unwrap(),
            0
        );
    }
}
