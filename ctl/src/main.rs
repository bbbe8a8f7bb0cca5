//! `causewayctl`: the operator CLI. It talks to the controller's admin API only.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use std::collections::BTreeMap;

use causeway_api::admin::{
    AgentView, CaView, ErrorBody, GroupCreate, GroupView, ServiceView, SourceView, TokenCreate,
    TokenCreated, TokenView,
};
use causeway_api::registry::Conflict;
use serde::de::DeserializeOwned;
use serde_json::Value;

mod analyze;
mod policy;
mod ui;

const DEFAULT_TOKEN_FILE: &str = "/var/lib/causeway/controller/admin.token";

/// Operate a Causeway mesh.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Admin API of the controller. Repeat it (or separate with commas) for the
    /// controllers of an HA set: the first that answers is used.
    #[arg(
        long,
        global = true,
        env = "CAUSEWAY_CONTROLLER",
        help_heading = "Global options",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:15080"
    )]
    controller: Vec<String>,
    /// File holding the admin credential (default: the controller's data dir).
    #[arg(
        long,
        global = true,
        env = "CAUSEWAY_ADMIN_TOKEN_FILE",
        help_heading = "Global options"
    )]
    admin_token_file: Option<PathBuf>,
    /// PEM CA certificate to trust for an https admin API.
    #[arg(
        long,
        global = true,
        env = "CAUSEWAY_CA_FILE",
        help_heading = "Global options"
    )]
    ca_file: Option<PathBuf>,
    /// Output format of list and show commands.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        help_heading = "Global options"
    )]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Workload groups: the templates VMs join into.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Enrolled agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// The certificate authority.
    #[command(subcommand)]
    Ca(CaCmd),
    /// The merged registry.
    #[command(subcommand)]
    Registry(RegistryCmd),
    /// Create or update policy resources (AuthorizationPolicy, PeerAuthentication,
    /// RequestAuthentication) and routing resources (VirtualService, DestinationRule) from
    /// Istio YAML or JSON; all or nothing.
    Apply {
        /// A file, a directory, or - for standard input (repeatable).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Namespace for resources that name none.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Validate and show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List or show policy and routing resources: KIND is authorizationpolicies (ap),
    /// peerauthentications (pa), requestauthentications (ra), virtualservices (vs) or
    /// destinationrules (dr).
    Get {
        /// The kind.
        kind: String,
        /// One resource's name.
        name: Option<String>,
        /// The namespace (default: default).
        #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Delete policy or routing resources named in files, or one by KIND NAME.
    Delete {
        /// The kind (with NAME).
        kind: Option<String>,
        /// The name (with KIND).
        name: Option<String>,
        /// Files naming the resources to delete (repeatable).
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// The namespace (default: default).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Explain whether a connection would be allowed, and by which policy, and how the
    /// source's agent routes it (VirtualService, route, subset, DestinationRule policy,
    /// endpoints).
    Why {
        /// The source: a group name, an agent id or an IP address.
        #[arg(long)]
        from: String,
        /// The destination: NAME[:PORT], NAME.NAMESPACE[:PORT], a mesh DNS name or an address.
        #[arg(long)]
        to: String,
        /// HTTP method (evaluates HTTP rules).
        #[arg(long)]
        method: Option<String>,
        /// HTTP path.
        #[arg(long)]
        path: Option<String>,
        /// HTTP header K=V (repeatable).
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// A JWT the request carries, or a file holding one: checked against the
        /// destination's RequestAuthentications (signature too with an inline jwks) and
        /// its principal and claims given to the policies.
        #[arg(long, value_name = "TOKEN|FILE")]
        jwt: Option<String>,
        /// A claim KEY=VALUE of the request's token (repeatable; a repeated key is a list,
        /// `[a][b]=v` a nested claim); without --jwt, the request is taken as carrying a
        /// valid token with these claims (give iss and sub for a request principal).
        #[arg(long = "claim", value_parser = parse_claim, value_name = "KEY=VALUE")]
        claims: Vec<(String, String)>,
    },
    /// Open the controller's web UI: prints a one-time login URL (valid 60 s).
    Ui(ui::UiArgs),
    /// Report what is wrong or about to go wrong: registries, agents, config push,
    /// policies, data plane; and policy files before applying them (docs/analyze.md).
    Analyze(analyze::AnalyzeArgs),
    /// Print shell completions, e.g. `causewayctl completions bash >
    /// /etc/bash_completion.d/causewayctl`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `causewayctl man | man -l -`.
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    /// Create a workload group.
    Create {
        /// Group name.
        name: String,
        /// Mesh namespace.
        #[arg(long)]
        namespace: String,
        /// Service account (last part of the SPIFFE ID).
        #[arg(long)]
        service_account: String,
        /// Service the VMs offer.
        #[arg(long)]
        service: Option<String>,
        /// Named port NAME:PORT (repeatable).
        #[arg(long = "port")]
        ports: Vec<String>,
        /// Label KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Networks allowed to join (repeatable).
        #[arg(long = "cidr")]
        cidrs: Vec<ipnet::IpNet>,
        /// mTLS mode of the group's workloads: writes the equivalent workload-level
        /// PeerAuthentication `group-<name>`. Without it, namespace and mesh
        /// PeerAuthentications apply (PERMISSIVE when there is none).
        #[arg(long, value_parser = ["strict", "permissive"])]
        mtls: Option<String>,
        /// Join from an existing registry: SOURCE/SERVICE names a configured registry
        /// source (Consul, Eureka…) and the service as the mesh names it there. Each
        /// agent is bound to that registration at its own address: one endpoint with
        /// the source's provenance and the agent's identity. Sets --service if absent.
        #[arg(long, value_name = "SOURCE/SERVICE")]
        registry_service: Option<String>,
    },
    /// List groups.
    List,
    /// Show one group.
    Show {
        /// Group name.
        name: String,
    },
    /// Delete a group and its join tokens (refused while it has active agents).
    Delete {
        /// Group name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create a join token; prints the token alone on stdout.
    Create {
        /// Group to join into.
        #[arg(long)]
        group: String,
        /// Lifetime, e.g. 1h, 30m (default: the controller's tokens.default_ttl).
        #[arg(long)]
        ttl: Option<humantime::Duration>,
        /// How many joins it allows.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Source networks allowed to use it (repeatable).
        #[arg(long = "cidr")]
        cidrs: Vec<ipnet::IpNet>,
    },
    /// List tokens (never their secrets) with their state: active, spent, expired,
    /// revoked, or orphaned (made for a group that was deleted).
    List,
    /// Revoke a token at once: it joins nothing from now on (agents that joined with it
    /// stay; remove them with `agent remove`).
    Revoke {
        /// Token id (see `token list`).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCmd {
    /// List agents.
    List,
    /// Show one agent.
    Show {
        /// Agent id.
        id: String,
    },
    /// Remove an agent: every unexpired certificate it was issued goes on the deny list
    /// pushed to every agent (new tunnel connections refused, open ones cut) and its
    /// renewals are refused.
    Remove {
        /// Agent id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum RegistryCmd {
    /// List services with their VIPs, endpoints and sources.
    List,
    /// Show one service: NAME (namespace default) or NAMESPACE/NAME.
    Show {
        /// The service.
        name: String,
    },
    /// List the registry sources and their state.
    Sources,
    /// List disagreements between sources.
    Conflicts,
}

#[derive(Subcommand, Debug)]
enum CaCmd {
    /// Show the CA fingerprint, mode and trust bundle.
    Show,
}

struct Api {
    /// The admin API URLs, in order of preference (`--controller`, repeated).
    bases: Vec<String>,
    /// The one that answered last (tried first).
    current: std::sync::atomic::AtomicUsize,
    credential: String,
    http: reqwest::Client,
}

impl Api {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        let token_file = cli
            .admin_token_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_TOKEN_FILE));
        let credential = std::fs::read_to_string(&token_file)
            .with_context(|| {
                format!(
                    "cannot read the admin credential {}: pass --admin-token-file FILE (or set CAUSEWAY_ADMIN_TOKEN_FILE) to the controller's <data-dir>/admin.token",
                    token_file.display()
                )
            })?
            .trim()
            .to_owned();
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        let bases: Vec<String> = cli
            .controller
            .iter()
            .map(|c| c.trim().trim_end_matches('/').to_owned())
            .filter(|c| !c.is_empty())
            .collect();
        if bases.is_empty() {
            bail!(
                "--controller is empty: give the admin API URL, e.g. --controller http://127.0.0.1:15080 (repeat it for several controllers)"
            );
        }
        if !bases.iter().any(|c| c.starts_with("https://")) {
            // Plain http needs no roots; loading the system's fails on hosts without the
            // ca-certificates package (minimal VMs), which broke every command there.
            builder = builder.tls_certs_only([]);
        }
        if let Some(ca) = &cli.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read --ca-file {}", ca.display()))?;
            builder =
                builder.add_root_certificate(reqwest::Certificate::from_pem(&pem).with_context(
                    || format!("--ca-file {} is not a PEM certificate", ca.display()),
                )?);
        }
        Ok(Self {
            bases,
            current: std::sync::atomic::AtomicUsize::new(0),
            credential,
            http: builder.build()?,
        })
    }

    /// Sends a request; returns the JSON answer as received (`null` when empty).
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        // The first controller that answers, from the one that answered last. Only a
        // request that could not connect moves on: one that was sent may have been
        // applied, so it is never sent twice.
        let n = self.bases.len();
        let start = self.current.load(std::sync::atomic::Ordering::Relaxed) % n;
        let mut unreachable = Vec::new();
        let mut answered = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let base = &self.bases[idx];
            let mut req = self
                .http
                .request(method.clone(), format!("{base}{path}"))
                .bearer_auth(&self.credential);
            if let Some(b) = &body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(resp) => {
                    self.current
                        .store(idx, std::sync::atomic::Ordering::Relaxed);
                    answered = Some(resp);
                    break;
                }
                Err(e) if e.is_connect() && i + 1 < n => unreachable.push(send_error(base, &e)),
                Err(e) => {
                    unreachable.push(send_error(base, &e));
                    bail!("{}", unreachable.join("; "));
                }
            }
        }
        let resp = answered.context("no controller answered")?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let msg = serde_json::from_value::<ErrorBody>(value.clone())
                .map(|e| e.error)
                .unwrap_or_else(|_| value.to_string());
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        Ok(value)
    }

    /// Sends a request and decodes the answer into the API type shared with the
    /// controller (`causeway_api::admin`). A field this causewayctl expects and the answer
    /// lacks is an error naming it, never a silent "-".
    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Answer<T>> {
        let what = format!("{method} {path}");
        let raw = self.send(method, path, body).await?;
        let typed = decode(&what, &raw)?;
        Ok(Answer { typed, raw })
    }
}

impl Api {
    /// The admin API URL in use (the one that answered last).
    fn base(&self) -> &str {
        &self.bases[self.current.load(std::sync::atomic::Ordering::Relaxed) % self.bases.len()]
    }
}

/// An answer in the shared API type, with the JSON as received: `--output json|yaml`
/// print the JSON as the controller sent it.
struct Answer<T> {
    typed: T,
    raw: Value,
}

/// Decodes an answer; the error names the request and the field.
fn decode<T: DeserializeOwned>(what: &str, raw: &Value) -> anyhow::Result<T> {
    serde_path_to_error::deserialize(raw.clone()).map_err(|e| {
        let path = e.path().to_string();
        anyhow::anyhow!(
            "the controller's answer to {what} does not match this causewayctl ({}{}); run a causewayctl of the controller's version",
            if path == "." { String::new() } else { format!("at {path}: ") },
            e.into_inner()
        )
    })
}

/// Why a request got no HTTP answer: nothing listening (or no route) is told apart from a
/// server that answered in another protocol (https:// to a plain HTTP admin API, or the
/// reverse), and a TLS certificate that is not trusted.
fn send_error(base: &str, e: &reqwest::Error) -> String {
    use std::io::ErrorKind as K;
    let chain = causeway_api::error_chain(e);
    let mut tls = None;
    let mut io_kind = None;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        // An io::Error hides the error it wraps from source(): look inside it too.
        let mut inner = Some(c);
        while let Some(i) = inner {
            inner = None;
            if let Some(t) = i.downcast_ref::<rustls::Error>() {
                tls = Some(t.clone());
            } else if let Some(io) = i.downcast_ref::<std::io::Error>() {
                io_kind = io_kind.or(Some(io.kind()));
                inner = io
                    .get_ref()
                    .map(|w| w as &(dyn std::error::Error + 'static));
            }
        }
        cause = c.source();
    }
    let https = base.starts_with("https:");
    if e.is_timeout() {
        return format!(
            "the controller at {base} did not answer within 30 s ({chain}); is the address right? (set --controller or CAUSEWAY_CONTROLLER)"
        );
    }
    match tls {
        Some(rustls::Error::InvalidCertificate(_))
        | Some(rustls::Error::NoCertificatesPresented) => {
            return format!(
                "the controller at {base} answered, but its TLS certificate is not trusted ({chain}); pass the CA that signed the admin API's certificate with --ca-file (or CAUSEWAY_CA_FILE)"
            );
        }
        Some(_) => {
            return format!(
                "the controller at {base} is reachable, but the TLS handshake failed ({chain}); if its admin API serves plain HTTP (no admin.tls_cert in controller.toml), use {}",
                base.replacen("https:", "http:", 1)
            );
        }
        None => {}
    }
    let unreachable = matches!(
        io_kind,
        Some(
            K::ConnectionRefused
                | K::HostUnreachable
                | K::NetworkUnreachable
                | K::AddrNotAvailable
                | K::TimedOut
                | K::NotFound
        )
    );
    if e.is_connect() && (unreachable || !https) {
        return format!(
            "cannot reach the controller at {base} ({chain}); is causeway-controller running and listening there? (set --controller or CAUSEWAY_CONTROLLER; the admin API listens on http://127.0.0.1:15080 by default)"
        );
    }
    if !https {
        return format!(
            "the controller at {base} is reachable, but did not answer in HTTP ({chain}); if its admin API serves HTTPS (admin.tls_cert in controller.toml), use {} with --ca-file",
            base.replacen("http:", "https:", 1)
        );
    }
    format!(
        "the request to the controller at {base} failed ({chain}); is causeway-controller running there? (set --controller or CAUSEWAY_CONTROLLER)"
    )
}

/// A value, or "-" when there is none.
fn opt(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Unix seconds as RFC 3339.
fn time(t: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(t.max(0).unsigned_abs()),
    )
    .to_string()
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(headers.iter().map(|h| (*h).to_owned()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

fn parse_claim(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| {
            format!("claim {s:?}: expected KEY=VALUE (e.g. groups=admin, [org][team]=pay)")
        })
}

/// `--jwt`: a token, or a file holding one.
fn read_jwt(arg: &str) -> anyhow::Result<String> {
    let path = std::path::Path::new(arg);
    if arg.split('.').count() != 3 || path.exists() {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!(
                "--jwt {arg:?}: neither a token (three dot-separated parts) nor a readable file: {e}"
            )
        })?;
        let token = text.trim();
        anyhow::ensure!(
            token.split('.').count() == 3,
            "--jwt {arg}: the file does not hold a JWT (three dot-separated parts)"
        );
        return Ok(token.to_owned());
    }
    Ok(arg.to_owned())
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("header {s:?}: expected NAME=VALUE"))
}

fn print(output: Output, value: &Value, text: impl FnOnce(&Value) -> String) {
    match output {
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(value).unwrap_or_default()),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
        Output::Text => print!("{}", text(value)),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    use reqwest::Method;
    match &cli.command {
        Command::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "causewayctl", &mut buf);
            return write_stdout(&buf);
        }
        Command::Man => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut buf)?;
            return write_stdout(&buf);
        }
        _ => {}
    }
    if let Command::Analyze(args) = &cli.command {
        let api = if args.offline {
            None
        } else {
            Some(Api::new(&cli)?)
        };
        return analyze::run(api.as_ref(), cli.output, args).await;
    }
    let api = Api::new(&cli)?;
    let out = cli.output;
    match &cli.command {
        Command::Completions { .. } | Command::Man | Command::Analyze(_) => {
            unreachable!("handled above")
        }
        Command::Apply {
            files,
            namespace,
            dry_run,
        } => policy::apply(&api, out, files, namespace.as_deref(), *dry_run).await?,
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
        } => {
            policy::get(
                &api,
                out,
                kind,
                name.as_deref(),
                namespace.as_deref(),
                *all_namespaces,
            )
            .await?
        }
        Command::Delete {
            kind,
            name,
            files,
            namespace,
        } => {
            policy::delete(
                &api,
                out,
                files,
                kind.as_deref(),
                name.as_deref(),
                namespace.as_deref(),
            )
            .await?
        }
        Command::Ui(args) => ui::run(&api, args).await?,
        Command::Why {
            from,
            to,
            method,
            path,
            headers,
            jwt,
            claims,
        } => {
            let req = causeway_api::policy::api::WhyRequest {
                from: from.clone(),
                to: to.clone(),
                method: method.clone(),
                path: path.clone(),
                headers: headers.clone(),
                jwt: jwt.as_deref().map(read_jwt).transpose()?,
                claims: claims.clone(),
            };
            policy::why(&api, out, req).await?
        }
        Command::Group(GroupCmd::Create {
            name,
            namespace,
            service_account,
            service,
            ports,
            labels,
            cidrs,
            mtls,
            registry_service,
        }) => {
            let (registry_source, service) = match registry_service {
                None => (None, service.clone()),
                Some(rs) => {
                    let Some((source, svc)) = rs
                        .split_once('/')
                        .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains('/'))
                    else {
                        bail!(
                            "--registry-service {rs:?} is not SOURCE/SERVICE; write e.g. --registry-service consul-dc1/web"
                        );
                    };
                    if let Some(given) = service
                        && given != svc
                    {
                        bail!(
                            "--service {given:?} and --registry-service {rs:?} name different services; drop --service or make them equal"
                        );
                    }
                    (Some(source.to_owned()), Some(svc.to_owned()))
                }
            };
            let mut label_map = BTreeMap::new();
            for l in labels {
                let (k, v) = l
                    .split_once('=')
                    .with_context(|| format!("label {l:?} must be KEY=VALUE"))?;
                label_map.insert(k.to_owned(), v.to_owned());
            }
            let body = GroupCreate {
                name: name.clone(),
                namespace: namespace.clone(),
                service_account: service_account.clone(),
                service,
                ports: ports.clone(),
                labels: label_map,
                allowed_cidrs: cidrs.clone(),
                mtls: mtls.clone(),
                registry_source,
            };
            let a: Answer<GroupView> = api
                .call(
                    Method::POST,
                    "/v1/groups",
                    Some(serde_json::to_value(body)?),
                )
                .await?;
            let g = &a.typed.group;
            print(out, &a.raw, |_| {
                format!(
                    "group {} created (namespace {}, service account {})\n",
                    g.name, g.namespace, g.service_account
                )
            });
        }
        Command::Group(GroupCmd::List) => {
            let a: Answer<Vec<GroupView>> = api.call(Method::GET, "/v1/groups", None).await?;
            print(out, &a.raw, |_| {
                let rows = a
                    .typed
                    .iter()
                    .map(|g| {
                        let g = &g.group;
                        let ports = g
                            .ports
                            .iter()
                            .map(|p| format!("{}:{}", p.name, p.port))
                            .collect::<Vec<_>>()
                            .join(",");
                        vec![
                            g.name.clone(),
                            g.namespace.clone(),
                            g.service_account.clone(),
                            opt(g.service.as_ref()),
                            ports,
                            g.mtls.to_string(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "NAME",
                        "NAMESPACE",
                        "SERVICE ACCOUNT",
                        "SERVICE",
                        "PORTS",
                        "MTLS",
                    ],
                    rows,
                )
            });
        }
        Command::Group(GroupCmd::Show { name }) => {
            let a: Answer<GroupView> = api
                .call(Method::GET, &format!("/v1/groups/{name}"), None)
                .await?;
            print(out, &a.raw, |v| {
                format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
            });
        }
        Command::Group(GroupCmd::Delete { name }) => {
            api.send(Method::DELETE, &format!("/v1/groups/{name}"), None)
                .await?;
            eprintln!("group {name} deleted");
        }
        Command::Token(TokenCmd::Create {
            group,
            ttl,
            uses,
            cidrs,
        }) => {
            let body = TokenCreate {
                group: group.clone(),
                ttl_secs: ttl.map(|d| Duration::from(d).as_secs()),
                uses: Some(*uses),
                cidrs: cidrs.clone(),
            };
            let a: Answer<TokenCreated> = api
                .call(
                    Method::POST,
                    "/v1/tokens",
                    Some(serde_json::to_value(body)?),
                )
                .await?;
            if out == Output::Json {
                println!("{}", serde_json::to_string_pretty(&a.raw)?);
            } else {
                let t = &a.typed;
                println!("{}", t.token);
                if std::io::stderr().is_terminal() {
                    eprintln!(
                        "token {} for group {}: {} use(s), expires {}",
                        t.id,
                        t.group,
                        t.uses,
                        time(t.expires_at)
                    );
                }
            }
        }
        Command::Token(TokenCmd::List) => {
            let a: Answer<Vec<TokenView>> = api.call(Method::GET, "/v1/tokens", None).await?;
            print(out, &a.raw, |_| {
                let rows = a
                    .typed
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.group.clone(),
                            t.state.to_string(),
                            format!("{}/{}", t.uses_left, t.uses_total),
                            time(t.expires_at),
                        ]
                    })
                    .collect();
                table(&["ID", "GROUP", "STATE", "USES LEFT", "EXPIRES"], rows)
            });
        }
        Command::Token(TokenCmd::Revoke { id }) => {
            let a: Answer<TokenView> = api
                .call(Method::DELETE, &format!("/v1/tokens/{id}"), None)
                .await?;
            print(out, &a.raw, |_| {
                format!(
                    "join token {} (group {}) revoked; joins with it are refused\n",
                    a.typed.id, a.typed.group
                )
            });
        }
        Command::Agent(AgentCmd::List) => {
            let a: Answer<Vec<AgentView>> = api.call(Method::GET, "/v1/agents", None).await?;
            print(out, &a.raw, |_| {
                let rows = a
                    .typed
                    .iter()
                    .map(|a| {
                        vec![
                            a.id.clone(),
                            a.identity.clone(),
                            a.hostname.clone(),
                            a.address.to_string(),
                            time(a.not_after),
                            if a.removed { "removed" } else { "active" }.to_owned(),
                        ]
                    })
                    .collect();
                table(
                    &["ID", "IDENTITY", "HOST", "ADDRESS", "CERT EXPIRES", "STATE"],
                    rows,
                )
            });
        }
        Command::Agent(AgentCmd::Show { id }) => {
            let a: Answer<AgentView> = api
                .call(Method::GET, &format!("/v1/agents/{id}"), None)
                .await?;
            print(out, &a.raw, |v| {
                format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
            });
        }
        Command::Agent(AgentCmd::Remove { id }) => {
            let a: Answer<AgentView> = api
                .call(Method::DELETE, &format!("/v1/agents/{id}"), None)
                .await?;
            print(out, &a.raw, |_| {
                format!(
                    "agent {} removed; its certificates are denied (newest {}) and will not be renewed\n",
                    a.typed.id, a.typed.serial
                )
            });
        }
        Command::Registry(RegistryCmd::List) => {
            let a: Answer<Vec<ServiceView>> = api.call(Method::GET, "/v1/registry", None).await?;
            print(out, &a.raw, |_| {
                let rows = a
                    .typed
                    .iter()
                    .map(|svc| {
                        let healthy = svc.endpoints.iter().filter(|e| e.healthy).count();
                        let stale = svc.endpoints.iter().filter(|e| e.stale).count();
                        let sources = svc
                            .sources
                            .iter()
                            .map(String::as_str)
                            .collect::<Vec<_>>()
                            .join(",");
                        vec![
                            format!("{}/{}", svc.namespace, svc.name),
                            opt(svc.vip),
                            format!("{healthy}/{}", svc.endpoints.len()),
                            if stale > 0 {
                                format!("{stale} stale")
                            } else {
                                String::new()
                            },
                            sources,
                        ]
                    })
                    .collect();
                table(&["SERVICE", "VIP", "HEALTHY", "STALE", "SOURCES"], rows)
            });
        }
        Command::Registry(RegistryCmd::Show { name }) => {
            let path = if name.contains('/') {
                name.clone()
            } else {
                format!("default/{name}")
            };
            let a: Answer<ServiceView> = api
                .call(Method::GET, &format!("/v1/registry/{path}"), None)
                .await?;
            print(out, &a.raw, |_| {
                let v = &a.typed;
                let mut text = format!(
                    "service: {}/{}\nvip:     {}\n",
                    v.namespace,
                    v.name,
                    opt(v.vip)
                );
                let rows = v
                    .endpoints
                    .iter()
                    .map(|e| {
                        let ports = e
                            .ports
                            .iter()
                            .map(|(k, n)| format!("{k}:{n}"))
                            .collect::<Vec<_>>()
                            .join(",");
                        let labels = e
                            .labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",");
                        vec![
                            e.address.clone(),
                            ports,
                            e.healthy.to_string(),
                            e.sources.join("+"),
                            e.native_id.clone(),
                            e.stale.to_string(),
                            opt(e.identity.as_ref()),
                            match (&e.region, &e.zone) {
                                (Some(r), Some(z)) => format!("{r}/{z}"),
                                (Some(r), None) => format!("{r}/-"),
                                (None, z) => opt(z.as_ref()),
                            },
                            if labels.is_empty() {
                                "-".into()
                            } else {
                                labels
                            },
                        ]
                    })
                    .collect();
                text.push_str(&table(
                    &[
                        "ADDRESS",
                        "PORTS",
                        "HEALTHY",
                        "SOURCES",
                        "NATIVE ID",
                        "STALE",
                        "IDENTITY",
                        "LOCALITY",
                        "LABELS",
                    ],
                    rows,
                ));
                text
            });
        }
        Command::Registry(RegistryCmd::Sources) => {
            let a: Answer<Vec<SourceView>> =
                api.call(Method::GET, "/v1/registry/sources", None).await?;
            print(out, &a.raw, |_| {
                let rows = a
                    .typed
                    .iter()
                    .map(|x| {
                        vec![
                            x.name.clone(),
                            x.kind.to_string(),
                            x.state.to_string(),
                            x.services.to_string(),
                            x.endpoints.to_string(),
                            opt(x.last_error.as_ref()),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "NAME",
                        "KIND",
                        "STATE",
                        "SERVICES",
                        "ENDPOINTS",
                        "LAST ERROR",
                    ],
                    rows,
                )
            });
        }
        Command::Registry(RegistryCmd::Conflicts) => {
            let a: Answer<Vec<Conflict>> = api
                .call(Method::GET, "/v1/registry/conflicts", None)
                .await?;
            print(out, &a.raw, |_| {
                if a.typed.is_empty() {
                    "no conflicts\n".to_owned()
                } else {
                    a.typed
                        .iter()
                        .map(|c| format!("{}\n", serde_json::to_string(c).unwrap_or_default()))
                        .collect()
                }
            });
        }
        Command::Ca(CaCmd::Show) => {
            let a: Answer<CaView> = api.call(Method::GET, "/v1/ca", None).await?;
            print(out, &a.raw, |_| {
                let v = &a.typed;
                format!(
                    "fingerprint:  {}\nmode:         {}\ntrust domain: {}\nroots:        {}\n",
                    v.fingerprint,
                    v.mode,
                    v.trust_domain,
                    v.trust_bundle_pem.len()
                )
            });
        }
    }
    Ok(())
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", causeway_api::error_chain(e.as_ref()));
            if e.downcast_ref::<analyze::Findings>().is_some() {
                return ExitCode::from(analyze::EXIT_FINDINGS);
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_missing_a_field_is_an_error_naming_it() {
        let raw = serde_json::json!([{
            "namespace": "default", "name": "web", "sources": [], "endpoints": []
        }]);
        let err = decode::<Vec<ServiceView>>("GET /v1/registry", &raw)
            .unwrap_err()
            .to_string();
        assert!(err.contains("GET /v1/registry"), "{err}");
        assert!(err.contains("at [0]: missing field `vip`"), "{err}");
        let raw = serde_json::json!({"version": 3, "durable_version": 3, "services": 1});
        let err = decode::<causeway_api::admin::MeshStatus>("GET /v1/mesh", &raw)
            .unwrap_err()
            .to_string();
        assert!(err.contains("agents_connected"), "{err}");
    }
}
