//! `causeway-agent`: the Causeway node agent binary.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use causeway_agent::config::{AgentConfig, DEFAULT_STATE_DIR};
use causeway_agent::identity::{IdentityError, StateDir};
use causeway_agent::{client, dataplane, logging, run, status};
use causeway_api::JoinToken;
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};

/// The Causeway node agent.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enroll this host with a join token (one-shot). The key is made here and never sent.
    Join {
        /// The join token from `causewayctl token create` ("-" reads it from stdin).
        token: Option<String>,
        /// Read the token from this file instead.
        #[arg(long, conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// State directory.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Host name to report (default: this host's name).
        #[arg(long)]
        hostname: Option<String>,
        /// Join again even if this host already has an identity.
        #[arg(long)]
        force: bool,
    },
    /// Run the agent service.
    Run {
        /// TOML config file [default: /etc/causeway/agent.toml when it exists, else
        /// built-in defaults; the folder is $CAUSEWAY_CONFIG_DIR if set].
        #[arg(long, env = "CAUSEWAY_AGENT_CONFIG")]
        config: Option<PathBuf>,
        /// State directory (overrides the config file).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Workload address to register (default: the local address of the route to the controller).
        #[arg(long)]
        address: Option<std::net::IpAddr>,
        /// Do not install traffic capture rules (the data-plane listeners still run).
        #[arg(long)]
        no_capture: bool,
        /// Threads that run the proxy, DNS and control tasks. 1 (the default) is a
        /// single-threaded runtime: no hand-offs between threads per request, which
        /// measured faster than two on two-CPU VMs (BENCHMARKS.md). Raise it for hosts
        /// that proxy many busy connections at once.
        #[arg(long, env = "CAUSEWAY_AGENT_WORKER_THREADS", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..=256))]
        worker_threads: u16,
    },
    /// Compare the live capture rules with the ones the agent expects; non-zero on drift.
    Doctor {
        /// State directory.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Remove every Causeway capture rule on this host (leftovers included), a leftover
    /// DNS capture table, and restore resolv.conf changed by DNS "resolv-conf" mode; exit
    /// 0, also when there is nothing to do. The packaged unit runs it as ExecStopPost.
    Cleanup {
        /// State directory (its capture.rules file is removed too).
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Renew the certificate now (one-shot, over mutual TLS; no token needed).
    Renew {
        /// State directory.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Print shell completions, e.g. `causeway-agent completions bash >
    /// /etc/bash_completion.d/causeway-agent`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `causeway-agent man | man -l -`.
    #[command(hide = true)]
    Man,
    /// Show identity, expiry, controller connection and config version.
    Status {
        /// State directory.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init("info");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let threads = match &args.command {
        Command::Run { worker_threads, .. } => *worker_threads,
        _ => 1,
    };
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(threads))
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(args.command)) {
        Ok(code) => code,
        Err(e) => {
            logging::fatal(&e);
            ExitCode::FAILURE
        }
    }
}

/// The folder of the default config files: `$CAUSEWAY_CONFIG_DIR`, else /etc/causeway.
fn default_config_path(file: &str) -> PathBuf {
    std::env::var_os("CAUSEWAY_CONFIG_DIR")
        .map_or_else(|| PathBuf::from("/etc/causeway"), PathBuf::from)
        .join(file)
}

/// The config file to read: the one given (which must then exist), else the default one
/// when it exists, else none (built-in defaults).
fn config_file(given: Option<PathBuf>, file: &str) -> Option<PathBuf> {
    given.or_else(|| Some(default_config_path(file)).filter(|p| p.exists()))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn fmt_time(unix: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0).unsigned_abs()),
    )
    .to_string()
}

/// Writes to stdout; a reader that stopped early (`| head -3`) is not an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to stdout"))
        }
        _ => Ok(()),
    }
}

async fn dispatch(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Args::command(), "causeway-agent", &mut buf);
            write_stdout(&buf)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(Args::command())
                .section("8")
                .render(&mut buf)?;
            write_stdout(&buf)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Join {
            token,
            token_file,
            state_dir,
            hostname,
            force,
        } => {
            let text = match (token.as_deref(), token_file) {
                (_, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read token file {}", f.display()))?,
                (Some("-"), None) => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s)?;
                    s
                }
                (Some(t), None) => t.to_owned(),
                (None, None) => anyhow::bail!(
                    "give the join token as an argument, with --token-file FILE, or as \"-\" on stdin"
                ),
            };
            let token = JoinToken::decode(&text)?;
            let state = StateDir::new(state_dir);
            let id =
                client::join(&token, &state, &hostname.unwrap_or_else(host_name), force).await?;
            println!("joined as agent {}", id.info.agent_id);
            println!("identity:    {}", id.spiffe_id);
            println!("expires:     {}", fmt_time(id.not_after));
            println!(
                "state dir:   {} (key.pem stays on this host)",
                state.path().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            config,
            state_dir,
            address,
            no_capture,
            worker_threads: _,
        } => {
            let mut cfg = match config_file(config, "agent.toml") {
                Some(p) => {
                    tracing::info!(path = %p.display(), "reading the configuration");
                    AgentConfig::load(&p)?
                }
                None => {
                    tracing::info!(
                        "no {} and no --config: running on the built-in defaults",
                        default_config_path("agent.toml").display()
                    );
                    AgentConfig::default()
                }
            };
            if let Some(d) = state_dir {
                cfg.state_dir = d;
            }
            if address.is_some() {
                cfg.address = address;
            }
            if no_capture {
                cfg.dataplane.capture = false;
            }
            cfg.validate()?;
            // Handlers are installed now, not when the future is first polled: a SIGTERM
            // during start-up must still run the shutdown path (it removes capture rules).
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            let shutdown = async move {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            };
            run::run(cfg, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor { state_dir } => {
            // Without an identity there is no agent whose rules could be checked: saying
            // "as expected" would hide a wrong --state-dir.
            if !StateDir::new(&state_dir).is_joined() {
                return Err(IdentityError::NotJoined(state_dir).into());
            }
            let report = dataplane::doctor(&state_dir)?;
            println!(
                "agent: {}",
                if report.agent_running {
                    "running"
                } else {
                    "not running (no capture rules expected)"
                }
            );
            let dns = causeway_agent::dns::doctor(&state_dir, report.agent_running);
            println!("dns: {}", dns.summary);
            if dns.problems.is_empty() {
                println!("dns capture: as expected");
            } else {
                println!("dns capture: PROBLEM");
                for p in &dns.problems {
                    println!("  {p}");
                }
            }
            if report.drift.is_empty() {
                println!("capture rules: as expected");
                return Ok(if dns.problems.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(2)
                });
            }
            println!("capture rules: DRIFT");
            for l in &report.drift.missing {
                println!("  missing:    {l}");
            }
            for l in &report.drift.unexpected {
                println!("  unexpected: {l}");
            }
            println!(
                "fix: restart the agent (it removes leftovers and reinstalls its rules), or remove the unexpected rules"
            );
            Ok(ExitCode::from(2))
        }
        Command::Cleanup { state_dir } => {
            let n = dataplane::cleanup(&state_dir)?;
            println!("removed {n} Causeway rule line(s)");
            for line in causeway_agent::dns::cleanup(&state_dir) {
                println!("dns: {line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Renew { state_dir } => {
            let state = StateDir::new(state_dir);
            let id = state.load()?;
            let conn = client::connect_mtls(&id, &id.info.controller).await?;
            let new = client::renew(&conn, &state, &id).await?;
            conn.close(0u32.into(), b"done");
            println!(
                "renewed: serial {} expires {}",
                new.serial,
                fmt_time(new.not_after)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { state_dir, output } => {
            let s = status::status(&StateDir::new(state_dir))?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
                Output::Text => print!("{}", status::render(&s)),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
