//! `causewayctl analyze`: fleet-aware diagnostics as pure functions over a snapshot.
//!
//! What it does: [`analyze`] runs every check of [`CHECKS`] over a [`Snapshot`] (the merged
//! registry with each source's state, the agents with their certificates, sessions and
//! reported data-plane facts, the groups, tokens and policies) and answers [`Message`]s
//! with a stable code (see docs/analyze.md). [`analyze_files`] checks policy files alone
//! (`--offline`): decoding and validation ([`CW0001`](CODES)) and the checks that need no
//! live state. The controller builds the snapshot from its store and mesh (copying what it
//! needs, then running the checks without holding any lock), `causewayctl --offline`
//! builds one from files; both run this one code.
//!
//! What it does not: read clocks, files or sockets (the caller passes `now`), or poll
//! agents (they report their facts over the push channel, [`crate::push::AgentFacts`]).
//!
//! Codes are grouped by area: `CW00xx` input files, `CW01xx` registry, `CW02xx` identity,
//! `CW03xx` push, `CW04xx` policy, `CW05xx` routing (reserved: VirtualService and
//! DestinationRule checks slot in as entries of [`CHECKS`] once those resources exist),
//! `CW06xx` data plane. A code never changes meaning; retired codes are not reused.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::WorkloadGroup;
use crate::policy::resource::{Action, AuthorizationPolicy, Rule, Selector};
use crate::policy::{
    GROUP_LABEL, PeerMode, PolicySet, ROOT_NAMESPACE, Request, Resource, Workload, effective_mode,
};

/// How serious a message is. `Error` fails `causewayctl analyze`; `Warning` fails it with
/// `--fail-on warning`; `Info` never does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Level {
    /// Something is broken now.
    Error,
    /// Something will break, or does not do what it says.
    Warning,
    /// Worth knowing; nothing is wrong.
    Info,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Error => "Error",
            Level::Warning => "Warning",
            Level::Info => "Info",
        })
    }
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Ok(Level::Error),
            "warning" => Ok(Level::Warning),
            "info" => Ok(Level::Info),
            _ => Err(format!("level {s:?}: expected error, warning or info")),
        }
    }
}

/// One finding. The JSON shape (`{"code", "level", "resource", "message", "fix"}`) is a
/// contract: fields are never renamed or removed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Message {
    /// Stable code, e.g. `CW0401`.
    pub code: String,
    /// Error, Warning or Info.
    pub level: Level,
    /// What it concerns: `AuthorizationPolicy shop/allow-cart`, `agent 01J…`,
    /// `source consul-dc1`, `service shop/cart`, `group web`, `token 3f2a…`,
    /// `mesh.vip_range`, `FILE doc N`.
    pub resource: String,
    /// One line: what is wrong.
    pub message: String,
    /// One line: what to do.
    pub fix: String,
}

/// The answer of an analysis (`GET/POST /v1/analyze`, `causewayctl analyze --output json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Every finding, errors first, then by code and resource.
    pub messages: Vec<Message>,
}

impl Report {
    /// Sorts the messages (level, code, resource) and drops exact duplicates.
    pub fn normalize(&mut self) {
        self.messages.sort_by(|a, b| {
            (a.level, &a.code, &a.resource, &a.message).cmp(&(
                b.level,
                &b.code,
                &b.resource,
                &b.message,
            ))
        });
        self.messages.dedup();
    }

    /// How many messages have `level`.
    pub fn count(&self, level: Level) -> usize {
        self.messages.iter().filter(|m| m.level == level).count()
    }

    /// Drops the messages a suppression matches.
    pub fn suppress(&mut self, rules: &[Suppression]) {
        self.messages
            .retain(|m| !rules.iter().any(|r| r.matches(m)));
    }
}

/// `--suppress CODE=RESOURCE`: hides one code for one resource (`*`: every resource).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppression {
    /// The code.
    pub code: String,
    /// The resource as messages name it, or `*`.
    pub resource: String,
}

impl Suppression {
    /// Whether it hides `m`.
    pub fn matches(&self, m: &Message) -> bool {
        self.code.eq_ignore_ascii_case(&m.code)
            && (self.resource == "*" || self.resource == m.resource)
    }
}

impl std::str::FromStr for Suppression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (code, resource) = s.split_once('=').ok_or_else(|| {
            format!("--suppress {s:?}: expected CODE=RESOURCE, e.g. CW0401=\"AuthorizationPolicy default/x\" (or CODE=* for every resource)")
        })?;
        let code = code.trim();
        if CODES.iter().all(|c| !c.code.eq_ignore_ascii_case(code)) {
            return Err(format!(
                "--suppress {s:?}: unknown code {code:?}; the codes are listed in docs/analyze.md"
            ));
        }
        Ok(Suppression {
            code: code.to_ascii_uppercase(),
            resource: resource.trim().to_owned(),
        })
    }
}

/// Thresholds of the time- and size-based checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// A source's endpoints stale (source down) longer than this: CW0103.
    pub stale_after_secs: u64,
    /// An agent certificate expiring within this, not renewed: CW0201.
    pub cert_expiry_secs: u64,
    /// An agent not connected for longer than this: CW0202.
    pub disconnected_secs: u64,
    /// VIP range used to this percentage or more: CW0105.
    pub vip_used_percent: u8,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            stale_after_secs: 300,
            // Agents renew at two thirds of the certificate's life (16 h of the default
            // 24 h): one that is within 4 h of expiry has missed every renewal since.
            cert_expiry_secs: 4 * 3600,
            disconnected_secs: 600,
            vip_used_percent: 90,
        }
    }
}

/// A policy resource read from a file, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileResource {
    /// The file.
    pub origin: String,
    /// The document in the file, from 1.
    pub doc: usize,
    /// The resource.
    pub resource: Resource,
}

/// One routing resource from a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRoute {
    /// The file.
    pub origin: String,
    /// The document in the file, from 1.
    pub doc: usize,
    /// The resource.
    pub resource: crate::route::RouteResource,
}

/// `POST /v1/analyze` (`GET` is the same with an empty body).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalyzeRequest {
    /// Resources from `-f` files, analyzed as if applied (each replaces the stored one of
    /// the same kind, namespace and name).
    pub resources: Vec<FileResource>,
    /// Routing resources from `-f` files, likewise (left out when empty, so that a
    /// controller without routing support still takes the request).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<FileRoute>,
    /// Thresholds (defaults when absent).
    pub thresholds: Thresholds,
}

/// One registry source as the checks see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceFacts {
    /// Its name.
    pub name: String,
    /// Its kind (`consul`, `eureka`, `file`, `kubernetes`, `agents`).
    pub kind: String,
    /// `synced`, `stale` or `pending`.
    pub state: String,
    /// The last error.
    pub last_error: Option<String>,
    /// Since when it is stale (Unix seconds).
    pub stale_since: Option<i64>,
    /// Endpoints it holds.
    pub endpoints: usize,
}

/// One endpoint of the merged registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointFacts {
    /// Address.
    pub address: String,
    /// The source that reported it.
    pub source: String,
    /// Named ports.
    pub ports: BTreeMap<String, u16>,
    /// Its source is failing (last known good data).
    pub stale: bool,
    /// The agent running there, if any.
    pub agent: Option<String>,
    /// Its labels (from the registries and the agents' groups; subsets select on them).
    pub labels: BTreeMap<String, String>,
}

/// One service of the merged registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceFacts {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Endpoints.
    pub endpoints: Vec<EndpointFacts>,
}

/// An agent's last refusal of a config update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NackFacts {
    /// The refused version.
    pub version: u64,
    /// The agent's reason.
    pub error: String,
}

/// One enrolled agent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentFacts {
    /// Its id.
    pub id: String,
    /// Its group.
    pub group: String,
    /// Its enrolled address.
    pub address: Option<IpAddr>,
    /// Removed by an operator (ignored by every check).
    pub removed: bool,
    /// When it joined (Unix seconds).
    pub joined_at: i64,
    /// When its newest certificate expires (Unix seconds).
    pub not_after: i64,
    /// Whether a subscription is open now.
    pub connected: bool,
    /// When its session last connected or disconnected (Unix seconds); `None`: no session
    /// since the controller started.
    pub session_since: Option<i64>,
    /// The last version it acknowledged (`None`: no session).
    pub acked_version: Option<u64>,
    /// Its last refusal, while it stands.
    pub last_nack: Option<NackFacts>,
    /// Its software version, as it reported it.
    pub agent_version: Option<String>,
    /// What it reported of its data plane.
    pub dataplane: Option<crate::push::AgentFacts>,
}

/// One join token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenFacts {
    /// Its id.
    pub id: String,
    /// Its group.
    pub group: String,
    /// Expiry (Unix seconds).
    pub expires_at: i64,
    /// Uses granted.
    pub uses_total: u32,
    /// Uses left.
    pub uses_left: u32,
    /// Revoked by an operator.
    pub revoked: bool,
}

/// A policy resource with its creation order and, for one read from a file, its origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFacts {
    /// Creation order (lower is older; file resources come after the stored ones).
    pub seq: u64,
    /// The resource.
    pub resource: Resource,
    /// `FILE doc N` when it comes from `-f`.
    pub origin: Option<String>,
}

/// Everything the checks read. Built by the controller (live) or from files (offline).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Whether this is the live mesh (`false`: `--offline`; checks that need live state
    /// are skipped).
    pub live: bool,
    /// Now, Unix seconds.
    pub now: i64,
    /// When the controller started (Unix seconds): agents without a session since are
    /// disconnected since then.
    pub controller_started: i64,
    /// The controller's software version.
    pub controller_version: String,
    /// The trust domain (`causeway.local`).
    pub trust_domain: String,
    /// The mesh's config version.
    pub mesh_version: u64,
    /// The VIP range, e.g. `240.240.0.0/16`.
    pub vip_range: String,
    /// How many VIPs the range holds.
    pub vips_total: u64,
    /// How many are allocated.
    pub vips_used: u64,
    /// Registry sources.
    pub sources: Vec<SourceFacts>,
    /// The merged registry.
    pub services: Vec<ServiceFacts>,
    /// Enrolled agents.
    pub agents: Vec<AgentFacts>,
    /// Workload groups.
    pub groups: Vec<WorkloadGroup>,
    /// Join tokens.
    pub tokens: Vec<TokenFacts>,
    /// Policy resources.
    pub policies: Vec<PolicyFacts>,
    /// Routing resources (VirtualService, DestinationRule).
    pub routes: Vec<RouteFacts>,
}

/// One stored (or `-f`) routing resource.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteFacts {
    /// Creation order (lower is older; file resources come after the stored ones).
    pub seq: u64,
    /// The resource.
    pub resource: crate::route::RouteResource,
    /// `FILE doc N` when it comes from `-f`.
    pub origin: Option<String>,
}

impl Snapshot {
    /// Adds file resources as if applied: each replaces the stored one with the same
    /// kind, namespace and name.
    pub fn overlay(&mut self, files: Vec<FileResource>) {
        let mut seq = self.policies.iter().map(|p| p.seq).max().unwrap_or(0);
        for f in files {
            let key = key_of(&f.resource);
            let origin = format!("{} doc {}", f.origin, f.doc);
            if let Some(p) = self
                .policies
                .iter_mut()
                .find(|p| key_of(&p.resource) == key)
            {
                p.resource = f.resource;
                p.origin = Some(origin);
            } else {
                seq += 1;
                self.policies.push(PolicyFacts {
                    seq,
                    resource: f.resource,
                    origin: Some(origin),
                });
            }
        }
    }
}

impl Snapshot {
    /// Adds routing resources from files as if applied, as [`Snapshot::overlay`] does.
    pub fn overlay_routes(&mut self, files: Vec<FileRoute>) {
        let mut seq = self.routes.iter().map(|r| r.seq).max().unwrap_or(0);
        for f in files {
            let origin = format!("{} doc {}", f.origin, f.doc);
            let name = f.resource.display_name();
            if let Some(r) = self
                .routes
                .iter_mut()
                .find(|r| r.resource.display_name() == name)
            {
                r.resource = f.resource;
                r.origin = Some(origin);
            } else {
                seq += 1;
                self.routes.push(RouteFacts {
                    seq,
                    resource: f.resource,
                    origin: Some(origin),
                });
            }
        }
    }
}

fn key_of(r: &Resource) -> (crate::policy::Kind, String, String) {
    let m = r.metadata();
    (r.kind(), m.namespace().to_owned(), m.name.clone())
}

/// The areas checks belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    /// Input files.
    Input,
    /// Registry sources and the merged registry.
    Registry,
    /// Agents' identities, groups and tokens.
    Identity,
    /// Config push.
    Push,
    /// AuthorizationPolicy and PeerAuthentication.
    Policy,
    /// VirtualService and DestinationRule.
    Routing,
    /// What agents report of their data plane.
    Dataplane,
}

/// One code: its default level, area and title (the reference is docs/analyze.md).
#[derive(Debug, Clone, Copy)]
pub struct CodeInfo {
    /// The code.
    pub code: &'static str,
    /// Its level (some codes rise to Error in the case the text says).
    pub level: Level,
    /// Its area.
    pub area: Area,
    /// What it reports.
    pub title: &'static str,
}

/// Every code.
pub const CODES: &[CodeInfo] = &[
    CodeInfo {
        code: "CW0001",
        level: Level::Error,
        area: Area::Input,
        title: "a document of a file cannot be decoded or is invalid",
    },
    CodeInfo {
        code: "CW0101",
        level: Level::Warning,
        area: Area::Registry,
        title: "a service's port has different numbers in different sources",
    },
    CodeInfo {
        code: "CW0102",
        level: Level::Warning,
        area: Area::Registry,
        title: "a service's port number has different names (protocols) in different sources",
    },
    CodeInfo {
        code: "CW0103",
        level: Level::Warning,
        area: Area::Registry,
        title: "endpoints stale (their source down) for longer than the threshold",
    },
    CodeInfo {
        code: "CW0104",
        level: Level::Error,
        area: Area::Registry,
        title: "a registry source is failing",
    },
    CodeInfo {
        code: "CW0105",
        level: Level::Warning,
        area: Area::Registry,
        title: "the VIP range is nearly exhausted (Error when full)",
    },
    CodeInfo {
        code: "CW0201",
        level: Level::Warning,
        area: Area::Identity,
        title: "an agent's certificate expires soon and was not renewed (Error once expired)",
    },
    CodeInfo {
        code: "CW0202",
        level: Level::Warning,
        area: Area::Identity,
        title: "an agent has not been connected for longer than the threshold",
    },
    CodeInfo {
        code: "CW0203",
        level: Level::Info,
        area: Area::Identity,
        title: "a group has no agent",
    },
    CodeInfo {
        code: "CW0204",
        level: Level::Warning,
        area: Area::Identity,
        title: "a join token expired without being used",
    },
    CodeInfo {
        code: "CW0301",
        level: Level::Error,
        area: Area::Push,
        title: "an agent refused (NACKed) the config",
    },
    CodeInfo {
        code: "CW0302",
        level: Level::Warning,
        area: Area::Push,
        title: "a connected agent is more than one config version behind",
    },
    CodeInfo {
        code: "CW0303",
        level: Level::Error,
        area: Area::Push,
        title: "an agent is more than one minor release older than the controller",
    },
    CodeInfo {
        code: "CW0401",
        level: Level::Warning,
        area: Area::Policy,
        title: "a policy selects no workload",
    },
    CodeInfo {
        code: "CW0402",
        level: Level::Warning,
        area: Area::Policy,
        title: "a policy names a principal or namespace no group can have",
    },
    CodeInfo {
        code: "CW0403",
        level: Level::Warning,
        area: Area::Policy,
        title: "ALLOW policies make a service unreachable from every current client",
    },
    CodeInfo {
        code: "CW0404",
        level: Level::Warning,
        area: Area::Policy,
        title: "a DENY policy shadows an ALLOW policy completely",
    },
    CodeInfo {
        code: "CW0405",
        level: Level::Warning,
        area: Area::Policy,
        title: "STRICT mTLS for a service whose clients include agentless workloads",
    },
    CodeInfo {
        code: "CW0501",
        level: Level::Warning,
        area: Area::Routing,
        title: "a VirtualService host matches no service of the registry",
    },
    CodeInfo {
        code: "CW0502",
        level: Level::Error,
        area: Area::Routing,
        title: "a route sends traffic to a service the registry does not have",
    },
    CodeInfo {
        code: "CW0503",
        level: Level::Error,
        area: Area::Routing,
        title: "a route names a subset that no DestinationRule defines",
    },
    CodeInfo {
        code: "CW0504",
        level: Level::Warning,
        area: Area::Routing,
        title: "a DestinationRule subset selects no endpoint",
    },
    CodeInfo {
        code: "CW0505",
        level: Level::Error,
        area: Area::Routing,
        title: "a route's weights do not sum to 100",
    },
    CodeInfo {
        code: "CW0506",
        level: Level::Warning,
        area: Area::Routing,
        title: "several VirtualServices route the same host (conflicting routes)",
    },
    CodeInfo {
        code: "CW0507",
        level: Level::Warning,
        area: Area::Routing,
        title: "a DestinationRule's localityLbSetting is ignored without outlierDetection",
    },
    CodeInfo {
        code: "CW0601",
        level: Level::Error,
        area: Area::Dataplane,
        title: "an agent reports capture-rule drift",
    },
    CodeInfo {
        code: "CW0602",
        level: Level::Error,
        area: Area::Dataplane,
        title: "an agent reports DNS capture missing or broken",
    },
];

/// One check: a pure function adding messages.
pub struct Check {
    /// Its name (for docs and the benchmark).
    pub name: &'static str,
    /// Its area.
    pub area: Area,
    /// Whether it needs the live mesh (skipped with `--offline`).
    pub live_only: bool,
    /// The check.
    pub run: fn(&Snapshot, &Thresholds, &mut Vec<Message>),
}

/// Every check, in order. Routing checks (VirtualService hosts matching no service,
/// subsets no DestinationRule defines, weights not summing to 100, conflicting routes)
/// are added here, `CW05xx`, once those resources exist.
pub const CHECKS: &[Check] = &[
    Check {
        name: "registry-ports",
        area: Area::Registry,
        live_only: true,
        run: registry_ports,
    },
    Check {
        name: "registry-sources",
        area: Area::Registry,
        live_only: true,
        run: registry_sources,
    },
    Check {
        name: "registry-vips",
        area: Area::Registry,
        live_only: true,
        run: registry_vips,
    },
    Check {
        name: "identity-agents",
        area: Area::Identity,
        live_only: true,
        run: identity_agents,
    },
    Check {
        name: "identity-groups",
        area: Area::Identity,
        live_only: true,
        run: identity_groups,
    },
    Check {
        name: "identity-tokens",
        area: Area::Identity,
        live_only: true,
        run: identity_tokens,
    },
    Check {
        name: "push-agents",
        area: Area::Push,
        live_only: true,
        run: push_agents,
    },
    Check {
        name: "policy-selects-nothing",
        area: Area::Policy,
        live_only: true,
        run: policy_selects_nothing,
    },
    Check {
        name: "policy-unknown-principals",
        area: Area::Policy,
        live_only: true,
        run: policy_unknown_principals,
    },
    Check {
        name: "policy-unreachable",
        area: Area::Policy,
        live_only: true,
        run: policy_unreachable,
    },
    Check {
        name: "policy-deny-shadows-allow",
        area: Area::Policy,
        live_only: false,
        run: policy_deny_shadows_allow,
    },
    Check {
        name: "policy-strict-agentless",
        area: Area::Policy,
        live_only: true,
        run: policy_strict_agentless,
    },
    Check {
        name: "route-hosts",
        area: Area::Routing,
        live_only: true,
        run: route_hosts,
    },
    Check {
        name: "route-subsets",
        area: Area::Routing,
        live_only: false,
        run: route_subsets,
    },
    Check {
        name: "route-subsets-empty",
        area: Area::Routing,
        live_only: true,
        run: route_subsets_empty,
    },
    Check {
        name: "route-weights",
        area: Area::Routing,
        live_only: false,
        run: route_weights,
    },
    Check {
        name: "route-conflicts",
        area: Area::Routing,
        live_only: false,
        run: route_conflicts,
    },
    Check {
        name: "route-locality-without-outliers",
        area: Area::Routing,
        live_only: false,
        run: route_locality_without_outliers,
    },
    Check {
        name: "dataplane-facts",
        area: Area::Dataplane,
        live_only: true,
        run: dataplane_facts,
    },
];

/// Runs every check (with `snapshot.live == false`, only those that need no live state).
pub fn analyze(snapshot: &Snapshot, thresholds: &Thresholds) -> Report {
    let mut messages = Vec::new();
    for c in CHECKS.iter().filter(|c| snapshot.live || !c.live_only) {
        (c.run)(snapshot, thresholds, &mut messages);
    }
    let mut r = Report { messages };
    r.normalize();
    r
}

/// A number of seconds for people (`2h 5m`); negative counts as zero.
fn secs(n: i64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(
        u64::try_from(n).unwrap_or(0),
    ))
    .to_string()
}

fn msg(
    code: &str,
    level: Level,
    resource: impl Into<String>,
    message: String,
    fix: String,
) -> Message {
    Message {
        code: code.to_owned(),
        level,
        resource: resource.into(),
        message,
        fix,
    }
}

// ---------------------------------------------------------------------------------------
// Input files

/// CW0001 for decoding errors and validation problems of files; `text` is each file's
/// contents with its name. Returns the valid policy resources and the messages (routing
/// documents are decoded too: see [`analyze_files_with_routes`]).
pub fn analyze_files(files: &[(String, String)]) -> (Vec<FileResource>, Vec<Message>) {
    let (ok, routes, mut out) = analyze_files_with_routes(files);
    // A caller without routing support still hears that those documents were not used.
    for r in routes {
        out.push(msg(
            "CW0001",
            Level::Error,
            format!("{} doc {}", r.origin, r.doc),
            format!("{} cannot be analyzed here", r.resource.display_name()),
            "use a causewayctl that knows VirtualService and DestinationRule".into(),
        ));
    }
    (ok, out)
}

/// [`analyze_files`], with VirtualService and DestinationRule documents decoded and
/// validated as well (returned apart: they are analyzed as [`Snapshot::routes`]).
pub fn analyze_files_with_routes(
    files: &[(String, String)],
) -> (Vec<FileResource>, Vec<FileRoute>, Vec<Message>) {
    let mut ok = Vec::new();
    let mut routes = Vec::new();
    let mut out = Vec::new();
    let undecodable = |origin: &str, doc: usize, path: &str, message: &str| {
        msg(
            "CW0001",
            Level::Error,
            format!("{origin} doc {doc}"),
            format!(
                "cannot be decoded: {path}{}{message}",
                if path.is_empty() { "" } else { ": " },
            ),
            "fix the document (the message names the field); `causewayctl apply` refuses the whole file until then".into(),
        )
    };
    let invalid = |origin: &str, doc: usize, name: String, p: &crate::policy::validate::Problem| {
        msg(
            "CW0001",
            Level::Error,
            format!("{origin} doc {doc}"),
            format!("{name} is invalid: {}: {}", p.path, p.message),
            "fix the field named; `causewayctl apply` refuses the whole file until then".into(),
        )
    };
    for (origin, text) in files {
        // A file with a document that cannot be decoded gives nothing (as `apply` takes
        // none of it); validation problems are reported per document.
        let (ok_before, routes_before) = (ok.len(), routes.len());
        let mut decodes = true;
        let mut undecodable = |origin: &str, doc: usize, path: &str, message: &str| {
            decodes = false;
            undecodable(origin, doc, path, message)
        };
        for (i, d) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let doc = i + 1;
            let value = match serde_json::Value::deserialize(d) {
                Ok(serde_json::Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    out.push(undecodable(
                        origin,
                        doc,
                        "",
                        &format!("not valid YAML: {e}"),
                    ));
                    // The YAML stream cannot be resumed after a syntax error.
                    break;
                }
            };
            let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            if crate::route::is_route_kind(kind) {
                match crate::route::decode_value(value) {
                    Err((path, message)) => out.push(undecodable(origin, doc, &path, &message)),
                    Ok(r) => {
                        let problems = crate::route::validate(&r);
                        for p in &problems {
                            out.push(invalid(origin, doc, r.display_name(), p));
                        }
                        if problems.is_empty() {
                            routes.push(FileRoute {
                                origin: origin.clone(),
                                doc,
                                resource: r,
                            });
                        }
                    }
                }
                continue;
            }
            match crate::policy::resource::decode_value(value) {
                Err((path, message)) => out.push(undecodable(origin, doc, &path, &message)),
                Ok(r) => {
                    let problems = crate::policy::validate::validate(&r);
                    if problems.is_empty() {
                        ok.push(FileResource {
                            origin: origin.clone(),
                            doc,
                            resource: r,
                        });
                        continue;
                    }
                    for p in &problems {
                        out.push(invalid(origin, doc, r.display_name(), p));
                    }
                }
            }
        }
        if !decodes {
            ok.truncate(ok_before);
            routes.truncate(routes_before);
        }
    }
    (ok, routes, out)
}

// ---------------------------------------------------------------------------------------
// Registry

/// Whether a port has more than one value, given by more than one source.
fn across<K>(m: &BTreeMap<K, BTreeSet<&str>>) -> bool {
    m.len() > 1 && m.values().flatten().collect::<BTreeSet<_>>().len() > 1
}

fn registry_ports(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    for svc in &s.services {
        if svc.endpoints.len() < 2 {
            continue;
        }
        // name -> number -> sources, and number -> name -> sources.
        let mut by_name: BTreeMap<&str, BTreeMap<u16, BTreeSet<&str>>> = BTreeMap::new();
        let mut by_number: BTreeMap<u16, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
        for e in &svc.endpoints {
            for (name, number) in &e.ports {
                by_name
                    .entry(name)
                    .or_default()
                    .entry(*number)
                    .or_default()
                    .insert(&e.source);
                by_number
                    .entry(*number)
                    .or_default()
                    .entry(name)
                    .or_default()
                    .insert(&e.source);
            }
        }
        let show = |m: &BTreeMap<String, BTreeSet<&str>>| {
            m.iter()
                .map(|(k, v)| {
                    format!(
                        "{k} in {}",
                        v.iter().copied().collect::<Vec<_>>().join(", ")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let resource = format!("service {}/{}", svc.namespace, svc.name);
        for (name, numbers) in &by_name {
            if across(numbers) {
                let shown: BTreeMap<String, BTreeSet<&str>> = numbers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect();
                out.push(msg(
                    "CW0101",
                    Level::Warning,
                    resource.clone(),
                    format!("port {name:?} has different numbers in different sources: {}; clients reach a different port depending on the endpoint picked", show(&shown)),
                    "make the sources agree on the port number (fix the registration in the source that is wrong)".into(),
                ));
            }
        }
        for (number, names) in &by_number {
            if across(names) {
                let shown: BTreeMap<String, BTreeSet<&str>> = names
                    .iter()
                    .map(|(k, v)| (format!("{k:?}"), v.clone()))
                    .collect();
                out.push(msg(
                    "CW0102",
                    Level::Warning,
                    resource.clone(),
                    format!(
                        "port {number} has different names (protocols) in different sources: {}",
                        show(&shown)
                    ),
                    "name the port the same in every source, so it is handled as one protocol"
                        .into(),
                ));
            }
        }
    }
}

fn registry_sources(s: &Snapshot, t: &Thresholds, out: &mut Vec<Message>) {
    for src in &s.sources {
        let resource = format!("source {}", src.name);
        let failing = src.state == "stale" || (src.state == "pending" && src.last_error.is_some());
        if failing {
            out.push(msg(
                "CW0104",
                Level::Error,
                resource.clone(),
                format!(
                    "{} source is failing ({}): {}",
                    src.kind,
                    src.state,
                    src.last_error.as_deref().unwrap_or("no answer yet")
                ),
                format!("check that source {} is reachable and its settings (address, token) are right; its last known good data is kept meanwhile", src.name),
            ));
        }
        if let Some(since) = src.stale_since {
            let age = s.now - since;
            if src.state == "stale"
                && src.endpoints > 0
                && age > i64::try_from(t.stale_after_secs).unwrap_or(i64::MAX)
            {
                out.push(msg(
                    "CW0103",
                    Level::Warning,
                    resource,
                    format!(
                        "{} endpoints are stale: their source has been down for {} (threshold {}); they may no longer exist",
                        src.endpoints,
                        secs(age),
                        secs(i64::try_from(t.stale_after_secs).unwrap_or(i64::MAX))
                    ),
                    format!("bring source {} back, or remove it from the controller's [registry] settings", src.name),
                ));
            }
        }
    }
}

fn registry_vips(s: &Snapshot, t: &Thresholds, out: &mut Vec<Message>) {
    if s.vips_total == 0 {
        return;
    }
    let used_pct = s.vips_used.saturating_mul(100) / s.vips_total;
    let full = s.vips_used >= s.vips_total;
    if full || used_pct >= u64::from(t.vip_used_percent) {
        out.push(msg(
            "CW0105",
            if full { Level::Error } else { Level::Warning },
            "mesh.vip_range",
            format!(
                "{} of {} VIPs of {} are allocated ({used_pct}%){}",
                s.vips_used,
                s.vips_total,
                s.vip_range,
                if full { ": new services get no VIP" } else { "" }
            ),
            "set a larger mesh.vip_range in the controller's config (existing VIPs are kept when the new range contains them)".into(),
        ));
    }
}

// ---------------------------------------------------------------------------------------
// Identity

fn identity_agents(s: &Snapshot, t: &Thresholds, out: &mut Vec<Message>) {
    let within = i64::try_from(t.cert_expiry_secs).unwrap_or(i64::MAX);
    let away = i64::try_from(t.disconnected_secs).unwrap_or(i64::MAX);
    for a in s.agents.iter().filter(|a| !a.removed) {
        let resource = format!("agent {}", a.id);
        let left = a.not_after - s.now;
        if left <= 0 {
            out.push(msg(
                "CW0201",
                Level::Error,
                resource.clone(),
                format!("its certificate expired {} ago and was not renewed: its mTLS connections fail", secs(-left)),
                "start the agent (it renews while its certificate is valid); if it stays expired, remove the agent and join the VM again with a new token".into(),
            ));
        } else if left < within {
            out.push(msg(
                "CW0201",
                Level::Warning,
                resource.clone(),
                format!("its certificate expires in {} and was not renewed", secs(left)),
                "check that the agent runs and reaches the controller's control endpoint (it renews at two thirds of the certificate's life)".into(),
            ));
        }
        if !a.connected {
            let since = a
                .session_since
                .unwrap_or(s.controller_started.max(a.joined_at));
            let gone = s.now - since;
            if gone > away {
                out.push(msg(
                    "CW0202",
                    Level::Warning,
                    resource,
                    format!(
                        "not connected for {} (group {}{})",
                        secs(gone),
                        a.group,
                        if a.session_since.is_none() { ", no session since the controller started" } else { "" }
                    ),
                    format!("start causeway-agent on the VM, or remove it with `causewayctl agent remove {}` if it is gone", a.id),
                ));
            }
        }
    }
}

fn identity_groups(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    let with_agents: BTreeSet<&str> = s
        .agents
        .iter()
        .filter(|a| !a.removed)
        .map(|a| a.group.as_str())
        .collect();
    for g in &s.groups {
        if !with_agents.contains(g.name.as_str()) {
            out.push(msg(
                "CW0203",
                Level::Info,
                format!("group {}", g.name),
                "no agent has joined this group".into(),
                format!("join a VM with `causewayctl token create --group {}`, or delete the group if it is not needed", g.name),
            ));
        }
    }
}

fn identity_tokens(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    for tk in &s.tokens {
        if !tk.revoked && tk.uses_left == tk.uses_total && tk.expires_at <= s.now {
            out.push(msg(
                "CW0204",
                Level::Warning,
                format!("token {}", tk.id),
                format!("the join token for group {} expired {} ago without being used: the VM it was made for never joined", tk.group, secs(s.now - tk.expires_at)),
                format!("create a new token with `causewayctl token create --group {}` and join the VM with it", tk.group),
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Push

/// `major.minor` of a version text (`0.1.0`, `1.4.2-rc1`).
fn major_minor(v: &str) -> Option<(u64, u64)> {
    let mut it = v.trim().trim_start_matches('v').split(['.', '-', '+']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Whether an agent of version `agent` is more than one minor release older than a
/// controller of version `controller` (the supported skew is one minor release).
pub fn unsupported_skew(controller: &str, agent: &str) -> bool {
    match (major_minor(controller), major_minor(agent)) {
        (Some((cm, cn)), Some((am, an))) => am < cm || (am == cm && an + 1 < cn),
        _ => false,
    }
}

fn push_agents(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    for a in s.agents.iter().filter(|a| !a.removed) {
        let resource = format!("agent {}", a.id);
        if let Some(n) = &a.last_nack {
            out.push(msg(
                "CW0301",
                Level::Error,
                resource.clone(),
                format!("refused config version {}: {}", n.version, n.error),
                "fix what the reason names (a policy or a service the agent cannot apply), or upgrade the agent if it names a feature it does not support".into(),
            ));
        } else if a.connected
            && let Some(acked) = a.acked_version
            && acked + 1 < s.mesh_version
        {
            out.push(msg(
                "CW0302",
                Level::Warning,
                resource.clone(),
                format!("connected, but at config version {acked} while the mesh is at {}", s.mesh_version),
                "check the agent's log and load (it answers each update before the next is sent); restart it if it is stuck".into(),
            ));
        }
        if let Some(v) = &a.agent_version
            && unsupported_skew(&s.controller_version, v)
        {
            out.push(msg(
                "CW0303",
                Level::Error,
                resource,
                format!("runs causeway-agent {v}, more than one minor release older than the controller ({}): unsupported", s.controller_version),
                "upgrade causeway-agent on the VM (agents may be at most one minor release older than the controller)".into(),
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Policy

/// A group as a policy sees its workloads.
struct GroupWorkload<'a> {
    group: &'a WorkloadGroup,
    labels: BTreeMap<String, String>,
    principal: String,
    /// Addresses of its current agents.
    agents: Vec<IpAddr>,
}

impl GroupWorkload<'_> {
    fn workload(&self) -> Workload<'_> {
        Workload {
            namespace: &self.group.namespace,
            labels: &self.labels,
        }
    }
}

fn workloads(s: &Snapshot) -> Vec<GroupWorkload<'_>> {
    let mut agents: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    for a in s.agents.iter().filter(|a| !a.removed) {
        agents
            .entry(a.group.as_str())
            .or_default()
            .extend(a.address);
    }
    s.groups
        .iter()
        .map(|g| {
            let mut labels = g.labels.clone();
            labels.insert(GROUP_LABEL.to_owned(), g.name.clone());
            GroupWorkload {
                group: g,
                labels,
                principal: format!(
                    "{}/ns/{}/sa/{}",
                    s.trust_domain, g.namespace, g.service_account
                ),
                agents: agents.get(g.name.as_str()).cloned().unwrap_or_default(),
            }
        })
        .collect()
}

fn policy_name(p: &PolicyFacts) -> String {
    p.resource.display_name()
}

fn origin_note(p: &PolicyFacts) -> String {
    p.origin
        .as_ref()
        .map(|o| format!(" (from {o})"))
        .unwrap_or_default()
}

fn selector_of(r: &Resource) -> Option<&Selector> {
    match r {
        Resource::AuthorizationPolicy(p) => p.spec.selector.as_ref(),
        Resource::PeerAuthentication(p) => p.spec.selector.as_ref(),
        Resource::RequestAuthentication(p) => p.spec.selector.as_ref(),
    }
}

/// Whether policy `r` (its namespace and selector) applies to workload `w`.
fn selects(r: &Resource, w: Workload<'_>) -> bool {
    let ns = r.metadata().namespace();
    match r {
        Resource::AuthorizationPolicy(_) | Resource::RequestAuthentication(_) => {
            (ns == w.namespace || ns == ROOT_NAMESPACE)
                && selector_of(r).is_none_or(|s| s.matches(w.labels))
        }
        // A PeerAuthentication's selector applies in its own namespace only.
        Resource::PeerAuthentication(_) => {
            match selector_of(r).filter(|s| !s.match_labels.is_empty()) {
                Some(sel) => ns == w.namespace && sel.matches(w.labels),
                None => ns == w.namespace || ns == ROOT_NAMESPACE,
            }
        }
    }
}

fn policy_selects_nothing(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    let ws = workloads(s);
    for p in &s.policies {
        if ws.iter().any(|w| selects(&p.resource, w.workload())) {
            continue;
        }
        let ns = p.resource.metadata().namespace();
        let what = match selector_of(&p.resource).filter(|s| !s.match_labels.is_empty()) {
            Some(sel) => format!(
                "its selector {:?} matches no workload group in namespace {ns}",
                sel.match_labels
            ),
            None => format!("namespace {ns} has no workload group"),
        };
        out.push(msg(
            "CW0401",
            Level::Warning,
            policy_name(p),
            format!("selects no workload{}: {what}", origin_note(p)),
            format!("fix metadata.namespace or spec.selector.matchLabels (groups carry their labels and {GROUP_LABEL}: <group>); see `causewayctl group list`"),
        ));
    }
}

/// Istio's string match: exact, `prefix*`, `*suffix`, `*`.
fn pattern_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(p) = pattern.strip_suffix('*') {
        value.starts_with(p)
    } else if let Some(sfx) = pattern.strip_prefix('*') {
        value.ends_with(sfx)
    } else {
        pattern == value
    }
}

fn policy_unknown_principals(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    let ws = workloads(s);
    let principals: Vec<&str> = ws.iter().map(|w| w.principal.as_str()).collect();
    let namespaces: BTreeSet<&str> = ws.iter().map(|w| w.group.namespace.as_str()).collect();
    for p in &s.policies {
        let Resource::AuthorizationPolicy(ap) = &p.resource else {
            continue;
        };
        let mut unknown_p = BTreeSet::new();
        let mut unknown_ns = BTreeSet::new();
        for rule in ap.spec.rules.iter().flatten() {
            for src in rule.from.iter().flatten().filter_map(|f| f.source.as_ref()) {
                for pr in &src.principals {
                    let pat = pr.strip_prefix("spiffe://").unwrap_or(pr);
                    if !principals.iter().any(|have| pattern_matches(pat, have)) {
                        unknown_p.insert(pr.clone());
                    }
                }
                for ns in &src.namespaces {
                    if !namespaces.iter().any(|have| pattern_matches(ns, have)) {
                        unknown_ns.insert(ns.clone());
                    }
                }
            }
        }
        let mut parts = Vec::new();
        if !unknown_p.is_empty() {
            parts.push(format!("principals {unknown_p:?}"));
        }
        if !unknown_ns.is_empty() {
            parts.push(format!("namespaces {unknown_ns:?}"));
        }
        if parts.is_empty() {
            continue;
        }
        out.push(msg(
            "CW0402",
            Level::Warning,
            policy_name(p),
            format!(
                "names {} that no workload group can have{} (principals are {}/ns/<namespace>/sa/<service account>)",
                parts.join(" and "),
                origin_note(p),
                s.trust_domain
            ),
            "correct the names (see `causewayctl group list` for each group's namespace and service account), or create the group they are meant for".into(),
        ));
    }
}

/// Whether a rule needs HTTP attributes to match (a TCP-level evaluation cannot tell).
fn needs_http(rule: &Rule) -> bool {
    rule.to
        .iter()
        .flatten()
        .filter_map(|t| t.operation.as_ref())
        .any(|o| {
            !o.hosts.is_empty()
                || !o.not_hosts.is_empty()
                || !o.methods.is_empty()
                || !o.not_methods.is_empty()
                || !o.paths.is_empty()
                || !o.not_paths.is_empty()
        })
        || rule
            .when
            .iter()
            .flatten()
            .any(|c| c.key.starts_with("request."))
        || rule
            .from
            .iter()
            .flatten()
            .filter_map(|f| f.source.as_ref())
            .any(|s| !s.request_principals.is_empty() || !s.not_request_principals.is_empty())
}

fn authorization_policies(s: &Snapshot) -> Vec<(&PolicyFacts, &AuthorizationPolicy)> {
    s.policies
        .iter()
        .filter_map(|p| match &p.resource {
            Resource::AuthorizationPolicy(ap) => Some((p, ap)),
            _ => None,
        })
        .collect()
}

fn policy_unreachable(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    let aps = authorization_policies(s);
    if aps.is_empty() {
        return;
    }
    let set = PolicySet::new(aps.iter().map(|(_, ap)| *ap));
    let ws = workloads(s);
    let unspecified = IpAddr::from([0, 0, 0, 0]);
    for dest in ws
        .iter()
        .filter(|w| !w.agents.is_empty() && !w.group.ports.is_empty())
    {
        let selecting: Vec<&(&PolicyFacts, &AuthorizationPolicy)> = aps
            .iter()
            .filter(|(p, _)| selects(&p.resource, dest.workload()))
            .collect();
        let allows: Vec<_> = selecting
            .iter()
            .filter(|(_, ap)| ap.spec.action == Action::Allow)
            .collect();
        if allows.is_empty()
            || selecting
                .iter()
                .any(|(_, ap)| ap.spec.rules.iter().flatten().any(needs_http))
        {
            continue; // no ALLOW (everything allowed unless denied), or HTTP-dependent
        }
        let clients: Vec<&GroupWorkload<'_>> = ws
            .iter()
            .filter(|c| c.group.name != dest.group.name && !c.agents.is_empty())
            .collect();
        if clients.is_empty() {
            continue;
        }
        let selected = set.for_workload(dest.workload());
        let dest_ip = dest.agents.first().copied().unwrap_or(unspecified);
        let reachable = clients.iter().any(|c| {
            let source_ip = c.agents.first().copied().unwrap_or(unspecified);
            dest.group.ports.iter().any(|port| {
                selected
                    .decide(&Request {
                        principal: Some(&c.principal),
                        source_ip,
                        remote_ip: None,
                        destination_ip: dest_ip,
                        destination_port: port.port,
                        sni: None,
                        http: None,
                    })
                    .allow
            })
        });
        if reachable {
            continue;
        }
        let names: Vec<String> = allows.iter().map(|(p, _)| policy_name(p)).collect();
        let first = allows[0].0;
        out.push(msg(
            "CW0403",
            Level::Warning,
            policy_name(first),
            format!(
                "group {} (service {}) is unreachable from every current client ({}): {} allow none of them{}",
                dest.group.name,
                dest.group.service.as_deref().unwrap_or("-"),
                clients.iter().map(|c| c.group.name.as_str()).collect::<Vec<_>>().join(", "),
                names.join(", "),
                origin_note(first)
            ),
            format!(
                "add a rule allowing the intended clients (e.g. principals [\"{}\"]), or check with `causewayctl why --from {} --to {}`",
                clients[0].principal,
                clients[0].group.name,
                dest.group.service.as_deref().unwrap_or(&dest.group.name)
            ),
        ));
    }
}

/// Whether DENY policy `d` applies to every workload ALLOW policy `a` applies to.
fn covers(d: &AuthorizationPolicy, a: &AuthorizationPolicy) -> bool {
    let (dn, an) = (d.metadata.namespace(), a.metadata.namespace());
    if dn != an && dn != ROOT_NAMESPACE {
        return false;
    }
    let empty = BTreeMap::new();
    let dl = d.spec.selector.as_ref().map_or(&empty, |s| &s.match_labels);
    let al = a.spec.selector.as_ref().map_or(&empty, |s| &s.match_labels);
    dl.iter().all(|(k, v)| al.get(k) == Some(v))
}

fn matches_everything(r: &Rule) -> bool {
    r.from.as_ref().is_none_or(Vec::is_empty)
        && r.to.as_ref().is_none_or(Vec::is_empty)
        && r.when.as_ref().is_none_or(Vec::is_empty)
}

fn policy_deny_shadows_allow(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    let aps = authorization_policies(s);
    for (pa, a) in aps.iter().filter(|(_, a)| a.spec.action == Action::Allow) {
        let Some(rules) = a.spec.rules.as_ref().filter(|r| !r.is_empty()) else {
            continue;
        };
        let denies: Vec<&(&PolicyFacts, &AuthorizationPolicy)> = aps
            .iter()
            .filter(|(_, d)| d.spec.action == Action::Deny && covers(d, a))
            .collect();
        let mut by = BTreeSet::new();
        let shadowed = rules.iter().all(|rule| {
            denies.iter().any(|(pd, d)| {
                let hit = d
                    .spec
                    .rules
                    .iter()
                    .flatten()
                    .any(|dr| matches_everything(dr) || dr == rule);
                if hit {
                    by.insert(policy_name(pd));
                }
                hit
            })
        });
        if shadowed {
            out.push(msg(
                "CW0404",
                Level::Warning,
                policy_name(pa),
                format!(
                    "every rule of this ALLOW policy is shadowed by {} (DENY is evaluated first and matches the same or more): it never allows anything{}",
                    by.into_iter().collect::<Vec<_>>().join(", "),
                    origin_note(pa)
                ),
                "narrow the DENY policy's rules or selector, or delete the ALLOW policy if the denial is intended".into(),
            ));
        }
    }
}

fn policy_strict_agentless(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    let agentless: Vec<(&ServiceFacts, &EndpointFacts)> = s
        .services
        .iter()
        .flat_map(|svc| svc.endpoints.iter().map(move |e| (svc, e)))
        .filter(|(_, e)| e.agent.is_none() && !e.stale)
        .collect();
    if agentless.is_empty() {
        return;
    }
    let pas: Vec<(u64, &crate::policy::PeerAuthentication)> = s
        .policies
        .iter()
        .filter_map(|p| match &p.resource {
            Resource::PeerAuthentication(pa) => Some((p.seq, pa)),
            _ => None,
        })
        .collect();
    let ws = workloads(s);
    for w in ws.iter().filter(|w| !w.agents.is_empty()) {
        let strict: Vec<(u16, Option<String>)> = w
            .group
            .ports
            .iter()
            .filter_map(|port| {
                let (mode, by) = effective_mode(pas.iter().copied(), w.workload(), port.port);
                (mode == PeerMode::Strict).then_some((port.port, by))
            })
            .collect();
        let Some((_, by)) = strict.first() else {
            continue;
        };
        let (svc, ep) = agentless[0];
        let resource = match by {
            Some(id) => format!("PeerAuthentication {id}"),
            None => format!("group {}", w.group.name),
        };
        out.push(msg(
            "CW0405",
            Level::Warning,
            resource,
            format!(
                "group {} is STRICT on port{} {} but the registry has {} workload{} without an agent (e.g. {} of {}/{}), which can only send plaintext: they are refused",
                w.group.name,
                if strict.len() == 1 { "" } else { "s" },
                strict.iter().map(|(p, _)| p.to_string()).collect::<Vec<_>>().join(", "),
                agentless.len(),
                if agentless.len() == 1 { "" } else { "s" },
                ep.address,
                svc.namespace,
                svc.name
            ),
            "use PERMISSIVE until those clients run causeway-agent (or a portLevelMtls exception for the ports they use), or suppress this message if they never call it".into(),
        ));
    }
}

// ---------------------------------------------------------------------------------------
// Data plane

// ---------------------------------------------------------------------------------------
// Routing

fn route_name(r: &RouteFacts) -> String {
    r.resource.display_name()
}

fn route_origin(r: &RouteFacts) -> String {
    r.origin
        .as_ref()
        .map(|o| format!(" (from {o})"))
        .unwrap_or_default()
}

fn virtual_services(
    s: &Snapshot,
) -> impl Iterator<Item = (&RouteFacts, &crate::route::VirtualService)> {
    s.routes.iter().filter_map(|r| match &r.resource {
        crate::route::RouteResource::VirtualService(v) => Some((r, v.as_ref())),
        crate::route::RouteResource::DestinationRule(_) => None,
    })
}

fn destination_rules(
    s: &Snapshot,
) -> impl Iterator<Item = (&RouteFacts, &crate::route::DestinationRule)> {
    s.routes.iter().filter_map(|r| match &r.resource {
        crate::route::RouteResource::DestinationRule(d) => Some((r, d.as_ref())),
        crate::route::RouteResource::VirtualService(_) => None,
    })
}

/// Every destination of a VirtualService's routes (HTTP and TCP), with the route's field
/// path, and the mirror targets.
fn destinations(
    v: &crate::route::VirtualService,
) -> Vec<(String, &crate::route::resource::Destination)> {
    let mut out = Vec::new();
    for (i, r) in v.spec.http.iter().enumerate() {
        for (j, d) in r.route.iter().enumerate() {
            out.push((
                format!("spec.http[{i}].route[{j}].destination"),
                &d.destination,
            ));
        }
        if let Some(m) = &r.mirror {
            out.push((format!("spec.http[{i}].mirror"), m));
        }
    }
    for (i, r) in v.spec.tcp.iter().enumerate() {
        for (j, d) in r.route.iter().enumerate() {
            out.push((
                format!("spec.tcp[{i}].route[{j}].destination"),
                &d.destination,
            ));
        }
    }
    out
}

/// The registry's service for `host` written in a resource of namespace `ns`, if any
/// (wildcard hosts match when any service does).
fn service_for<'s>(s: &'s Snapshot, host: &str, ns: &str) -> Option<&'s ServiceFacts> {
    if let Some(suffix) = host.strip_prefix('*') {
        return s.services.iter().find(|svc| {
            let fqdn = format!("{}.{}.causeway", svc.name, svc.namespace);
            suffix.is_empty()
                || fqdn.ends_with(suffix)
                || format!("{}.{}", svc.name, svc.namespace).ends_with(suffix)
        });
    }
    let (ns, name) = crate::route::validate::service_of_host(host, ns);
    s.services
        .iter()
        .find(|svc| svc.namespace == ns && svc.name == name)
}

fn route_hosts(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    for (r, v) in virtual_services(s) {
        let ns = v.metadata.namespace();
        for (i, host) in v.spec.hosts.iter().enumerate() {
            if service_for(s, host, ns).is_none() {
                let (sns, name) = crate::route::validate::service_of_host(host, ns);
                out.push(msg(
                    "CW0501",
                    Level::Warning,
                    route_name(r),
                    format!("spec.hosts[{i}] {host:?} (service {name} in namespace {sns}) matches no service of the registry{}: the routes apply to no traffic", route_origin(r)),
                    "fix the host (a mesh name: NAME, NAME.NAMESPACE, NAME.NAMESPACE.causeway or NAME.service.consul), or register the service; see `causewayctl registry list`".into(),
                ));
            }
        }
        for (path, d) in destinations(v) {
            if service_for(s, &d.host, ns).is_none() {
                let (sns, name) = crate::route::validate::service_of_host(&d.host, ns);
                out.push(msg(
                    "CW0502",
                    Level::Error,
                    route_name(r),
                    format!("{path}.host {:?} (service {name} in namespace {sns}) is not in the registry{}: requests routed there fail with 503", d.host, route_origin(r)),
                    "fix the destination host, or register the service first; see `causewayctl registry list`".into(),
                ));
            }
        }
    }
}

fn route_subsets(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    let rules: Vec<&crate::route::DestinationRule> = destination_rules(s).map(|(_, d)| d).collect();
    for (r, v) in virtual_services(s) {
        for p in crate::route::validate::check_subsets(v, &rules) {
            out.push(msg(
                "CW0503",
                Level::Error,
                route_name(r),
                format!("{}: {}{}", p.path, p.message, route_origin(r)),
                "define the subset in a DestinationRule for that host (spec.subsets[].name and labels), or remove it from the route".into(),
            ));
        }
    }
}

fn route_subsets_empty(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    for (r, d) in destination_rules(s) {
        let Some(svc) = service_for(s, &d.spec.host, d.metadata.namespace()) else {
            continue;
        };
        for (i, subset) in d.spec.subsets.iter().enumerate() {
            let selected = svc.endpoints.iter().any(|e| {
                subset
                    .labels
                    .iter()
                    .all(|(k, v)| e.labels.get(k) == Some(v))
            });
            if !selected {
                out.push(msg(
                    "CW0504",
                    Level::Warning,
                    route_name(r),
                    format!(
                        "spec.subsets[{i}] {:?} (labels {:?}) selects none of the {} endpoints of service {}.{}{}: traffic routed to it fails with 503",
                        subset.name,
                        subset.labels,
                        svc.endpoints.len(),
                        svc.name,
                        svc.namespace,
                        route_origin(r)
                    ),
                    "fix the subset's labels to match the endpoints' (see `causewayctl registry show`), or label the endpoints (group labels, Consul tags or meta, Eureka metadata, Kubernetes pod labels)".into(),
                ));
            }
        }
    }
}

fn route_weights(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    for (r, v) in virtual_services(s) {
        let http = v.spec.http.iter().enumerate().map(|(i, h)| {
            (
                format!("spec.http[{i}].route"),
                h.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
            )
        });
        let tcp = v.spec.tcp.iter().enumerate().map(|(i, t)| {
            (
                format!("spec.tcp[{i}].route"),
                t.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
            )
        });
        for (path, weights) in http.chain(tcp) {
            // Istio: with one destination the weight may be left out (it is 100); with
            // several, the weights given must sum to 100.
            if weights.len() < 2 && weights.iter().all(Option::is_none) {
                continue;
            }
            let sum: i64 = weights.iter().map(|w| w.unwrap_or(0)).sum();
            if sum != 100 {
                out.push(msg(
                    "CW0505",
                    Level::Error,
                    route_name(r),
                    format!(
                        "{path}: the weights sum to {sum}, not 100{}",
                        route_origin(r)
                    ),
                    "make the destinations' weights add up to 100".into(),
                ));
            }
        }
    }
}

fn route_conflicts(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    // (namespace, service) → the VirtualServices naming it, oldest first.
    let mut by_service: BTreeMap<(String, String), Vec<&RouteFacts>> = BTreeMap::new();
    let mut vss: Vec<_> = virtual_services(s).collect();
    vss.sort_by_key(|(r, _)| r.seq);
    for (r, v) in vss {
        let ns = v.metadata.namespace();
        let keys: BTreeSet<(String, String)> = v
            .spec
            .hosts
            .iter()
            .filter(|h| !h.starts_with('*'))
            .map(|h| crate::route::validate::service_of_host(h, ns))
            .collect();
        for k in keys {
            by_service.entry(k).or_default().push(r);
        }
    }
    for ((ns, name), rs) in by_service {
        let Some((first, rest)) = rs.split_first() else {
            continue;
        };
        for r in rest {
            out.push(msg(
                "CW0506",
                Level::Warning,
                route_name(r),
                format!(
                    "routes service {name} in namespace {ns}, as the older {} does{}: routes of one host are evaluated oldest VirtualService first, so the first match wins and later ones may never be used (Istio merges VirtualServices only on gateways; on sidecars it keeps one)",
                    route_name(first),
                    route_origin(r)
                ),
                format!("merge the routes into {} (one VirtualService per host), or delete this one", route_name(first)),
            ));
        }
    }
}

fn route_locality_without_outliers(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    for (r, d) in destination_rules(s) {
        let rule = d.spec.traffic_policy.as_ref();
        let subsets = d.spec.subsets.iter().enumerate().map(|(i, s)| {
            (
                format!("spec.subsets[{i}].trafficPolicy"),
                s.traffic_policy.as_ref(),
            )
        });
        for (path, t) in std::iter::once(("spec.trafficPolicy".to_owned(), rule)).chain(subsets) {
            let Some(t) = t else { continue };
            let setting = t
                .load_balancer
                .as_ref()
                .and_then(|l| l.locality_lb_setting.as_ref());
            let outliers = t.outlier_detection.is_some()
                || rule.is_some_and(|r| r.outlier_detection.is_some());
            if setting.is_some_and(|l| l.enabled != Some(false)) && !outliers {
                out.push(msg(
                    "CW0507",
                    Level::Warning,
                    route_name(r),
                    format!(
                        "{path}.loadBalancer.localityLbSetting has no effect: as in Istio, locality load balancing needs outlierDetection to tell an unhealthy locality, so the agents ignore it{}",
                        route_origin(r)
                    ),
                    format!("add {path}.outlierDetection (e.g. consecutive5xxErrors: 5), or remove the localityLbSetting"),
                ));
            }
        }
    }
}

fn dataplane_facts(s: &Snapshot, _: &Thresholds, out: &mut Vec<Message>) {
    for a in s.agents.iter().filter(|a| !a.removed && a.connected) {
        let Some(f) = &a.dataplane else { continue };
        let resource = format!("agent {}", a.id);
        if f.capture_enabled && !f.capture_problems.is_empty() {
            out.push(msg(
                "CW0601",
                Level::Error,
                resource.clone(),
                format!("capture rules drifted from what the agent installed: {}", f.capture_problems.join("; ")),
                "run `causeway-agent doctor` on the VM to see the difference, and restart the agent to reinstall its rules; find what else edits iptables there".into(),
            ));
        }
        if f.dns_enabled && !f.dns_problems.is_empty() {
            out.push(msg(
                "CW0602",
                Level::Error,
                resource,
                format!("DNS capture is broken: {}", f.dns_problems.join("; ")),
                "run `causeway-agent doctor` on the VM, and restart the agent to reinstall its DNS capture".into(),
            ));
        }
    }
}

#[cfg(test)]
mod tests;
