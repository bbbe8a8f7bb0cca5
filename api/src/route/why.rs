//! The routing part of `causewayctl why` (issue 21): for a source, a destination service
//! and (for HTTP) the request's attributes, which VirtualService and route the source's
//! agent takes, or why none (each route's first condition that did not hold), where the
//! route sends (service, subset, port, weight), the DestinationRule traffic policy of
//! each destination (load balancing, outlier detection, connection pool) and the
//! endpoints it picks among.
//!
//! The request conditions are evaluated with the agents' own code
//! ([`super::matcher`]); the order follows the agents' route table: VirtualServices of the
//! host oldest first, their routes in order, the first route whose match holds (a route
//! whose every match names another source never applies; a route whose weights are all 0
//! is passed over). Subsets, load balancing and outlier detection come from the oldest
//! DestinationRule defining the subset (the rule's own policy for a destination without
//! subset; the subset's policy overriding the rule's), as the agents compile them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::matcher::{RequestAttrs, RequestMatch, source_applies, subset_selects};
use super::resource::{
    ConnectionPoolSettings, Destination, HttpRoute, LoadBalancerSettings, LocalityLbSetting,
    OutlierDetection, TrafficPolicy,
};
use super::validate::service_of_host;
use super::{DestinationRule, RouteResource, VirtualService};
use crate::admin::ServiceView;

/// A route looked at, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteCandidate {
    /// The VirtualService, `namespace/name`.
    pub virtual_service: String,
    /// The route: its name, or `http[i]` / `tcp[i]`.
    pub route: String,
    /// Whether it was taken.
    pub matched: bool,
    /// Why (for a route not taken: each match entry's first condition that did not hold).
    pub reason: String,
}

/// One destination of the route taken (or the dialled service without one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteDestinationWhy {
    /// The service, `namespace/name`.
    pub service: String,
    /// The subset, if the route names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// The labels an endpoint must carry (the subset's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The port the request goes to.
    pub port: u16,
    /// Its weight among the route's destinations (of `total_weight`).
    pub weight: u32,
    /// The DestinationRule the subset or the traffic policy comes from, `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_rule: Option<String>,
    /// The load balancing, as the agent applies it (`LEAST_REQUEST`, `ROUND_ROBIN`,
    /// `RANDOM`, `consistentHash on …`).
    pub load_balancer: String,
    /// `loadBalancer.localityLbSetting` of the rule, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_lb_setting: Option<LocalityLbSetting>,
    /// `outlierDetection` of the rule, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// `connectionPool` of the rule, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// The endpoints the agent picks among (`address:port`): healthy, with the port, and
    /// carrying the labels.
    pub endpoints: Vec<String>,
    /// Endpoints of the service left out, each with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<String>,
}

/// The routing answer of `why`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteWhy {
    /// The dialled service, `namespace/name`.
    pub service: String,
    /// `http` (routed per request) or `tcp` (per connection).
    pub protocol: String,
    /// The VirtualService taken, `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_service: Option<String>,
    /// The route taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Every route looked at, in order, up to the one taken.
    pub candidates: Vec<RouteCandidate>,
    /// Where the request goes: the route's destinations (drawn by weight), or the dialled
    /// service when no route applies.
    pub destinations: Vec<RouteDestinationWhy>,
    /// The sum of the destinations' weights.
    pub total_weight: u32,
    /// The mirror of the route taken, `service[/subset] at N%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// One line for the operator.
    pub summary: String,
}

/// What [`explain`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct WhyInput<'a> {
    /// The stored routing resources with their creation order (lower is older).
    pub routes: &'a [(u64, &'a RouteResource)],
    /// The mesh's services (for the destinations' endpoints).
    pub services: &'a [ServiceView],
    /// The dialled service, `namespace/name`.
    pub service: &'a str,
    /// The source workload's labels (those of its endpoints, as its agent sees them).
    pub source_labels: &'a BTreeMap<String, String>,
    /// The source workload's namespace.
    pub source_namespace: Option<&'a String>,
    /// The dialled port.
    pub port: u16,
    /// The request, for an HTTP port; `None`: a TCP connection.
    pub http: Option<RequestAttrs<'a>>,
}

fn name_of(m: &crate::policy::Metadata) -> String {
    format!("{}/{}", m.namespace(), m.name)
}

/// The load balancing the agent applies for `lb` (its `LbKind::compile`).
fn lb_text(lb: Option<&LoadBalancerSettings>) -> String {
    let Some(lb) = lb else {
        return "LEAST_REQUEST (default)".into();
    };
    if let Some(h) = &lb.consistent_hash {
        if let Some(name) = &h.http_header_name {
            return format!("consistentHash on header {}", name.to_ascii_lowercase());
        }
        if let Some(c) = &h.http_cookie {
            return format!("consistentHash on cookie {}", c.name);
        }
        if h.use_source_ip == Some(true) {
            return "consistentHash on source IP".into();
        }
        if let Some(q) = &h.http_query_parameter_name {
            return format!("consistentHash on query parameter {q}");
        }
    }
    match lb.simple.as_deref() {
        Some("RANDOM") => "RANDOM".into(),
        Some("ROUND_ROBIN") => "ROUND_ROBIN".into(),
        Some(other) if other != "LEAST_REQUEST" => format!("LEAST_REQUEST ({other})"),
        _ => "LEAST_REQUEST".into(),
    }
}

/// A destination's policy: the subset's (overriding the rule's) or the rule's.
struct Policy<'a> {
    rule: Option<&'a DestinationRule>,
    labels: BTreeMap<String, String>,
    lb: Option<&'a LoadBalancerSettings>,
    outlier: Option<&'a OutlierDetection>,
    pool: Option<&'a ConnectionPoolSettings>,
}

fn policy<'a>(rules: &[&'a DestinationRule], service: &str, subset: Option<&str>) -> Policy<'a> {
    let for_host = rules.iter().filter(|dr| {
        let (ns, name) = service_of_host(&dr.spec.host, dr.metadata.namespace());
        format!("{ns}/{name}") == service
    });
    let pick = |own: Option<&'a TrafficPolicy>, rule: Option<&'a TrafficPolicy>, dr| Policy {
        rule: Some(dr),
        labels: BTreeMap::new(),
        lb: own
            .and_then(|t| t.load_balancer.as_ref())
            .or(rule.and_then(|t| t.load_balancer.as_ref())),
        outlier: own
            .and_then(|t| t.outlier_detection.as_ref())
            .or(rule.and_then(|t| t.outlier_detection.as_ref())),
        pool: own
            .and_then(|t| t.connection_pool.as_ref())
            .or(rule.and_then(|t| t.connection_pool.as_ref())),
    };
    let none = Policy {
        rule: None,
        labels: BTreeMap::new(),
        lb: None,
        outlier: None,
        pool: None,
    };
    match subset {
        None => for_host
            .take(1)
            .map(|dr| pick(None, dr.spec.traffic_policy.as_ref(), dr))
            .next()
            .unwrap_or(none),
        Some(name) => for_host
            .filter_map(|dr| Some((dr, dr.spec.subsets.iter().find(|s| s.name == name)?)))
            .map(|(dr, s)| Policy {
                labels: s.labels.clone(),
                ..pick(
                    s.traffic_policy.as_ref(),
                    dr.spec.traffic_policy.as_ref(),
                    dr,
                )
            })
            .next()
            .unwrap_or(none),
    }
}

fn destination(
    input: &WhyInput<'_>,
    rules: &[&DestinationRule],
    d: &Destination,
    vs_namespace: &str,
    weight: u32,
) -> RouteDestinationWhy {
    let (ns, name) = service_of_host(&d.host, vs_namespace);
    let service = format!("{ns}/{name}");
    let p = policy(rules, &service, d.subset.as_deref());
    let port = d
        .port
        .as_ref()
        .and_then(|p| u16::try_from(p.number).ok())
        .unwrap_or(input.port);
    let mut endpoints = Vec::new();
    let mut excluded = Vec::new();
    let svc = input
        .services
        .iter()
        .find(|s| s.namespace == ns && s.name == name);
    for e in svc.iter().flat_map(|s| s.endpoints.iter()) {
        let at = format!("{}:{port}", e.address);
        if !subset_selects(&p.labels, &e.labels) {
            let missing: Vec<String> = p
                .labels
                .iter()
                .filter(|(k, v)| e.labels.get(*k) != Some(v))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            excluded.push(format!("{at}: lacks {}", missing.join(",")));
        } else if !e.ports.values().any(|p| *p == port) {
            excluded.push(format!("{}: no port {port}", e.address));
        } else if !e.healthy {
            excluded.push(format!("{at}: unhealthy"));
        } else {
            endpoints.push(at);
        }
    }
    if svc.is_none() {
        excluded.push(format!("service {service} is not in the registry"));
    }
    RouteDestinationWhy {
        service,
        subset: d.subset.clone(),
        labels: p.labels,
        port,
        weight,
        destination_rule: p.rule.map(|r| name_of(&r.metadata)),
        load_balancer: lb_text(p.lb),
        locality_lb_setting: p.lb.and_then(|l| l.locality_lb_setting.clone()),
        outlier_detection: p.outlier.cloned(),
        connection_pool: p.pool.cloned(),
        endpoints,
        excluded,
    }
}

/// Weights as the agent reads them: one destination without a weight takes everything.
fn weights(ws: &[Option<i64>]) -> Vec<u32> {
    if ws.len() == 1 && ws[0].unwrap_or(0) == 0 {
        return vec![100];
    }
    ws.iter()
        .map(|w| u32::try_from(w.unwrap_or(0)).unwrap_or(0))
        .collect()
}

/// Why an HTTP route is or is not taken: `Ok(which match)` or `Err(reason)`.
fn http_route_verdict(
    input: &WhyInput<'_>,
    req: &RequestAttrs<'_>,
    r: &HttpRoute,
) -> Result<String, String> {
    if r.matches.is_empty() {
        return Ok("no match conditions: every request".into());
    }
    let mut reasons = Vec::new();
    let mut any_source = false;
    for (j, m) in r.matches.iter().enumerate() {
        let label = m
            .name
            .as_ref()
            .map_or_else(|| format!("match[{j}]"), |n| format!("match {n:?}"));
        if !source_applies(
            &m.source_labels,
            m.source_namespace.as_ref(),
            input.source_labels,
            input.source_namespace,
        ) {
            reasons.push(format!(
                "{label}: sourceLabels {:?}{} not those of the source (labels {:?}, namespace {})",
                m.source_labels,
                m.source_namespace
                    .as_ref()
                    .map(|n| format!(" / sourceNamespace {n}"))
                    .unwrap_or_default(),
                input.source_labels,
                input.source_namespace.map_or("unknown", |n| n.as_str())
            ));
            continue;
        }
        any_source = true;
        match RequestMatch::compile(m).check(req) {
            Ok(_) => return Ok(format!("{label} holds")),
            Err(miss) => reasons.push(format!("{label}: {miss}")),
        }
    }
    if !any_source {
        reasons.push("every match names another source: the route never applies here".into());
    }
    Err(reasons.join("; "))
}

/// Explains the routing of one request or connection.
pub fn explain(input: &WhyInput<'_>) -> RouteWhy {
    let mut rules: Vec<(u64, &DestinationRule)> = Vec::new();
    let mut vss: Vec<(u64, &VirtualService)> = Vec::new();
    for (seq, r) in input.routes {
        match r {
            RouteResource::DestinationRule(d) => rules.push((*seq, d)),
            RouteResource::VirtualService(v) => vss.push((*seq, v)),
        }
    }
    rules.sort_by_key(|(seq, _)| *seq);
    vss.sort_by_key(|(seq, _)| *seq);
    let rules: Vec<&DestinationRule> = rules.into_iter().map(|(_, r)| r).collect();
    let for_service: Vec<&VirtualService> = vss
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| {
            v.spec.hosts.iter().any(|h| {
                let (ns, name) = service_of_host(h, v.metadata.namespace());
                format!("{ns}/{name}") == input.service
            })
        })
        .collect();
    let http = input
        .http
        .as_ref()
        .filter(|_| for_service.iter().any(|v| !v.spec.http.is_empty()));
    let mut out = RouteWhy {
        service: input.service.to_owned(),
        protocol: if http.is_some() { "http" } else { "tcp" }.into(),
        virtual_service: None,
        route: None,
        candidates: Vec::new(),
        destinations: Vec::new(),
        total_weight: 0,
        mirror: None,
        summary: String::new(),
    };
    'found: for vs in &for_service {
        let vs_name = name_of(&vs.metadata);
        let ns = vs.metadata.namespace();
        if let Some(req) = http {
            for (i, r) in vs.spec.http.iter().enumerate() {
                let route = r.name.clone().unwrap_or_else(|| format!("http[{i}]"));
                let ws = weights(&r.route.iter().map(|d| d.weight).collect::<Vec<_>>());
                let total: u32 = ws.iter().sum();
                let verdict = http_route_verdict(input, req, r).and_then(|why| {
                    if total == 0 {
                        Err(format!("{why}, but every weight is 0: passed over"))
                    } else {
                        Ok(why)
                    }
                });
                let matched = verdict.is_ok();
                out.candidates.push(RouteCandidate {
                    virtual_service: vs_name.clone(),
                    route: route.clone(),
                    matched,
                    reason: verdict.unwrap_or_else(|e| e),
                });
                if matched {
                    out.destinations = r
                        .route
                        .iter()
                        .zip(&ws)
                        .map(|(d, w)| destination(input, &rules, &d.destination, ns, *w))
                        .collect();
                    out.total_weight = total;
                    out.mirror = r.mirror.as_ref().map(|m| {
                        let (mns, mname) = service_of_host(&m.host, ns);
                        let pct = r
                            .mirror_percentage
                            .as_ref()
                            .map(|p| p.value)
                            .or(r.mirror_percent.map(|v| v as f64))
                            .unwrap_or(100.0);
                        format!(
                            "{mns}/{mname}{} at {pct}%",
                            m.subset
                                .as_ref()
                                .map(|s| format!(" subset {s}"))
                                .unwrap_or_default()
                        )
                    });
                    out.virtual_service = Some(vs_name.clone());
                    out.route = Some(route);
                    break 'found;
                }
            }
        } else {
            for (i, r) in vs.spec.tcp.iter().enumerate() {
                let route = format!("tcp[{i}]");
                let kept: Vec<_> = r
                    .matches
                    .iter()
                    .filter(|m| {
                        source_applies(
                            &m.source_labels,
                            m.source_namespace.as_ref(),
                            input.source_labels,
                            input.source_namespace,
                        )
                    })
                    .collect();
                let ws = weights(&r.route.iter().map(|d| d.weight).collect::<Vec<_>>());
                let total: u32 = ws.iter().sum();
                let verdict = if !r.matches.is_empty() && kept.is_empty() {
                    Err("every match names another source: the route never applies here".into())
                } else if !(kept.is_empty()
                    || kept.iter().any(|m| {
                        m.port
                            .is_none_or(|p| u16::try_from(p).ok() == Some(input.port))
                    }))
                {
                    Err(format!("no match is for port {}", input.port))
                } else if total == 0 {
                    Err("every weight is 0: passed over".into())
                } else {
                    Ok("applies to the connection".to_owned())
                };
                let matched = verdict.is_ok();
                out.candidates.push(RouteCandidate {
                    virtual_service: vs_name.clone(),
                    route: route.clone(),
                    matched,
                    reason: verdict.unwrap_or_else(|e| e),
                });
                if matched {
                    out.destinations = r
                        .route
                        .iter()
                        .zip(&ws)
                        .map(|(d, w)| destination(input, &rules, &d.destination, ns, *w))
                        .collect();
                    out.total_weight = total;
                    out.virtual_service = Some(vs_name.clone());
                    out.route = Some(route);
                    break 'found;
                }
            }
        }
    }
    if out.route.is_none() {
        // As without routing: the dialled service, every healthy endpoint, the default
        // balancing; with a DestinationRule for the host and no VirtualService, the
        // agent's default route for the rule applies the rule's policy.
        let fallback: &[&DestinationRule] = if for_service.is_empty() { &rules } else { &[] };
        let d = destination(
            input,
            fallback,
            &Destination {
                host: input
                    .service
                    .split_once('/')
                    .map_or_else(|| input.service.to_owned(), |(ns, n)| format!("{n}.{ns}")),
                ..Destination::default()
            },
            "",
            100,
        );
        out.destinations = vec![d];
        out.total_weight = 100;
    }
    out.summary = match (&out.virtual_service, &out.route) {
        (Some(vs), Some(route)) => format!(
            "VirtualService {vs} route {route}: {}",
            out.destinations
                .iter()
                .map(|d| format!(
                    "{}{} weight {}/{} ({} endpoint{})",
                    d.service,
                    d.subset
                        .as_ref()
                        .map(|s| format!(" subset {s}"))
                        .unwrap_or_default(),
                    d.weight,
                    out.total_weight,
                    d.endpoints.len(),
                    if d.endpoints.len() == 1 { "" } else { "s" }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ if for_service.is_empty() => format!(
            "no VirtualService for {}: the {} goes to the service's {} healthy endpoint(s) {}",
            input.service,
            if http.is_some() {
                "request"
            } else {
                "connection"
            },
            out.destinations[0].endpoints.len(),
            rule_note(&out.destinations[0])
        ),
        _ => format!(
            "no route of {} matched: the {} goes to the service's {} healthy endpoint(s) {}",
            for_service
                .iter()
                .map(|v| name_of(&v.metadata))
                .collect::<Vec<_>>()
                .join(", "),
            if input.http.is_some() {
                "request"
            } else {
                "connection"
            },
            out.destinations[0].endpoints.len(),
            rule_note(&out.destinations[0])
        ),
    };
    out
}

/// How traffic without a matching route is balanced: a DestinationRule for the host
/// applies its policy (one try, as the agent's default route for the rule does), else the
/// agent's default balancing.
fn rule_note(d: &RouteDestinationWhy) -> String {
    match &d.destination_rule {
        Some(rule) => format!(
            "under DestinationRule {rule}'s traffic policy ({}, one try)",
            d.load_balancer
        ),
        None => "with the default balancing".to_owned(),
    }
}

#[cfg(test)]
mod tests;
