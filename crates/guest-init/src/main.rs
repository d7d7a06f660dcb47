//! `plfm-guest-init`: the `/init` of the platform initramfs. All work is in the library.

/// The handshake versions this guest init speaks, readable in the binary by the host
/// (`plfm_guest_protocol::protocols_in`), which advertises them to the control plane.
#[used]
static PROTOCOL_MARKER: [u8; plfm_guest_protocol::PROTOCOL_MARKER.len()] =
    plfm_guest_protocol::PROTOCOL_MARKER;

fn main() {
    // A use the optimiser and the linker cannot drop: the marker stays in the binary.
    std::hint::black_box(&PROTOCOL_MARKER);
    plfm_guest_init::init::main()
}
