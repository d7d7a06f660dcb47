//! Where desired state comes from and where status reports go.
//!
//! Standalone mode ([`standalone`]) reads a local directory and delivers reports to the
//! state store's local sink; connected mode ([`http`]) speaks the plfm node API v1. This module only brings plans in and hands
//! them to the supervisor; it never decides what to do with an instance.

pub mod http;
pub mod reload;
pub mod secrets;
pub mod standalone;
