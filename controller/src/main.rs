//! `causeway-controller`: the Causeway control plane binary.

use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use causeway_api::registry::SourceKind;
use causeway_api::{TrustDomain, hex};
use causeway_controller::admin::{AdminState, router};
use causeway_controller::ca::Ca;
use causeway_controller::config::Config;
use causeway_controller::control::ControlServer;
use causeway_controller::enroll::{Enroller, now_unix, random_hex, sha256_hex};
use causeway_controller::mesh::{Mesh, MeshSettings};
use causeway_controller::store::Store;
use causeway_controller::{admin_server, logging, tls_listener};
use causeway_registry::{SourceOptions, spawn_sources};
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

/// Reads the admin credential, creating it (mode 0600) at first start.
fn admin_credential(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("admin.token");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let credential = random_hex(32);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            writeln!(f, "{credential}")?;
            f.sync_all()?;
            tracing::info!(path = %path.display(), "admin credential created");
            Ok(credential)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The address to put in tokens when none is configured.
fn default_advertise(listen: SocketAddr) -> String {
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    // The source address of this host's default route; connecting a UDP socket sends nothing.
    let ip = UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|()| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .unwrap_or_else(|_| std::net::Ipv4Addr::LOCALHOST.into());
    SocketAddr::new(ip, listen.port()).to_string()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
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
    if let Some(a) = args.advertise {
        cfg.control.advertise = Some(a);
    }
    if let Some(td) = args.trust_domain {
        cfg.trust_domain = td;
    }
    cfg.validate()?;
    let td: TrustDomain = cfg.trust_domain.parse()?;

    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set permissions on {}", cfg.data_dir.display()))?;
    // [store]: sled in <data_dir>/store (default) or etcd.
    let store: Arc<dyn Store> =
        causeway_controller::store_etcd::open_configured(&cfg.store, &cfg.data_dir)?;
    let ca = Arc::new(Ca::load_or_create(
        store.as_ref(),
        &cfg.ca,
        &td,
        now_unix(),
    )?);
    tracing::info!(fingerprint = %hex(&ca.fingerprint()), mode = ca.mode(), trust_domain = %td, "CA ready");
    let credential = admin_credential(&cfg.data_dir)?;

    // The mesh: restored from the store before any source answers.
    let configured: std::collections::BTreeSet<String> = cfg
        .sources
        .consul
        .iter()
        .map(|c| c.name.clone())
        .chain(cfg.sources.eureka.iter().map(|c| c.name.clone()))
        .chain(cfg.sources.kubernetes.iter().map(|c| c.name.clone()))
        .chain(cfg.sources.file.iter().map(|c| c.name.clone()))
        .collect();
    let now = now_unix();
    // Every unexpired certificate of every removed agent (see `Mesh::agent_removed`).
    let deny = store
        .agents()?
        .into_iter()
        .filter(|a| a.removed_at.is_some())
        .flat_map(|a| a.live_certs)
        .filter(|c| c.not_after > now)
        .map(|c| (c.serial, c.not_after))
        .collect();
    let mesh = Mesh::open(
        store.clone(),
        MeshSettings {
            vip_range: cfg.mesh.vip_range,
            agent_grace: cfg.mesh.agent_grace,
            history_len: cfg.mesh.history,
            control_on_loopback: cfg.control.listen.ip().is_loopback(),
        },
        ca.bundle_der().to_vec(),
        &configured,
        deny,
    )?;
    tracing::info!(
        version = mesh.version(),
        services = mesh.services().len(),
        "mesh restored from the store"
    );
    mesh.declare_sources(
        cfg.sources
            .consul
            .iter()
            .map(|c| (c.name.clone(), SourceKind::Consul))
            .chain(
                cfg.sources
                    .eureka
                    .iter()
                    .map(|c| (c.name.clone(), SourceKind::Eureka)),
            )
            .chain(
                cfg.sources
                    .kubernetes
                    .iter()
                    .map(|c| (c.name.clone(), SourceKind::Kubernetes)),
            )
            .chain(
                cfg.sources
                    .file
                    .iter()
                    .map(|c| (c.name.clone(), SourceKind::File)),
            ),
    );
    let (src_tx, mut src_rx) = tokio::sync::mpsc::channel(64);
    let _source_tasks = spawn_sources(&cfg.sources, &SourceOptions::default(), src_tx)
        .map_err(|e| anyhow::anyhow!("invalid sources: {}", e.problems.join("; ")))?;
    {
        let mesh = mesh.clone();
        tokio::spawn(async move {
            while let Some(update) = src_rx.recv().await {
                let source = update.source.clone();
                if let Err(e) = mesh.apply_source_update(update) {
                    tracing::error!(%source, error = %e, "cannot persist a registry update");
                }
            }
        });
    }

    let control = ControlServer::bind(cfg.control.listen, &ca)?;
    let control_addr = control.local_addr()?;
    let advertise = cfg
        .control
        .advertise
        .clone()
        .unwrap_or_else(|| default_advertise(control_addr));

    let tcp = tokio::net::TcpListener::bind(cfg.admin.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the admin API (set admin.listen or --admin-listen)",
                cfg.admin.listen
            )
        })?;
    let admin_addr = tcp.local_addr()?;
    let state = AdminState {
        store: store.clone(),
        ca: ca.clone(),
        credential_sha256: sha256_hex(credential.as_bytes()),
        tokens: cfg.tokens.clone(),
        advertise: advertise.clone(),
        mesh: mesh.clone(),
    };
    let app = router(state);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tls = match (&cfg.admin.tls_cert, &cfg.admin.tls_key) {
        (Some(cert), Some(key)) => Some(tls_listener::acceptor(
            &std::fs::read_to_string(cert)
                .with_context(|| format!("cannot read admin.tls_cert {}", cert.display()))?,
            &std::fs::read_to_string(key)
                .with_context(|| format!("cannot read admin.tls_key {}", key.display()))?,
        )?),
        _ => None,
    };
    let soft = admin_server::soft_fd_limit();
    let max_connections = admin_server::effective_max_connections(cfg.admin.max_connections, soft);
    if max_connections < cfg.admin.max_connections {
        tracing::warn!(
            configured = cfg.admin.max_connections,
            max_connections,
            soft_fd_limit = ?soft,
            "admin.max_connections lowered to fit the open-files limit (raise LimitNOFILE / ulimit -n)"
        );
    }
    let limits = admin_server::Limits {
        header_read_timeout: cfg.admin.header_read_timeout,
        idle_timeout: cfg.admin.idle_timeout,
        max_connections,
    };
    let admin_task = tokio::spawn(admin_server::serve(tcp, tls, app, limits, stop_rx));
    let scheme = if cfg.admin.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };

    let enroller = Arc::new(Enroller::new(
        store.clone(),
        ca.clone(),
        cfg.ca.workload_cert_ttl,
    ));
    let control = Arc::new(control);
    let control_task = {
        let control = control.clone();
        let max = cfg.control.max_request_bytes;
        let record = cfg.debug.record_requests_dir.clone();
        let (mesh, store) = (mesh.clone(), store.clone());
        tokio::spawn(async move { control.serve(enroller, mesh, store, max, record).await })
    };

    // Tell tests and tools where we listen (ports may be ephemeral).
    let endpoints = serde_json::json!({
        "admin": format!("{scheme}://{admin_addr}"),
        "control": control_addr.to_string(),
        "advertise": advertise,
        "ca_fingerprint": hex(&ca.fingerprint()),
        "pid": std::process::id(),
    });
    let tmp = cfg.data_dir.join("endpoints.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&endpoints)?)?;
    std::fs::rename(&tmp, cfg.data_dir.join("endpoints.json"))?;
    tracing::info!(admin = %format!("{scheme}://{admin_addr}"), control = %control_addr, %advertise, "controller ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    control.close();
    let _ = admin_task.await;
    control_task.abort();
    store.flush()?;
    Ok(())
}
