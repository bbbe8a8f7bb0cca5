//! `causeway-controller`: the Causeway control plane binary.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use causeway_controller::config::Config;
use causeway_controller::{app, logging};
use clap::{CommandFactory as _, Parser};

/// The Causeway controller: CA, join tokens, store and control endpoint.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Data directory (store, admin.token). Overrides `data_dir` in the config file.
    #[arg(long, env = "CAUSEWAY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file [default: /etc/causeway/controller.toml when it exists, else
    /// built-in defaults; the folder is $CAUSEWAY_CONFIG_DIR if set].
    #[arg(long, env = "CAUSEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Admin API listen address (default 127.0.0.1:15080).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Control endpoint UDP listen address (default 0.0.0.0:15012).
    #[arg(long)]
    control_listen: Option<SocketAddr>,
    /// Metrics (Prometheus) listen address (default 127.0.0.1:15014).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// `host:port` written into join tokens.
    #[arg(long)]
    advertise: Option<String>,
    /// SPIFFE trust domain (default causeway.local).
    #[arg(long)]
    trust_domain: Option<String>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// Without a subcommand the controller runs.
#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Print shell completions, e.g. `causeway-controller completions bash >
    /// /etc/bash_completion.d/causeway-controller`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `causeway-controller man | man -l -`.
    #[command(hide = true)]
    Man,
    /// Copy a single controller's sled store into etcd (CA, groups, tokens, agents,
    /// certificates, policies, registry cache), idempotently; with --check, compare them.
    /// etcd settings come from [store] in --config, or the flags below.
    Migrate {
        /// The controller's data dir (or its `store` directory). Stop that controller first.
        #[arg(long, value_name = "DIR")]
        from_sled: PathBuf,
        /// Write into etcd (the only target).
        #[arg(long, required = true)]
        to_etcd: bool,
        /// Compare instead of copying; exits non-zero when the two differ.
        #[arg(long)]
        check: bool,
        /// etcd client URLs (overrides [store] endpoints), e.g. http://10.0.0.9:2379.
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
        /// Key-encryption key file (overrides [store] kek_file).
        #[arg(long)]
        kek_file: Option<PathBuf>,
        /// Key prefix (overrides [store] prefix).
        #[arg(long)]
        prefix: Option<String>,
    },
}

/// `causeway-controller migrate`.
fn migrate(config: Option<&Path>, cmd: &Cmd) -> anyhow::Result<String> {
    let Cmd::Migrate {
        from_sled,
        check,
        endpoints,
        kek_file,
        prefix,
        ..
    } = cmd
    else {
        anyhow::bail!("not a migrate command");
    };
    let mut store = match config {
        Some(path) => Config::load(path)?.store,
        None => Default::default(),
    };
    if !endpoints.is_empty() {
        store.endpoints = endpoints.clone();
    }
    if let Some(k) = kek_file {
        store.kek_file = Some(k.clone());
    }
    if let Some(p) = prefix {
        store.prefix = p.clone();
    }
    causeway_controller::store_etcd::migrate_command(from_sled, &store, *check)
}

/// Writes to stdout; a reader that stopped early (`| head -3`) is not an error.
fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// Prints completions or the man page.
fn print_cli_doc(cmd: &Cmd) -> std::process::ExitCode {
    let mut buf = Vec::new();
    let rendered = match cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Args::command(),
                "causeway-controller",
                &mut buf,
            );
            Ok(())
        }
        Cmd::Man => clap_mangen::Man::new(Args::command())
            .section("8")
            .render(&mut buf),
        // Handled in main.
        Cmd::Migrate { .. } => Ok(()),
    };
    match rendered.and_then(|()| write_stdout(&buf)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(cmd @ Cmd::Migrate { .. }) = &args.command {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // The config as `run` finds it: --config, else the default file when it exists.
        let config = args.config.clone().or_else(|| {
            Some(
                std::env::var_os("CAUSEWAY_CONFIG_DIR")
                    .map_or_else(|| PathBuf::from("/etc/causeway"), PathBuf::from)
                    .join("controller.toml"),
            )
            .filter(|p| p.exists())
        });
        return match migrate(config.as_deref(), cmd) {
            Ok(text) => match write_stdout(text.as_bytes()) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(_) => std::process::ExitCode::FAILURE,
            },
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Some(cmd) = &args.command {
        return print_cli_doc(cmd);
    }
    logging::init("info");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            logging::fatal(&e);
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let default_path = std::env::var_os("CAUSEWAY_CONFIG_DIR")
        .map_or_else(|| PathBuf::from("/etc/causeway"), PathBuf::from)
        .join("controller.toml");
    let mut cfg = match args
        .config
        .or_else(|| Some(default_path.clone()).filter(|p| p.exists()))
    {
        Some(path) => {
            tracing::info!(path = %path.display(), "reading the configuration");
            Config::load(&path)?
        }
        None => {
            tracing::info!(
                "no {} and no --config: running on the built-in defaults",
                default_path.display()
            );
            Config::default()
        }
    };
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    if let Some(a) = args.admin_listen {
        cfg.admin.listen = a;
    }
    if let Some(a) = args.control_listen {
        cfg.control.listen = a;
    }
    if let Some(a) = args.metrics_listen {
        cfg.metrics.listen = a;
    }
    if let Some(a) = args.advertise {
        cfg.control.advertise = Some(a);
    }
    if let Some(td) = args.trust_domain {
        cfg.trust_domain = td;
    }
    let handle = app::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    handle.shutdown().await
}
