//! `plfm-node-agent`: the node agent daemon and its operator commands. Parses the
//! command line, loads the config, and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use plfm_node_agent::config::{Config, LogFormat};
use plfm_node_agent::{agent, cli};

/// The plfm node agent runs the instances the control plane assigns to this host as
/// microVMs and reports every status change.
///
/// Without a subcommand it runs the daemon. The other subcommands talk to a running
/// daemon through its local API: the Unix socket `[api] socket` of the same config
/// (default /run/plfm/agent.sock), usable by root and members of `[api] socket_group`.
#[derive(Parser)]
#[command(name = "plfm-node-agent", version, about, long_about)]
struct Cli {
    /// Agent configuration (TOML). Keys can be overridden with PLFM_<KEY> or
    /// PLFM_<TABLE>__<KEY> environment variables.
    #[arg(
        long,
        short,
        global = true,
        env = "PLFM_CONFIG",
        default_value = "/etc/plfm/node-agent.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent daemon (the default).
    Run,
    /// Validate the configuration and print it as the agent sees it (TOML).
    CheckConfig {
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
    /// List instances with status, reason code, exit code and restarts, and below them
    /// the node: its id, WireGuard public key, control-plane client certificate and the
    /// last certificate reload error.
    Status {
        /// Print JSON instead of a table (the instance list).
        #[arg(long)]
        json: bool,
        /// With --json: print `{"node": {...}, "overlay": {...}, "instances": [...]}`
        /// (node id, overlay address, WireGuard public key, client certificate, last
        /// reload error; the overlay as `overlay --json` prints it).
        #[arg(long)]
        node: bool,
    },
    /// Show the node's WireGuard overlay: interface, backend, public key, listen port,
    /// overlay address, generation, and each peer's endpoint, allowed IPs, last
    /// handshake and bytes; refused peers and the last apply error below. The public key
    /// is shown from the agent's first start on, also while the overlay is off.
    Overlay {
        /// Print JSON ({interface, backend, public_key, listen_port, node_overlay_ipv6,
        /// generation, peers: [{node_id, public_key, endpoint, allowed_ips,
        /// last_handshake_age_secs, rx_bytes, tx_bytes}], state, refused, ...}).
        #[arg(long)]
        json: bool,
    },
    /// Register this host with the control plane (`POST /v1/nodes/enroll`) and keep
    /// the node id and overlay address it answers in `<data_dir>/identity.json`.
    ///
    /// Run once per host, before the first start of the daemon (or with the daemon
    /// stopped). It sends the hostname, region and labels (`[node]` in the config, or
    /// the flags), the CPU cores and memory, the public addresses, this node's
    /// WireGuard public key (the key pair is created in `<data_dir>/overlay/` on first
    /// use) and the subject of `[control_plane] client_cert_file`. A node that has
    /// enrolled already says so and sends nothing: its id never changes. The token file
    /// must be readable by its owner only; the token is never printed or logged.
    Enroll(plfm_node_agent::enroll::EnrollArgs),
    /// Print an instance's workload logs (stdout, stderr and guest init's console
    /// lines), also a removed instance's while they are retained.
    Logs {
        /// Instance id.
        instance_id: String,
        /// Follow: print new lines as they come, until the instance stops.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only lines since an RFC 3339 time or a duration ago (10m, 2h).
        #[arg(long)]
        since: Option<String>,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
        /// Only this stream: stdout, stderr or console.
        #[arg(long)]
        stream: Option<String>,
        /// Print JSON lines ({ts, stream, line, truncated}).
        #[arg(long)]
        json: bool,
    },
    /// Stop one instance (reported as terminated_by_operator); it stays stopped, also
    /// across agent restarts, until `start` or a new spec.
    Stop {
        /// Instance id.
        instance_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drain the node: every instance stops (node_draining) and nothing new boots.
    Drain {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one instance in detail: spec summary, addresses, tap, disks, VMM pids,
    /// restarts, current status and its last reports.
    Describe {
        /// Instance id.
        instance_id: String,
        /// Print the full object as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the status reports of the node, or of one instance, newest last.
    Events {
        /// Instance id (all instances when left out).
        instance_id: Option<String>,
        /// Show at most this many reports (the newest).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Undo an operator stop: the instance runs again (its spec unchanged).
    Start {
        /// Instance id.
        instance_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// End a node drain: instances run again and new ones boot.
    Undrain {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a ready instance, like `docker exec`: `exec -it <id> -- /bin/sh`.
    /// The command runs in the workload's root with its environment and user; the exit
    /// code is the command's (125 when it could not run). At most 2 sessions per
    /// instance, 1 hour each.
    Exec {
        /// Keep standard input open and send it to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Allocate a pseudo-terminal (raw mode and resizes when this is a terminal).
        #[arg(short, long)]
        tty: bool,
        /// Instance id.
        instance_id: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Operator image commands (like `crictl pull`): pull and build a root disk, list
    /// the cache, evict unreferenced disks. They work with or without a running agent.
    Image {
        #[command(subcommand)]
        cmd: plfm_node_agent::image::ImageCommand,
    },
    /// Print a shell completion script (e.g. `plfm-node-agent completions bash >
    /// /etc/bash_completion.d/plfm-node-agent`). Needs no agent config.
    Completions {
        /// Shell.
        shell: cli::generate::Shell,
    },
    /// Print the man page (roff), or write one page per subcommand into a directory.
    /// Needs no agent config.
    Man {
        /// Write `plfm-node-agent.1`, `plfm-node-agent-status.1`, … here instead.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Build the platform initramfs (guest init + the kernel modules it needs). Needs no
    /// agent config.
    BuildInitramfs(plfm_node_agent::initramfs::BuildInitramfsArgs),
    /// Extract the uncompressed ELF `vmlinux` that Firecracker boots from a `bzImage`
    /// (LZ4, gzip or zstd payload; e.g. Debian's /boot/vmlinuz-*-cloud-amd64). Needs no
    /// agent config.
    ExtractVmlinux {
        /// The bzImage (e.g. /boot/vmlinuz-6.1.0-56-cloud-amd64).
        #[arg(long)]
        kernel: std::path::PathBuf,
        /// Where to write the ELF (e.g. /var/lib/plfm/guest/vmlinux).
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

/// Logs go to stderr as text or JSON (`[log] format`); when stderr is the journal
/// (`$JOURNAL_STREAM` names it: the agent runs as a systemd unit), to the journal's
/// native socket with structured fields instead (`PLFM_INSTANCE=…`,
/// `docs/operations.md`), or, if that socket is missing, as JSON with the same fields.
fn init_logging(config: &Config) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.level.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if plfm_node_agent::systemd::stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(journal) => {
                let journal = journal
                    .with_field_prefix(Some("PLFM".into()))
                    .with_syslog_identifier("plfm-node-agent".into());
                tracing_subscriber::registry()
                    .with(filter)
                    .with(journal)
                    .init();
            }
            Err(e) => {
                tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_writer(std::io::stderr)
                    .json()
                    .init();
                tracing::warn!(error = %e, "stderr is the journal but its socket /run/systemd/journal/socket cannot be used; logging JSON lines to stderr");
            }
        }
        return;
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    // Before anything is created: nothing the agent writes is for other users.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(
        plfm_node_agent::agent::DAEMON_UMASK,
    ));
    // ring is the one TLS crypto provider of the process (every HTTP client the
    // library builds also installs it first; this covers any it might miss).
    plfm_node_agent::control_plane::http::ensure_crypto_provider();
    // Before any thread exists: the notification socket and watchdog settings are taken
    // out of the environment (the VMMs the agent spawns must not inherit them).
    let notifier = std::sync::Arc::new(plfm_node_agent::systemd::Notifier::from_env());
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        None | Some(Command::Run) | Some(Command::Exec { .. })
    ) {
        // The operator commands die quietly of SIGPIPE when their reader goes away
        // (`events | head`), as other Unix tools do, instead of panicking on the
        // write; the daemon and `exec` (a live session on a socket, whose end is an
        // error to report) keep SIGPIPE ignored.
        // SAFETY: single-threaded at this point (no runtime started yet), and
        // SIG_DFL installs no handler code.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    match &cli.command {
        Some(Command::Completions { shell }) => {
            cli::generate::completions(Cli::command(), *shell, &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Some(Command::Man { out_dir }) => {
            let done = match out_dir {
                Some(dir) => cli::generate::man_pages(Cli::command(), dir).map(|files| {
                    for f in files {
                        println!("{}", f.display());
                    }
                }),
                None => cli::generate::man(Cli::command(), &mut std::io::stdout()),
            };
            return match done {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("plfm-node-agent: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    if let Some(Command::BuildInitramfs(args)) = &cli.command {
        return match plfm_node_agent::initramfs::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("plfm-node-agent: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::ExtractVmlinux { kernel, out }) = &cli.command {
        return match plfm_node_agent::vmlinux::extract_file(kernel, out) {
            Ok(x) => {
                println!(
                    "{}: {} payload → {} ({} bytes, x86_64 ELF)",
                    kernel.display(),
                    x.compression,
                    out.display(),
                    x.elf.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("plfm-node-agent: {}: {e}", kernel.display());
                ExitCode::FAILURE
            }
        };
    }
    // The commands that only talk to the local API do not read the control plane's TLS
    // files: they must work while a bad certificate waits to be replaced.
    let daemon_or_files = matches!(
        cli.command,
        None | Some(Command::Run) | Some(Command::CheckConfig { .. }) | Some(Command::Enroll(_))
    );
    let loaded = if daemon_or_files {
        Config::load(&cli.config, std::env::vars())
    } else {
        Config::load_for_operator(&cli.config, std::env::vars())
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("plfm-node-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("plfm-node-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = config.api.socket.clone();
    let api = || cli::Api::new(&socket);
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            init_logging(&config);
            runtime.block_on(agent::run_daemon(config, notifier))
        }
        Command::CheckConfig { json: false } => {
            println!("{}", toml::to_string_pretty(&config).unwrap_or_default());
            Ok(())
        }
        Command::CheckConfig { json: true } => serde_json::to_string_pretty(&config)
            .map(|j| println!("{j}"))
            .map_err(Into::into),
        Command::Status { json, node } => {
            api().and_then(|a| runtime.block_on(cli::status(&a, json, node)))
        }
        Command::Enroll(args) => {
            init_logging(&config);
            runtime
                .block_on(plfm_node_agent::enroll::run(&config, &args))
                .map(|r| {
                    println!(
                        "{}",
                        plfm_node_agent::enroll::describe(&r, &config.data_dir)
                    )
                })
        }
        Command::Stop { instance_id, json } => {
            api().and_then(|a| runtime.block_on(cli::stop(&a, &instance_id, json)))
        }
        Command::Logs {
            instance_id,
            follow,
            since,
            tail,
            stream,
            json,
        } => {
            let args = cli::LogsArgs {
                follow,
                since,
                tail,
                stream,
                json,
            };
            api().and_then(|a| runtime.block_on(cli::logs(&a, &instance_id, &args)))
        }
        Command::Drain { json } => api().and_then(|a| runtime.block_on(cli::drain(&a, json))),
        Command::Overlay { json } => {
            api().and_then(|a| runtime.block_on(cli::overlay::overlay(&a, json)))
        }
        Command::Start { instance_id, json } => {
            api().and_then(|a| runtime.block_on(cli::start(&a, &instance_id, json)))
        }
        Command::Describe { instance_id, json } => {
            api().and_then(|a| runtime.block_on(cli::describe::describe(&a, &instance_id, json)))
        }
        Command::Events {
            instance_id,
            limit,
            json,
        } => api().and_then(|a| {
            runtime.block_on(cli::events::events(&a, instance_id.as_deref(), limit, json))
        }),
        Command::Undrain { json } => api().and_then(|a| runtime.block_on(cli::undrain(&a, json))),
        Command::Exec {
            interactive,
            tty,
            instance_id,
            command,
        } => {
            let args = plfm_node_agent::exec::client::ExecArgs {
                instance_id,
                command,
                interactive,
                tty,
            };
            match runtime.block_on(plfm_node_agent::exec::client::run(&socket, args)) {
                // Exit at once: a blocked read of the terminal must not hold the
                // runtime's shutdown.
                Ok(code) => std::process::exit(code),
                Err(e) => {
                    eprintln!("plfm-node-agent: {e:#}");
                    std::process::exit(plfm_node_agent::exec::client::EXIT_NOT_RUN)
                }
            }
        }
        Command::Image { cmd } => {
            let data_dir = config.data_dir.clone();
            runtime.block_on(plfm_node_agent::image::run_cli(
                cmd,
                &data_dir,
                config.images,
            ))
        }
        Command::BuildInitramfs(_)
        | Command::ExtractVmlinux { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plfm-node-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
