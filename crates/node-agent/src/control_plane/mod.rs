//! Where desired state comes from and where status reports go.
//!
//! Standalone mode (this module's [`standalone`]) reads a local directory and delivers
//! reports to the state store's local sink. This module only brings plans in and hands
//! them to the supervisor; it never decides what to do with an instance.

pub mod standalone;
