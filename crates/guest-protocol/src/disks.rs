//! The virtio block devices of a VM: which disk is which, and what the guest kernel
//! calls it. Both ends follow this one rule: the VMMs attach the disks in this order,
//! and guest init finds them by these names.
//!
//! ```text
//! index 0            vda          root layer 0 (the bottom of the image's stack), read-only
//! index 1            vdb          scratch disk (overlay upper and work dirs)
//! index 2 … 1+V      vdc …        the V volumes in volume_id order
//! index 2+V …        …            root layers 1 … N-1, bottom to top, read-only
//! ```
//!
//! With one root layer (a flattened image) this is the layout of every VM before
//! stacks existed: `vda` root, `vdb` scratch, `vdc…` volumes. The upper layers come
//! after the volumes so that the volumes' names do not depend on the image.

/// Most root layers an image may stack (the guest refuses a config asking for more).
pub const MAX_ROOT_LAYERS: u32 = 16;

/// Most volumes an instance may attach.
pub const MAX_VOLUMES: usize = 24;

/// What a VM's disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskRole {
    /// Root layer `i` of the stack, bottom first (read-only).
    RootLayer(usize),
    /// The scratch disk.
    Scratch,
    /// The `i`-th volume in `volume_id` order.
    Volume(usize),
}

/// Name the guest kernel gives the virtio disk at `index` (the `index`-th virtio-blk
/// device): `vda` … `vdz`, then `vdaa` … `vdaz`, `vdba` …, `vdzz`, `vdaaa` …, as
/// Linux's virtio_blk names them (bijective base 26).
pub fn disk_name(index: usize) -> String {
    let mut letters = Vec::new();
    let mut n = index;
    loop {
        // n % 26 < 26, so the addition stays within 'a'..='z'.
        letters.push(b'a' + (n % 26) as u8);
        match (n / 26).checked_sub(1) {
            Some(rest) => n = rest,
            None => break,
        }
    }
    letters.reverse();
    format!("vd{}", String::from_utf8_lossy(&letters))
}

/// The disk index of root layer `layer` (0 = bottom) when the VM has `volumes` volumes.
pub fn root_layer_index(layer: usize, volumes: usize) -> usize {
    match layer {
        0 => 0,
        n => 2 + volumes + (n - 1),
    }
}

/// The disk index of the `i`-th volume in `volume_id` order.
pub fn volume_index(i: usize) -> usize {
    2 + i
}

/// Every disk of a VM with `layers` root layers and `volumes` volumes, in the order
/// the VMM attaches them (index 0 first), with the name the guest sees.
pub fn disk_order(layers: usize, volumes: usize) -> Vec<(String, DiskRole)> {
    let mut roles = Vec::with_capacity(layers + 1 + volumes);
    if layers > 0 {
        roles.push(DiskRole::RootLayer(0));
    }
    roles.push(DiskRole::Scratch);
    roles.extend((0..volumes).map(DiskRole::Volume));
    roles.extend((1..layers).map(DiskRole::RootLayer));
    roles
        .into_iter()
        .enumerate()
        .map(|(i, r)| (disk_name(i), r))
        .collect()
}

/// Checks a root-layer count: at least 1, at most [`MAX_ROOT_LAYERS`].
pub fn check_root_layers(n: u32) -> Result<usize, String> {
    if n == 0 {
        return Err("root_layers is 0: an image needs at least one root layer disk".into());
    }
    if n > MAX_ROOT_LAYERS {
        return Err(format!(
            "root_layers is {n}: at most {MAX_ROOT_LAYERS} root layer disks are supported"
        ));
    }
    usize::try_from(n).map_err(|_| format!("root_layers is {n}: not addressable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_linux_past_vdz() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 51, 52, 701, 702]
            .into_iter()
            .map(disk_name)
            .collect();
        assert_eq!(
            names,
            ["vda", "vdb", "vdz", "vdaa", "vdab", "vdaz", "vdba", "vdzz", "vdaaa"]
        );
    }

    #[test]
    fn one_layer_is_the_flat_layout() {
        let order = disk_order(1, 2);
        assert_eq!(
            order,
            vec![
                ("vda".to_string(), DiskRole::RootLayer(0)),
                ("vdb".to_string(), DiskRole::Scratch),
                ("vdc".to_string(), DiskRole::Volume(0)),
                ("vdd".to_string(), DiskRole::Volume(1)),
            ]
        );
    }

    #[test]
    fn upper_layers_come_after_the_volumes() {
        let order = disk_order(3, 2);
        let names: Vec<(&str, DiskRole)> = order.iter().map(|(n, r)| (n.as_str(), *r)).collect();
        assert_eq!(
            names,
            vec![
                ("vda", DiskRole::RootLayer(0)),
                ("vdb", DiskRole::Scratch),
                ("vdc", DiskRole::Volume(0)),
                ("vdd", DiskRole::Volume(1)),
                ("vde", DiskRole::RootLayer(1)),
                ("vdf", DiskRole::RootLayer(2)),
            ]
        );
        for (i, (_, role)) in order.iter().enumerate() {
            match role {
                DiskRole::RootLayer(l) => assert_eq!(root_layer_index(*l, 2), i),
                DiskRole::Volume(v) => assert_eq!(volume_index(*v), i),
                DiskRole::Scratch => assert_eq!(i, 1),
            }
        }
    }

    #[test]
    fn the_largest_vm_runs_past_vdz() {
        let order = disk_order(MAX_ROOT_LAYERS as usize, MAX_VOLUMES);
        assert_eq!(order.len(), 16 + 1 + 24);
        assert_eq!(order[25].0, "vdz");
        assert_eq!(order[26], ("vdaa".to_string(), DiskRole::RootLayer(1)));
        assert_eq!(order[40], ("vdao".to_string(), DiskRole::RootLayer(15)));
    }

    #[test]
    fn layer_counts_outside_one_to_sixteen_are_refused_by_value() {
        assert!(check_root_layers(0)
            .unwrap_err()
            .contains("root_layers is 0"));
        assert!(check_root_layers(17)
            .unwrap_err()
            .contains("root_layers is 17: at most 16"));
        assert_eq!(check_root_layers(1), Ok(1));
        assert_eq!(check_root_layers(16), Ok(16));
    }
}
