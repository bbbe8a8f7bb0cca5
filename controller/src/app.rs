//! The controller's wiring: store, CA, mesh, sources, the control endpoint and the
//! admin API, started together by [`start`] and stopped by [`Handle::shutdown`]. The
//! binary parses its arguments and configuration and calls [`start`]; tests call it to
//! run a controller in their own process.

use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use causeway_api::registry::SourceKind;
use causeway_api::{TrustDomain, hex};

use crate::admin::{AdminState, router};
use crate::ca::Ca;
use crate::config::Config;
use crate::control::{ControlServer, RequestObserver};
use crate::enroll::{Enroller, now_unix, random_hex, sha256_hex};
use crate::mesh::{Mesh, MeshSettings};
use crate::store::Store;
use crate::{admin_server, tls_listener};

/// What a caller may plug into a controller beyond its configuration. The binary uses
/// the default (nothing); tests use it to observe the running controller.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Sees every control request body as received (see [`RequestObserver`]).
    pub control_requests: Option<RequestObserver>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("control_requests", &self.control_requests.is_some())
            .finish()
    }
}

/// A running controller.
pub struct Handle {
    /// The admin API's base URL (`http://` or `https://` and the bound address).
    pub admin_url: String,
    /// The admin API's bound address.
    pub admin_addr: SocketAddr,
    /// The control endpoint's bound UDP address.
    pub control_addr: SocketAddr,
    /// The metrics endpoint's bound address.
    pub metrics_addr: SocketAddr,
    /// `host:port` written into join tokens.
    pub advertise: String,
    /// The CA fingerprint (hex of the SHA-256 of the root certificate).
    pub ca_fingerprint: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The mesh hub.
    pub mesh: Arc<Mesh>,
    store: Arc<dyn Store>,
    control: Arc<ControlServer>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    admin_task: tokio::task::JoinHandle<()>,
    control_task: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ha: crate::ha::Ha,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("admin_url", &self.admin_url)
            .field("control_addr", &self.control_addr)
            .field("advertise", &self.advertise)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Handle {
    /// Whether this controller leads its HA set (always on sled).
    pub fn is_leader(&self) -> bool {
        self.ha.role.borrow().is_leader()
    }

    /// This controller's role as it changes.
    pub fn role(&self) -> tokio::sync::watch::Receiver<crate::ha::Role> {
        self.ha.role.clone()
    }

    /// Stops accepting, lets the admin API finish its requests, closes the control
    /// endpoint and flushes the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop_tx.send(true);
        self.ha.resign().await;
        self.control.close();
        let _ = self.admin_task.await;
        self.control_task.abort();
        for t in &self.tasks {
            t.abort();
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .context("the store flush task failed")??;
        Ok(())
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

/// Starts a controller from `cfg` (checked here) with no hooks.
pub async fn start(cfg: Config) -> anyhow::Result<Handle> {
    start_with(cfg, Hooks::default()).await
}

/// Starts a controller from `cfg` (checked here) with `hooks`. Returns once every
/// listener is bound and `endpoints.json` is written in the data directory.
pub async fn start_with(cfg: Config, hooks: Hooks) -> anyhow::Result<Handle> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    cfg.validate()?;
    let td: TrustDomain = cfg.trust_domain.parse()?;

    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set permissions on {}", cfg.data_dir.display()))?;
    // [store]: sled in <data_dir>/store (default) or etcd.
    let store: Arc<dyn Store> = crate::store_etcd::open_configured(&cfg.store, &cfg.data_dir)?;
    let ca = Arc::new(Ca::load_or_create(
        store.as_ref(),
        &cfg.ca,
        &td,
        now_unix(),
    )?);
    tracing::info!(fingerprint = %hex(&ca.fingerprint()), mode = ca.mode(), trust_domain = %td, "CA ready");
    let credential = admin_credential(&cfg.data_dir)?;

    // The mesh: restored from the store before any source answers.
    let declared: Vec<(String, SourceKind)> = cfg
        .sources
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
        )
        .collect();
    let configured: std::collections::BTreeSet<String> =
        declared.iter().map(|(name, _)| name.clone()).collect();
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
    )
    .await?;
    tracing::info!(
        version = mesh.version(),
        services = mesh.services().len(),
        "mesh restored from the store"
    );
    let mut tasks = Vec::new();
    // On etcd the sources are declared (listed as pending until they answer) by the
    // leader when its term starts; a follower shows their states as stored.
    let mut declared = Some(declared);
    if cfg.store.backend == crate::config::StoreBackend::Sled {
        mesh.declare_sources(declared.take().unwrap_or_default());
        // One controller: it runs the sources for as long as it runs.
        let (src_tx, mut src_rx) = tokio::sync::mpsc::channel(64);
        tasks.extend(spawn_sources(&cfg, src_tx)?);
        let mesh = mesh.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(update) = src_rx.recv().await {
                let source = update.source.clone();
                if let Err(e) = mesh.apply_source_update(update).await {
                    tracing::error!(%source, error = %e, "cannot persist a registry update");
                }
            }
        }));
    } else {
        // Checked here so that a bad source stops the start as on sled; the sources
        // run while this controller leads (see `leader_duties`).
        let (check_tx, _) = tokio::sync::mpsc::channel(1);
        for t in spawn_sources(&cfg, check_tx)? {
            t.abort();
        }
    }

    // Metrics on a listener of their own (`[metrics] listen`).
    let (metrics_addr, metrics_task) =
        crate::metrics::spawn(cfg.metrics.listen, mesh.clone()).await?;
    tasks.push(metrics_task);

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
        let observer = hooks.control_requests.clone();
        let (mesh, store) = (mesh.clone(), store.clone());
        tokio::spawn(async move { control.serve(enroller, mesh, store, max, observer).await })
    };

    // HA on etcd: the election and the mesh follower (on sled: always the leader).
    let ha = crate::ha::start(
        &cfg.store,
        mesh.clone(),
        serde_json::json!({
            "advertise": advertise,
            "admin": admin_addr.to_string(),
            "pid": std::process::id(),
        })
        .to_string(),
    )?;
    if cfg.store.backend == crate::config::StoreBackend::Etcd {
        tasks.push(tokio::spawn(leader_duties(
            cfg.clone(),
            mesh.clone(),
            ha.role.clone(),
            declared.take().unwrap_or_default(),
        )));
    }

    // Tell tests and tools where we listen (ports may be ephemeral).
    let admin_url = format!("{scheme}://{admin_addr}");
    let ca_fingerprint = hex(&ca.fingerprint());
    let endpoints = serde_json::json!({
        "admin": admin_url,
        "control": control_addr.to_string(),
        "metrics": format!("http://{metrics_addr}"),
        "advertise": advertise,
        "ca_fingerprint": ca_fingerprint,
        "pid": std::process::id(),
    });
    let tmp = cfg.data_dir.join("endpoints.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&endpoints)?)?;
    std::fs::rename(&tmp, cfg.data_dir.join("endpoints.json"))?;
    tracing::info!(admin = %admin_url, control = %control_addr, %advertise, "controller ready");
    Ok(Handle {
        admin_url,
        admin_addr,
        control_addr,
        metrics_addr,
        advertise,
        ca_fingerprint,
        data_dir: cfg.data_dir.clone(),
        mesh,
        store,
        control,
        stop_tx,
        admin_task,
        control_task,
        tasks,
        ha,
    })
}

/// Runs the registry sources while this controller leads (HA on etcd): started on
/// winning the leadership (after reloading the mesh, so the first write builds on the
/// newest state), stopped on losing it. Each term's writes carry its fence.
async fn leader_duties(
    cfg: Config,
    mesh: Arc<Mesh>,
    mut role: tokio::sync::watch::Receiver<crate::ha::Role>,
    declared: Vec<(String, SourceKind)>,
) {
    /// Aborts the term's tasks when dropped, also when this task is aborted (shutdown).
    struct Term(Vec<tokio::task::JoinHandle<()>>);
    impl Drop for Term {
        fn drop(&mut self) {
            for t in &self.0 {
                t.abort();
            }
        }
    }
    loop {
        let current = role.borrow_and_update().clone();
        let mut running = Vec::new();
        if let crate::ha::Role::Leader(fence) = current {
            if let Err(e) = mesh.resync(false).await {
                tracing::warn!(error = %e, "cannot reload the mesh before running the sources");
            }
            mesh.declare_sources(declared.clone());
            let (tx, mut rx) = tokio::sync::mpsc::channel(64);
            match spawn_sources(&cfg, tx) {
                Ok(t) => running = t,
                Err(e) => tracing::error!(error = %e, "cannot start the registry sources"),
            }
            let mesh = mesh.clone();
            running.push(tokio::spawn(async move {
                while let Some(update) = rx.recv().await {
                    let source = update.source.clone();
                    if let Err(e) = mesh.apply_source_update_fenced(update, fence.clone()).await {
                        tracing::error!(%source, error = %e, "cannot persist a registry update");
                    }
                }
            }));
            tracing::info!(sources = running.len() - 1, "registry sources running");
        }
        let term = Term(running);
        let changed = role.changed().await;
        if !term.0.is_empty() {
            tracing::info!("registry sources stopped");
        }
        drop(term);
        if changed.is_err() {
            return;
        }
    }
}

/// Starts the configured registry sources.
fn spawn_sources(
    cfg: &Config,
    tx: tokio::sync::mpsc::Sender<causeway_registry::SourceUpdate>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    causeway_registry::spawn_sources(
        &cfg.sources,
        &causeway_registry::SourceOptions::default(),
        tx,
    )
    .map_err(|e| anyhow::anyhow!("invalid sources: {}", e.problems.join("; ")))
}
