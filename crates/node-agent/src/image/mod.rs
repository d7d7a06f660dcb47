//! OCI image pipeline (DESIGN §7).
pub mod config;
pub mod error;
pub mod reference;
pub mod testtar;
pub mod unpack;
