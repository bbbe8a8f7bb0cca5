//! Validation of VirtualServices and DestinationRules: what Istio refuses, plus the Istio
//! fields Causeway does not implement (refused by name rather than silently ignored).
//! Every problem is reported at once, each with its field path.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::resource::{
    Destination, DestinationRule, Headers, HttpMatchRequest, HttpRoute, LoadBalancerSettings,
    Percent, StringMatch, TrafficPolicy, VirtualService,
};
use crate::identity::validate_label;
use crate::policy::Metadata;
use crate::policy::validate::Problem;

fn problem(path: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        path: path.into(),
        message: message.into(),
    }
}

/// Envoy's retry conditions that Istio accepts in `retryOn` (numeric status codes too).
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Load-balancing algorithms of `loadBalancer.simple`.
pub const LB_SIMPLE: &[&str] = &[
    "UNSPECIFIED",
    "ROUND_ROBIN",
    "LEAST_REQUEST",
    "LEAST_CONN",
    "RANDOM",
    "PASSTHROUGH",
];

/// Parses a duration as Istio writes them (Go's syntax: `10s`, `1.5s`, `250ms`, `1m30s`,
/// `1h`). A negative duration is an error naming it.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(format!("{text:?} is negative; a duration is 0s or more"));
    }
    if t.is_empty() {
        return Err("empty; write a duration such as 5s or 250ms".to_owned());
    }
    let mut total = 0f64;
    let mut rest = t.strip_prefix('+').unwrap_or(t);
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?} has a number without a unit (ns, us, ms, s, m, h)"))?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{text:?} is not a duration such as 5s or 250ms"))?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, after) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(format!(
                    "{text:?} has an unknown unit {unit:?}; use ns, us, ms, s, m or h"
                ));
            }
        };
        total += n * scale;
        rest = after;
    }
    if !total.is_finite() || total > 10.0 * 365.0 * 86400.0 {
        return Err(format!("{text:?} is too long"));
    }
    Ok(Duration::from_secs_f64(total))
}

fn check_duration(out: &mut Vec<Problem>, path: &str, v: &Option<String>, min: Duration) {
    if let Some(v) = v {
        match parse_duration(v) {
            Ok(d) if d < min => out.push(problem(
                path,
                format!("{v:?} is shorter than {min:?}, the least accepted here"),
            )),
            Ok(_) => {}
            Err(e) => out.push(problem(path, e)),
        }
    }
}

fn unsupported<T>(out: &mut Vec<Problem>, path: &str, v: &Option<T>, what: &str) {
    if v.is_some() {
        out.push(problem(
            path,
            format!("{what} is not supported by Causeway yet; remove it (nothing was applied)"),
        ));
    }
}

fn check_metadata(out: &mut Vec<Problem>, m: &Metadata) {
    if let Err(e) = validate_label("name", &m.name) {
        out.push(problem("metadata.name", e.to_string()));
    }
    if let Err(e) = validate_label("namespace", m.namespace()) {
        out.push(problem("metadata.namespace", e.to_string()));
    }
}

fn check_host(out: &mut Vec<Problem>, path: &str, host: &str) {
    if host.is_empty() {
        out.push(problem(
            path,
            "empty; name a mesh service (web, web.default, web.default.causeway, web.service.consul)",
        ));
        return;
    }
    if host == "*" || host.starts_with("*.") {
        out.push(problem(
            path,
            format!("{host:?}: wildcard hosts are not supported; name each service"),
        ));
        return;
    }
    let ok = host.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !ok || host.len() > 253 {
        out.push(problem(
            path,
            format!("{host:?} is not a DNS name; name a mesh service such as web.default"),
        ));
    }
}

fn check_string_match(out: &mut Vec<Problem>, path: &str, m: &StringMatch) {
    let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set != 1 {
        out.push(problem(
            path,
            format!("needs exactly one of exact, prefix or regex ({set} given)"),
        ));
    }
    if let Some(re) = &m.regex
        && let Err(e) = regex::Regex::new(&format!("^(?:{re})$"))
    {
        let first = e.to_string();
        let line = first.lines().last().unwrap_or("").trim().to_owned();
        out.push(problem(
            format!("{path}.regex"),
            format!("{re:?} does not compile: {line}"),
        ));
    }
}

fn check_percent(out: &mut Vec<Problem>, path: &str, p: &Option<Percent>) {
    if let Some(p) = p
        && !(0.0..=100.0).contains(&p.value)
    {
        out.push(problem(
            format!("{path}.value"),
            format!("{} is not a percentage between 0 and 100", p.value),
        ));
    }
}

fn check_header_name(out: &mut Vec<Problem>, path: &str, name: &str) {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        out.push(problem(path, format!("{name:?} is not a header name")));
    } else if name.bytes().any(|b| b.is_ascii_uppercase()) {
        out.push(problem(
            path,
            format!(
                "{name:?}: header names are matched in lower case; write {:?}",
                name.to_ascii_lowercase()
            ),
        ));
    }
}

fn check_headers(out: &mut Vec<Problem>, path: &str, h: &Option<Headers>) {
    let Some(h) = h else { return };
    for (side, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        for name in ops
            .set
            .keys()
            .chain(ops.add.keys())
            .chain(ops.remove.iter())
        {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                out.push(problem(
                    format!("{path}.{side}"),
                    format!("{name:?} is not a header name"),
                ));
            }
        }
    }
}

fn check_destination(out: &mut Vec<Problem>, path: &str, d: &Destination) {
    check_host(out, &format!("{path}.host"), &d.host);
    if let Some(s) = &d.subset
        && let Err(e) = validate_label("subset", s)
    {
        out.push(problem(format!("{path}.subset"), e.to_string()));
    }
    if let Some(p) = &d.port
        && !(1..=65535).contains(&p.number)
    {
        out.push(problem(
            format!("{path}.port.number"),
            format!("{} is not a port (1..65535)", p.number),
        ));
    }
}

fn check_weights(out: &mut Vec<Problem>, path: &str, weights: &[Option<i64>]) {
    for (i, w) in weights.iter().enumerate() {
        if let Some(w) = w
            && !(0..=100).contains(w)
        {
            out.push(problem(
                format!("{path}[{i}].weight"),
                format!("{w} is not a weight between 0 and 100"),
            ));
        }
    }
    if weights.len() > 1 {
        let sum: i64 = weights.iter().map(|w| w.unwrap_or(0)).sum();
        if sum != 100 {
            out.push(problem(
                path,
                format!("the weights sum to {sum}; with several destinations they must sum to 100"),
            ));
        }
    }
}

fn check_http_match(out: &mut Vec<Problem>, path: &str, m: &HttpMatchRequest) {
    for (field, v) in [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(v) = v {
            check_string_match(out, &format!("{path}.{field}"), v);
        }
    }
    for (field, map) in [
        ("headers", &m.headers),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (name, v) in map {
            check_header_name(out, &format!("{path}.{field}"), name);
            check_string_match(out, &format!("{path}.{field}.{name}"), v);
        }
    }
    for (name, v) in &m.query_params {
        check_string_match(out, &format!("{path}.queryParams.{name}"), v);
    }
    if let Some(p) = m.port
        && !(1..=65535).contains(&p)
    {
        out.push(problem(
            format!("{path}.port"),
            format!("{p} is not a port (1..65535)"),
        ));
    }
    unsupported(
        out,
        &format!("{path}.statPrefix"),
        &m.stat_prefix,
        "statPrefix",
    );
}

fn check_http_route(out: &mut Vec<Problem>, path: &str, r: &HttpRoute) {
    for (i, m) in r.matches.iter().enumerate() {
        check_http_match(out, &format!("{path}.match[{i}]"), m);
    }
    unsupported(out, &format!("{path}.redirect"), &r.redirect, "redirect");
    unsupported(
        out,
        &format!("{path}.directResponse"),
        &r.direct_response,
        "directResponse",
    );
    unsupported(out, &format!("{path}.delegate"), &r.delegate, "delegate");
    unsupported(
        out,
        &format!("{path}.corsPolicy"),
        &r.cors_policy,
        "corsPolicy",
    );
    unsupported(
        out,
        &format!("{path}.mirrors"),
        &r.mirrors,
        "mirrors (several mirror targets); use mirror",
    );
    if r.route.is_empty() {
        out.push(problem(
            format!("{path}.route"),
            "empty; an HTTP route needs at least one destination",
        ));
    }
    for (i, d) in r.route.iter().enumerate() {
        let p = format!("{path}.route[{i}]");
        check_destination(out, &format!("{p}.destination"), &d.destination);
        check_headers(out, &format!("{p}.headers"), &d.headers);
    }
    let weights: Vec<_> = r.route.iter().map(|d| d.weight).collect();
    check_weights(out, &format!("{path}.route"), &weights);
    check_duration(out, &format!("{path}.timeout"), &r.timeout, Duration::ZERO);
    if let Some(retries) = &r.retries {
        let p = format!("{path}.retries");
        if retries.attempts < 0 {
            out.push(problem(
                format!("{p}.attempts"),
                format!("{} is negative; 0 turns retries off", retries.attempts),
            ));
        }
        check_duration(
            out,
            &format!("{p}.perTryTimeout"),
            &retries.per_try_timeout,
            Duration::from_millis(1),
        );
        if let Some(on) = &retries.retry_on {
            for cond in on.split(',').map(str::trim) {
                let numeric = cond.parse::<u16>().is_ok_and(|c| (100..600).contains(&c));
                if !numeric && !RETRY_ON.contains(&cond) {
                    out.push(problem(
                        format!("{p}.retryOn"),
                        format!(
                            "{cond:?} is not a retry condition; use {} or an HTTP status code",
                            RETRY_ON.join(", ")
                        ),
                    ));
                }
            }
        }
    }
    if let Some(f) = &r.fault {
        let p = format!("{path}.fault");
        if let Some(d) = &f.delay {
            if d.fixed_delay.is_none() {
                out.push(problem(
                    format!("{p}.delay.fixedDelay"),
                    "missing; a delay needs fixedDelay (e.g. 200ms)",
                ));
            }
            check_duration(
                out,
                &format!("{p}.delay.fixedDelay"),
                &d.fixed_delay,
                Duration::from_millis(1),
            );
            check_percent(out, &format!("{p}.delay.percentage"), &d.percentage);
            if let Some(pc) = d.percent
                && !(0..=100).contains(&pc)
            {
                out.push(problem(
                    format!("{p}.delay.percent"),
                    format!("{pc} is not a percentage between 0 and 100"),
                ));
            }
        }
        if let Some(a) = &f.abort {
            unsupported(
                out,
                &format!("{p}.abort.grpcStatus"),
                &a.grpc_status,
                "abort.grpcStatus",
            );
            match a.http_status {
                Some(s) if !(200..=599).contains(&s) => out.push(problem(
                    format!("{p}.abort.httpStatus"),
                    format!("{s} is not an HTTP status between 200 and 599"),
                )),
                None if a.grpc_status.is_none() => out.push(problem(
                    format!("{p}.abort.httpStatus"),
                    "missing; an abort needs httpStatus (e.g. 503)",
                )),
                _ => {}
            }
            check_percent(out, &format!("{p}.abort.percentage"), &a.percentage);
        }
    }
    if let Some(m) = &r.mirror {
        check_destination(out, &format!("{path}.mirror"), m);
    } else if r.mirror_percentage.is_some() || r.mirror_percent.is_some() {
        out.push(problem(
            format!("{path}.mirrorPercentage"),
            "given without mirror; name the mirror target",
        ));
    }
    check_percent(
        out,
        &format!("{path}.mirrorPercentage"),
        &r.mirror_percentage,
    );
    if let Some(pc) = r.mirror_percent
        && !(0..=100).contains(&pc)
    {
        out.push(problem(
            format!("{path}.mirrorPercent"),
            format!("{pc} is not a percentage between 0 and 100"),
        ));
    }
    check_headers(out, &format!("{path}.headers"), &r.headers);
    if let Some(rw) = &r.rewrite {
        unsupported(
            out,
            &format!("{path}.rewrite.uriRegexRewrite"),
            &rw.uri_regex_rewrite,
            "rewrite.uriRegexRewrite",
        );
    }
}

/// Validates a VirtualService on its own (subsets are checked against DestinationRules by
/// [`check_subsets`]).
pub fn validate_virtual_service(vs: &VirtualService) -> Vec<Problem> {
    let mut out = Vec::new();
    check_metadata(&mut out, &vs.metadata);
    let s = &vs.spec;
    if s.hosts.is_empty() {
        out.push(problem(
            "spec.hosts",
            "empty; name the services this VirtualService routes (e.g. [web])",
        ));
    }
    for (i, h) in s.hosts.iter().enumerate() {
        check_host(&mut out, &format!("spec.hosts[{i}]"), h);
    }
    unsupported(&mut out, "spec.tls", &s.tls, "TLS routes (spec.tls)");
    if s.http.is_empty() && s.tcp.is_empty() && s.tls.is_none() {
        out.push(problem(
            "spec",
            "no http or tcp routes; a VirtualService needs at least one",
        ));
    }
    for (i, r) in s.http.iter().enumerate() {
        check_http_route(&mut out, &format!("spec.http[{i}]"), r);
    }
    for (i, r) in s.tcp.iter().enumerate() {
        let path = format!("spec.tcp[{i}]");
        if r.route.is_empty() {
            out.push(problem(
                format!("{path}.route"),
                "empty; a TCP route needs at least one destination",
            ));
        }
        for (j, d) in r.route.iter().enumerate() {
            check_destination(
                &mut out,
                &format!("{path}.route[{j}].destination"),
                &d.destination,
            );
        }
        let weights: Vec<_> = r.route.iter().map(|d| d.weight).collect();
        check_weights(&mut out, &format!("{path}.route"), &weights);
        for (j, m) in r.matches.iter().enumerate() {
            if let Some(p) = m.port
                && !(1..=65535).contains(&p)
            {
                out.push(problem(
                    format!("{path}.match[{j}].port"),
                    format!("{p} is not a port (1..65535)"),
                ));
            }
            for (k, net) in m.destination_subnets.iter().enumerate() {
                if crate::policy::validate::parse_cidr(net).is_none() {
                    out.push(problem(
                        format!("{path}.match[{j}].destinationSubnets[{k}]"),
                        format!("{net:?} is not an address or CIDR"),
                    ));
                }
            }
        }
    }
    out
}

fn check_lb(out: &mut Vec<Problem>, path: &str, lb: &LoadBalancerSettings) {
    if let Some(simple) = &lb.simple
        && !LB_SIMPLE.contains(&simple.as_str())
    {
        out.push(problem(
            format!("{path}.simple"),
            format!(
                "{simple:?} is not a load balancer; use {}",
                LB_SIMPLE.join(", ")
            ),
        ));
    }
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        out.push(problem(path, "give simple or consistentHash, not both"));
    }
    if let Some(h) = &lb.consistent_hash {
        let keys = [
            h.http_header_name.is_some(),
            h.http_cookie.is_some(),
            h.use_source_ip.is_some(),
            h.http_query_parameter_name.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if keys != 1 {
            out.push(problem(
                format!("{path}.consistentHash"),
                format!(
                    "needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName ({keys} given)"
                ),
            ));
        }
        if let Some(c) = &h.http_cookie {
            if c.name.is_empty() {
                out.push(problem(
                    format!("{path}.consistentHash.httpCookie.name"),
                    "empty; name the cookie",
                ));
            }
            check_duration(
                out,
                &format!("{path}.consistentHash.httpCookie.ttl"),
                &c.ttl,
                Duration::ZERO,
            );
        }
    }
    if let Some(l) = &lb.locality_lb_setting {
        let p = format!("{path}.localityLbSetting");
        if !l.distribute.is_empty() && !l.failover.is_empty() {
            out.push(problem(
                &p,
                "give distribute or failover, not both (Istio's rule)",
            ));
        }
        for (i, d) in l.distribute.iter().enumerate() {
            let sum: u32 = d.to.values().sum();
            if sum != 100 {
                out.push(problem(
                    format!("{p}.distribute[{i}].to"),
                    format!("the weights sum to {sum}; they must sum to 100"),
                ));
            }
            if d.from.is_empty() {
                out.push(problem(
                    format!("{p}.distribute[{i}].from"),
                    "empty; name a locality region/zone/subzone (wildcards allowed)",
                ));
            }
        }
        for (i, f) in l.failover.iter().enumerate() {
            if f.from.is_empty() || f.to.is_empty() || f.from == f.to {
                out.push(problem(
                    format!("{p}.failover[{i}]"),
                    format!(
                        "from {:?} to {:?}: both must name regions, and differ",
                        f.from, f.to
                    ),
                ));
            }
        }
    }
    unsupported(
        out,
        &format!("{path}.warmupDurationSecs"),
        &lb.warmup_duration_secs,
        "warmupDurationSecs",
    );
}

fn check_traffic_policy(out: &mut Vec<Problem>, path: &str, t: &TrafficPolicy) {
    if let Some(lb) = &t.load_balancer {
        check_lb(out, &format!("{path}.loadBalancer"), lb);
    }
    if let Some(cp) = &t.connection_pool {
        let p = format!("{path}.connectionPool");
        if let Some(tcp) = &cp.tcp {
            if let Some(n) = tcp.max_connections
                && n < 1
            {
                out.push(problem(
                    format!("{p}.tcp.maxConnections"),
                    format!("{n} is not a limit; use 1 or more"),
                ));
            }
            check_duration(
                out,
                &format!("{p}.tcp.connectTimeout"),
                &tcp.connect_timeout,
                Duration::from_millis(1),
            );
            check_duration(
                out,
                &format!("{p}.tcp.idleTimeout"),
                &tcp.idle_timeout,
                Duration::ZERO,
            );
        }
        if let Some(h) = &cp.http {
            for (field, v) in [
                ("http1MaxPendingRequests", h.http1_max_pending_requests),
                ("http2MaxRequests", h.http2_max_requests),
                ("maxRequestsPerConnection", h.max_requests_per_connection),
                ("maxRetries", h.max_retries),
                ("maxConcurrentStreams", h.max_concurrent_streams),
            ] {
                if let Some(n) = v
                    && n < 0
                {
                    out.push(problem(
                        format!("{p}.http.{field}"),
                        format!("{n} is negative"),
                    ));
                }
            }
            check_duration(
                out,
                &format!("{p}.http.idleTimeout"),
                &h.idle_timeout,
                Duration::ZERO,
            );
        }
    }
    if let Some(o) = &t.outlier_detection {
        let p = format!("{path}.outlierDetection");
        for (field, v) in [
            ("consecutive5xxErrors", o.consecutive_5xx_errors),
            ("consecutiveGatewayErrors", o.consecutive_gateway_errors),
            ("consecutiveErrors", o.consecutive_errors),
            (
                "consecutiveLocalOriginFailures",
                o.consecutive_local_origin_failures,
            ),
        ] {
            if let Some(n) = v
                && n < 0
            {
                out.push(problem(format!("{p}.{field}"), format!("{n} is negative")));
            }
        }
        for (field, v) in [
            ("maxEjectionPercent", o.max_ejection_percent),
            ("minHealthPercent", o.min_health_percent),
        ] {
            if let Some(n) = v
                && !(0..=100).contains(&n)
            {
                out.push(problem(
                    format!("{p}.{field}"),
                    format!("{n} is not a percentage between 0 and 100"),
                ));
            }
        }
        check_duration(
            out,
            &format!("{p}.interval"),
            &o.interval,
            Duration::from_millis(1),
        );
        check_duration(
            out,
            &format!("{p}.baseEjectionTime"),
            &o.base_ejection_time,
            Duration::from_millis(1),
        );
    }
    unsupported(
        out,
        &format!("{path}.tls"),
        &t.tls,
        "tls (the mesh's mutual TLS is automatic)",
    );
    unsupported(
        out,
        &format!("{path}.portLevelSettings"),
        &t.port_level_settings,
        "portLevelSettings",
    );
    unsupported(out, &format!("{path}.tunnel"), &t.tunnel, "tunnel");
    unsupported(
        out,
        &format!("{path}.proxyProtocol"),
        &t.proxy_protocol,
        "proxyProtocol",
    );
}

/// Validates a DestinationRule.
pub fn validate_destination_rule(dr: &DestinationRule) -> Vec<Problem> {
    let mut out = Vec::new();
    check_metadata(&mut out, &dr.metadata);
    let s = &dr.spec;
    check_host(&mut out, "spec.host", &s.host);
    if let Some(t) = &s.traffic_policy {
        check_traffic_policy(&mut out, "spec.trafficPolicy", t);
    }
    let mut names = BTreeSet::new();
    for (i, sub) in s.subsets.iter().enumerate() {
        let p = format!("spec.subsets[{i}]");
        if let Err(e) = validate_label("subset name", &sub.name) {
            out.push(problem(format!("{p}.name"), e.to_string()));
        }
        if !names.insert(sub.name.as_str()) {
            out.push(problem(
                format!("{p}.name"),
                format!("subset {:?} is defined twice", sub.name),
            ));
        }
        if let Some(t) = &sub.traffic_policy {
            check_traffic_policy(&mut out, &format!("{p}.trafficPolicy"), t);
        }
    }
    unsupported(
        &mut out,
        "spec.workloadSelector",
        &s.workload_selector,
        "workloadSelector",
    );
    out
}

/// The mesh service a host names, as `(namespace, name)`, in any of the agent's DNS
/// forms: `web` (the resource's namespace), `web.shop`, `web.shop.causeway`,
/// `web.shop.svc.cluster.local`, `web.service.consul` and `web.service.DC.consul`
/// (namespace `default`, where Consul services land unless a source says otherwise).
pub fn service_of_host(host: &str, resource_namespace: &str) -> (String, String) {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = h.split('.').collect();
    match labels.as_slice() {
        [name] => (resource_namespace.to_owned(), (*name).to_owned()),
        [name, "service", "consul"] | [name, "service", _, "consul"] => {
            ("default".to_owned(), (*name).to_owned())
        }
        [name, ns] | [name, ns, "causeway"] | [name, ns, "svc", ..] => {
            ((*ns).to_owned(), (*name).to_owned())
        }
        [name, ns, ..] => ((*ns).to_owned(), (*name).to_owned()),
        [] => (resource_namespace.to_owned(), String::new()),
    }
}

/// (namespace, service) → the subset names defined for it, and the rules defining them.
type SubsetsByService<'a> = BTreeMap<(String, String), (BTreeSet<&'a str>, Vec<String>)>;

/// Subsets named by routes that no DestinationRule for that host defines: each problem
/// names the VirtualService's field and the DestinationRules looked at.
pub fn check_subsets(vs: &VirtualService, rules: &[&DestinationRule]) -> Vec<Problem> {
    let ns = vs.metadata.namespace();
    // (namespace, service) → subset names, and the rules that define them.
    let mut defined: SubsetsByService<'_> = BTreeMap::new();
    for dr in rules {
        let key = service_of_host(&dr.spec.host, dr.metadata.namespace());
        let entry = defined.entry(key).or_default();
        entry
            .0
            .extend(dr.spec.subsets.iter().map(|s| s.name.as_str()));
        entry.1.push(format!(
            "DestinationRule {}/{}",
            dr.metadata.namespace(),
            dr.metadata.name
        ));
    }
    let mut out = Vec::new();
    let mut check = |path: String, d: &Destination| {
        let Some(subset) = &d.subset else { return };
        let key = service_of_host(&d.host, ns);
        match defined.get(&key) {
            Some((subsets, _)) if subsets.contains(subset.as_str()) => {}
            Some((_, names)) => out.push(problem(
                format!("{path}.subset"),
                format!(
                    "subset {subset:?} of {}/{} is not defined by {}; define it there or fix the name",
                    key.0,
                    key.1,
                    names.join(", ")
                ),
            )),
            None => out.push(problem(
                format!("{path}.subset"),
                format!(
                    "subset {subset:?} of {}/{}: no DestinationRule defines subsets for that host; apply one with the subset",
                    key.0, key.1
                ),
            )),
        }
    };
    for (i, r) in vs.spec.http.iter().enumerate() {
        for (j, d) in r.route.iter().enumerate() {
            check(
                format!("spec.http[{i}].route[{j}].destination"),
                &d.destination,
            );
        }
        if let Some(m) = &r.mirror {
            check(format!("spec.http[{i}].mirror"), m);
        }
    }
    for (i, r) in vs.spec.tcp.iter().enumerate() {
        for (j, d) in r.route.iter().enumerate() {
            check(
                format!("spec.tcp[{i}].route[{j}].destination"),
                &d.destination,
            );
        }
    }
    out
}
