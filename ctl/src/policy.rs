//! `apply`, `get`, `delete` and `why`: policy and routing resources in Istio's YAML, as
//! `kubectl` and `istioctl` users know them. Policies go to `/v1/policies`, routing
//! resources (VirtualService, DestinationRule) to `/v1/routes`.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use causeway_api::policy::api::{
    ApplyRequest, ApplyResponse, DeleteRequest, DeleteResponse, PolicyItem, WhyRequest, WhyResponse,
};
use causeway_api::policy::validate::validate;
use causeway_api::policy::{Kind, Resource};
use causeway_api::route::api::{RouteApplyRequest, RouteItem};
use causeway_api::route::{AnyResource, RouteResource, decode_documents_indexed};
use reqwest::Method;

use super::{Answer, Api, Output, table};

/// Files named by `-f`: a file, a directory (its `*.yaml`, `*.yml` and `*.json`, sorted), or
/// `-` for standard input.
pub(crate) fn expand(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.as_os_str() == "-" {
            out.push(p.clone());
        } else if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot read directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && matches!(
                            f.extension().and_then(|e| e.to_str()),
                            Some("yaml" | "yml" | "json")
                        )
                })
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("directory {} has no .yaml, .yml or .json file", p.display());
            }
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

pub(crate) fn read(path: &Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {}: give a YAML or JSON file, a directory, or - for standard input",
            path.display()
        )
    })
}

/// The resources of a set of files: policies and routing resources.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// AuthorizationPolicy, PeerAuthentication, RequestAuthentication.
    pub(crate) policies: Vec<Resource>,
    /// VirtualService, DestinationRule.
    pub(crate) routes: Vec<RouteResource>,
}

/// Reads, decodes and validates every document of every file; any problem anywhere is an
/// error listing all of them, so nothing is applied from a file with an error.
/// `namespace` fills resources without one and must agree with those that have one.
/// Routing resources are also checked together (each subset a route names must be
/// defined by a DestinationRule in the files, or by one already applied: the controller
/// checks that).
pub(crate) fn load(paths: &[PathBuf], namespace: Option<&str>) -> anyhow::Result<Loaded> {
    let mut loaded = Loaded::default();
    let mut errors = Vec::new();
    // Where each routing resource came from: (file, document).
    let mut route_origins: Vec<(String, usize)> = Vec::new();
    for path in expand(paths)? {
        let origin = path.display().to_string();
        let text = read(&path)?;
        match decode_documents_indexed(&origin, &text) {
            Err(es) => errors.extend(es.iter().map(ToString::to_string)),
            Ok(docs) => {
                for (doc, any) in docs {
                    let mut any = any;
                    let m = match &mut any {
                        AnyResource::Policy(r) => r.metadata_mut(),
                        AnyResource::Route(r) => r.metadata_mut(),
                    };
                    if let Some(ns) = namespace {
                        match &m.namespace {
                            None => m.namespace = Some(ns.to_owned()),
                            Some(have) if have != ns => errors.push(format!(
                                "{origin} doc {doc}: metadata.namespace: {have:?} differs from -n {ns}; remove one of them"
                            )),
                            Some(_) => {}
                        }
                    }
                    let problems = match &any {
                        AnyResource::Policy(r) => validate(r),
                        AnyResource::Route(r) => causeway_api::route::validate(r),
                    };
                    for p in problems {
                        errors.push(format!("{origin} doc {doc}: {}: {}", p.path, p.message));
                    }
                    match any {
                        AnyResource::Policy(r) => loaded.policies.push(*r),
                        AnyResource::Route(r) => {
                            route_origins.push((origin.clone(), doc));
                            loaded.routes.push(r);
                        }
                    }
                }
            }
        }
    }
    // Subsets against the DestinationRules of the files: a rule for the host that lacks
    // the subset is an error here; a host without a rule in the files is checked by the
    // controller against the rules already applied.
    let rules: Vec<&causeway_api::route::DestinationRule> = loaded
        .routes
        .iter()
        .filter_map(|r| match r {
            RouteResource::DestinationRule(d) => Some(&**d),
            RouteResource::VirtualService(_) => None,
        })
        .collect();
    for (r, (origin, doc)) in loaded.routes.iter().zip(&route_origins) {
        if let RouteResource::VirtualService(vs) = r {
            for p in causeway_api::route::validate::check_subsets(vs, &rules) {
                if !p.message.contains("no DestinationRule defines") {
                    errors.push(format!("{origin} doc {doc}: {}: {}", p.path, p.message));
                }
            }
        }
    }
    if !errors.is_empty() {
        bail!(
            "nothing applied; {} problem{}:\n  {}",
            errors.len(),
            if errors.len() == 1 { "" } else { "s" },
            errors.join("\n  ")
        );
    }
    if loaded.policies.is_empty() && loaded.routes.is_empty() {
        bail!("no resource found in the files given");
    }
    Ok(loaded)
}

fn print_applied(out: Output, answer: &Answer<ApplyResponse>) {
    let resp = &answer.typed;
    super::print(out, &answer.raw, |_| {
        let suffix = if resp.dry_run { " (dry run)" } else { "" };
        let mut text: String = resp
            .results
            .iter()
            .map(|r| format!("{} {}{suffix}\n", r.resource, r.outcome))
            .collect();
        if !resp.dry_run {
            text.push_str(&format!("mesh version {}\n", resp.version));
        }
        text
    });
}

/// `causewayctl apply -f …`.
pub(crate) async fn apply(
    api: &Api,
    out: Output,
    files: &[PathBuf],
    namespace: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let loaded = load(files, namespace)?;
    // Routing resources first: their set check on the controller is the one more likely
    // to refuse, and then no policy of the files is applied either.
    if !loaded.routes.is_empty() {
        let body = serde_json::to_value(RouteApplyRequest {
            resources: loaded.routes,
            dry_run,
        })?;
        let answer: Answer<ApplyResponse> = api
            .call(Method::POST, "/v1/routes/apply", Some(body))
            .await?;
        print_applied(out, &answer);
    }
    if !loaded.policies.is_empty() {
        let body = serde_json::to_value(ApplyRequest {
            resources: loaded.policies,
            dry_run,
        })?;
        let answer: Answer<ApplyResponse> = api
            .call(Method::POST, "/v1/policies/apply", Some(body))
            .await?;
        print_applied(out, &answer);
    }
    Ok(())
}

/// A kind named on the command line.
#[derive(Debug, Clone, Copy)]
enum CliKind {
    Policy(Kind),
    Route(&'static str),
}

impl std::fmt::Display for CliKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliKind::Policy(k) => k.fmt(f),
            CliKind::Route(k) => f.write_str(k),
        }
    }
}

fn kind_arg(kind: &str) -> anyhow::Result<CliKind> {
    if let Some(k) = causeway_api::route::kind_from_cli(kind) {
        return Ok(CliKind::Route(k));
    }
    Kind::from_cli(kind).map(CliKind::Policy).with_context(|| {
        format!(
            "unknown kind {kind:?}: expected authorizationpolicies (ap), peerauthentications (pa), requestauthentications (ra), virtualservices (vs) or destinationrules (dr)"
        )
    })
}

fn list_path(kind: CliKind, namespace: Option<&str>, name: Option<&str>) -> String {
    let mut path = match kind {
        CliKind::Policy(k) => format!("/v1/policies?kind={}", k.as_str()),
        CliKind::Route(k) => format!("/v1/routes?kind={k}"),
    };
    if let Some(ns) = namespace {
        path.push_str(&format!("&namespace={ns}"));
    }
    if let Some(n) = name {
        path.push_str(&format!("&name={n}"));
    }
    path
}

/// `causewayctl get KIND [NAME] [-n NS | -A]`.
pub(crate) async fn get(
    api: &Api,
    out: Output,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    all_namespaces: bool,
) -> anyhow::Result<()> {
    let kind = kind_arg(kind)?;
    let ns = if all_namespaces {
        None
    } else {
        Some(namespace.unwrap_or("default"))
    };
    if let CliKind::Route(_) = kind {
        return get_routes(api, out, kind, name, ns).await;
    }
    let items: Vec<PolicyItem> = api
        .call(Method::GET, &list_path(kind, ns, name), None)
        .await?
        .typed;
    if let (Some(n), true) = (name, items.is_empty()) {
        bail!(
            "{kind} {n:?} not found in namespace {}",
            ns.unwrap_or("any")
        );
    }
    let resources: Vec<&Resource> = items.iter().map(|i| &i.resource).collect();
    match out {
        Output::Json => {
            // A single named resource prints as itself, a list as kubectl's List.
            let value = if name.is_some() && resources.len() == 1 {
                serde_json::to_value(resources[0])?
            } else {
                serde_json::json!({"apiVersion": "v1", "kind": "List", "items": resources})
            };
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        Output::Yaml => {
            for r in &resources {
                print!("---\n{}", serde_yaml_ng::to_string(r)?);
            }
        }
        Output::Text => {
            let rows = items
                .iter()
                .map(|i| {
                    let m = i.resource.metadata();
                    let detail = match &i.resource {
                        Resource::AuthorizationPolicy(p) => format!(
                            "{} {} rule{}",
                            p.spec.action,
                            p.spec.rules.as_ref().map_or(0, Vec::len),
                            if p.spec.rules.as_ref().map_or(0, Vec::len) == 1 {
                                ""
                            } else {
                                "s"
                            }
                        ),
                        Resource::PeerAuthentication(p) => format!(
                            "{:?}{}",
                            p.spec.mtls.clone().unwrap_or_default().mode,
                            if p.spec.port_level_mtls.is_empty() {
                                String::new()
                            } else {
                                format!(" ({} port-level)", p.spec.port_level_mtls.len())
                            }
                        )
                        .to_ascii_uppercase(),
                        Resource::RequestAuthentication(p) => format!(
                            "{} JWT rule{}: {}",
                            p.spec.jwt_rules.len(),
                            if p.spec.jwt_rules.len() == 1 { "" } else { "s" },
                            p.spec
                                .jwt_rules
                                .iter()
                                .map(|r| r.issuer.as_str())
                                .collect::<Vec<_>>()
                                .join(",")
                        ),
                    };
                    let selector = match &i.resource {
                        Resource::AuthorizationPolicy(p) => p.spec.selector.clone(),
                        Resource::PeerAuthentication(p) => p.spec.selector.clone(),
                        Resource::RequestAuthentication(p) => p.spec.selector.clone(),
                    }
                    .map(|s| {
                        s.match_labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "<all>".into());
                    vec![
                        m.namespace().to_owned(),
                        m.name.clone(),
                        detail,
                        selector,
                        i.version.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["NAMESPACE", "NAME", "MODE/ACTION", "SELECTOR", "VERSION"],
                    rows
                )
            );
        }
    }
    Ok(())
}

/// `causewayctl get vs|dr`.
async fn get_routes(
    api: &Api,
    out: Output,
    kind: CliKind,
    name: Option<&str>,
    ns: Option<&str>,
) -> anyhow::Result<()> {
    let items: Vec<RouteItem> = api
        .call(Method::GET, &list_path(kind, ns, name), None)
        .await?
        .typed;
    if let (Some(n), true) = (name, items.is_empty()) {
        bail!(
            "{kind} {n:?} not found in namespace {}",
            ns.unwrap_or("any")
        );
    }
    let resources: Vec<&RouteResource> = items.iter().map(|i| &i.resource).collect();
    match out {
        Output::Json => {
            let value = if name.is_some() && resources.len() == 1 {
                serde_json::to_value(resources[0])?
            } else {
                serde_json::json!({"apiVersion": "v1", "kind": "List", "items": resources})
            };
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        Output::Yaml => {
            for r in &resources {
                print!("---\n{}", serde_yaml_ng::to_string(r)?);
            }
        }
        Output::Text => {
            let rows = items
                .iter()
                .map(|i| {
                    let m = i.resource.metadata();
                    let (hosts, detail) = match &i.resource {
                        RouteResource::VirtualService(v) => (
                            v.spec.hosts.join(","),
                            format!(
                                "{} http, {} tcp routes",
                                v.spec.http.len(),
                                v.spec.tcp.len()
                            ),
                        ),
                        RouteResource::DestinationRule(d) => (
                            d.spec.host.clone(),
                            format!(
                                "subsets: {}",
                                d.spec
                                    .subsets
                                    .iter()
                                    .map(|s| s.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(",")
                            ),
                        ),
                    };
                    vec![
                        m.namespace().to_owned(),
                        m.name.clone(),
                        hosts,
                        detail,
                        i.version.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["NAMESPACE", "NAME", "HOSTS", "ROUTES/SUBSETS", "VERSION"],
                    rows
                )
            );
        }
    }
    Ok(())
}

async fn delete_keys(api: &Api, out: Output, path: &str, keys: Vec<String>) -> anyhow::Result<()> {
    let body = serde_json::to_value(DeleteRequest { keys })?;
    let answer: Answer<DeleteResponse> = api.call(Method::POST, path, Some(body)).await?;
    let resp = &answer.typed;
    super::print(out, &answer.raw, |_| {
        let mut text: String = resp
            .deleted
            .iter()
            .map(|k| format!("{k} deleted\n"))
            .collect();
        text.push_str(&format!("mesh version {}\n", resp.version));
        text
    });
    Ok(())
}

/// `causewayctl delete -f FILE` or `causewayctl delete KIND NAME -n NS`.
pub(crate) async fn delete(
    api: &Api,
    out: Output,
    files: &[PathBuf],
    kind: Option<&str>,
    name: Option<&str>,
    namespace: Option<&str>,
) -> anyhow::Result<()> {
    let (policy_keys, route_keys): (Vec<String>, Vec<String>) = match (files.is_empty(), kind, name)
    {
        (false, None, None) => {
            let loaded = load(files, namespace)?;
            (
                loaded
                    .policies
                    .iter()
                    .map(|r| {
                        let m = r.metadata();
                        format!("{}/{}/{}", r.kind(), m.namespace(), m.name)
                    })
                    .collect(),
                loaded.routes.iter().map(RouteResource::key).collect(),
            )
        }
        (true, Some(kind), Some(name)) => {
            let key = format!(
                "{}/{}/{name}",
                kind_arg(kind)?,
                namespace.unwrap_or("default")
            );
            match kind_arg(kind)? {
                CliKind::Policy(_) => (vec![key], Vec::new()),
                CliKind::Route(_) => (Vec::new(), vec![key]),
            }
        }
        _ => bail!(
            "give either -f FILE or KIND NAME (e.g. `causewayctl delete ap allow-web -n shop`)"
        ),
    };
    // Routes first: a DestinationRule still named by a route is refused before anything
    // is deleted.
    if !route_keys.is_empty() {
        delete_keys(api, out, "/v1/routes/delete", route_keys).await?;
    }
    if !policy_keys.is_empty() {
        delete_keys(api, out, "/v1/policies/delete", policy_keys).await?;
    }
    Ok(())
}

/// `causewayctl why --from SRC --to DST[:PORT]`.
pub(crate) async fn why(api: &Api, out: Output, req: WhyRequest) -> anyhow::Result<()> {
    let answer: Answer<WhyResponse> = api
        .call(Method::POST, "/v1/why", Some(serde_json::to_value(req)?))
        .await?;
    let resp = &answer.typed;
    super::print(out, &answer.raw, |_| {
        let mut text = String::new();
        for (i, s) in resp.steps.iter().enumerate() {
            let mark = match s.matched {
                Some(true) => " [matched]",
                Some(false) => " [no match]",
                None => "",
            };
            text.push_str(&format!(
                "{:>2}. {:<20}{} {}\n",
                i + 1,
                s.step,
                mark,
                s.detail
            ));
        }
        if !resp.recent_denials.is_empty() {
            text.push_str("recent refusals of this source reported by the destination's agent:\n");
            for d in &resp.recent_denials {
                let when = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(d.unix_ms),
                );
                text.push_str(&format!(
                    "    {when}  {} {} → port {}  by {}\n",
                    if d.source_principal.is_empty() {
                        "(plaintext)"
                    } else {
                        &d.source_principal
                    },
                    d.source_address,
                    d.port,
                    d.policy
                ));
            }
        }
        if let Some(r) = &resp.routing {
            text.push_str(&routing_text(r));
        }
        text.push_str(&format!(
            "=> {}{}\n",
            resp.decision.to_ascii_uppercase(),
            resp.policy
                .as_deref()
                .map(|p| format!(" by {p}"))
                .unwrap_or_default()
        ));
        text
    });
    Ok(())
}

/// The routing part of `why` as text: the routes looked at, then where the request goes.
fn routing_text(r: &causeway_api::route::why::RouteWhy) -> String {
    let mut text = format!("routing ({}, as the source's agent decides):\n", r.protocol);
    for c in &r.candidates {
        text.push_str(&format!(
            "    {} {} {} {}\n",
            if c.matched {
                "[taken]   "
            } else {
                "[no match]"
            },
            c.virtual_service,
            c.route,
            c.reason
        ));
    }
    text.push_str(&format!("    {}\n", r.summary));
    for d in &r.destinations {
        text.push_str(&format!(
            "    -> {}{} port {} weight {}/{}: {}{}{}{}\n",
            d.service,
            d.subset
                .as_ref()
                .map(|s| format!(" subset {s} {:?}", d.labels))
                .unwrap_or_default(),
            d.port,
            d.weight,
            r.total_weight,
            d.load_balancer,
            d.destination_rule
                .as_ref()
                .map(|dr| format!(" (DestinationRule {dr})"))
                .unwrap_or_default(),
            d.outlier_detection
                .as_ref()
                .and_then(|o| serde_json::to_string(o).ok())
                .map(|o| format!(", outlierDetection {o}"))
                .unwrap_or_default(),
            d.connection_pool
                .as_ref()
                .and_then(|p| serde_json::to_string(p).ok())
                .map(|p| format!(", connectionPool {p}"))
                .unwrap_or_default(),
        ));
        text.push_str(&format!(
            "       endpoints: {}\n",
            if d.endpoints.is_empty() {
                "none (the request gets 503 UH)".to_owned()
            } else {
                d.endpoints.join(", ")
            }
        ));
        for x in &d.excluded {
            text.push_str(&format!("       left out: {x}\n"));
        }
    }
    if let Some(m) = &r.mirror {
        text.push_str(&format!("    mirror: {m}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const GOOD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {action: DENY, rules: [{}]}\n";

    #[test]
    fn load_fills_namespace_and_reads_directories() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", GOOD);
        write(
            dir.path(),
            "b.json",
            r#"{"apiVersion":"security.istio.io/v1","kind":"PeerAuthentication","metadata":{"name":"b","namespace":"shop"},"spec":{"mtls":{"mode":"STRICT"}}}"#,
        );
        write(dir.path(), "notes.txt", "ignored");
        let rs = load(&[dir.path().to_path_buf()], Some("shop"))
            .unwrap()
            .policies;
        assert_eq!(rs.len(), 2);
        assert_eq!(rs[0].display_name(), "AuthorizationPolicy shop/a");
        assert_eq!(rs[1].display_name(), "PeerAuthentication shop/b");
    }

    #[test]
    fn any_error_in_any_file_loads_nothing_and_names_file_doc_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let good = write(dir.path(), "good.yaml", GOOD);
        let bad = write(
            dir.path(),
            "policy.yaml",
            &format!(
                "{GOOD}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: b}}\nspec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/8\", \"10.0.0/8\"]\n"
            ),
        );
        let err = load(&[good, bad.clone()], None).unwrap_err().to_string();
        let want = format!(
            "{} doc 2: spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0/8\" is not a CIDR",
            bad.display()
        );
        assert!(err.contains(&want), "{err}");
        assert!(err.starts_with("nothing applied"), "{err}");
        let unknown = write(
            dir.path(),
            "u.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n",
        );
        let err = load(&[unknown], None).unwrap_err().to_string();
        assert!(err.contains("unknown kind \"Secret\""), "{err}");
        let conflict = write(
            dir.path(),
            "c.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: x}\n",
        );
        let err = load(&[conflict], Some("y")).unwrap_err().to_string();
        assert!(err.contains("differs from -n y"), "{err}");
        let err = load(&[dir.path().join("missing.yaml")], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read") && err.contains("missing.yaml"),
            "{err}"
        );
    }
}
