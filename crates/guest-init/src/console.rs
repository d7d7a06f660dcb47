//! Console output of guest init: one prefixed line per event on stderr (the VM's serial
//! console). The contract: callers pass text that contains no secret value; this module
//! adds nothing but the prefix. Once the log stream runs, each line also goes to the
//! host as stream `console` ([`crate::logs::console`]).

use std::io::Write;

/// Prefix of every console line.
pub const PREFIX: &str = "plfm-guest-init: ";

/// Writes one console line. Errors are ignored: PID 1 has nowhere else to report them.
pub fn line(msg: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{PREFIX}{msg}");
    drop(err);
    crate::logs::console(msg);
}
