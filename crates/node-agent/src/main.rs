//! `plfm-node-agent`: thin binary over the library.
fn main() {}
