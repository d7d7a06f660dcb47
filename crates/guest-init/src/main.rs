//! `plfm-guest-init`: the `/init` of the platform initramfs. All work is in the library.

fn main() {
    plfm_guest_init::init::main()
}
