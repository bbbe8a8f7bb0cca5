//! Locality load balancing (issue 21): a DestinationRule's
//! `trafficPolicy.loadBalancer.localityLbSetting`, with Istio's semantics.
//!
//! A locality is `region/zone/subzone`. An endpoint's comes from its registry (Consul
//! datacenter and zone meta, Kubernetes topology labels of its Node, Eureka region and
//! availability zone) or, for an agent's workload, from its group's
//! `topology.kubernetes.io/region|zone` labels; sub-zones are not carried (every
//! endpoint's is empty). This agent's own locality is its own workload's (its group's
//! labels), the agent config's `zone` overriding the zone.
//!
//! As in Istio, locality load balancing applies only to destinations whose rule has
//! `outlierDetection` (without it the proxy cannot tell an unhealthy locality, and Istio
//! ignores the setting); `enabled: false` turns it off. Each endpoint gets a priority
//! ([`LocalityLb::priority`]) and the balancer sends to the best priority that has a
//! healthy (not ejected) endpoint:
//! - locality-prioritised (the default, and with `failover`): 0 = same region and zone,
//!   1 = same region, other zone, 2 = another region, 3 = another region when a
//!   `failover` entry for this agent's region names a different one (Istio's priorities,
//!   without the sub-zone level);
//! - `failoverPriority`: labels in order; an endpoint matching this workload's values of
//!   the first n labels (and not the n+1st) is ranked by how many it matches, within the
//!   locality priority when `failover` is given too;
//! - `distribute`: the first entry whose `from` matches this agent's locality; each
//!   request draws one of its `to` localities by weight: endpoints there get priority 0,
//!   the other listed localities 1, unlisted ones 2 (used only when nothing listed is
//!   healthy: failing open, as the balancer does when everything is ejected).
//!
//! Envoy spills traffic gradually with its overprovisioning factor (1.4) while a priority
//! level is partly healthy; here a level takes all the traffic while one of its
//! endpoints is healthy, which is the same once a whole locality is down.

use std::collections::BTreeMap;

use causeway_api::registry::{REGION_LABEL, ZONE_LABEL};
use causeway_api::route::resource::LocalityLbSetting;

/// Where an endpoint or this agent runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    /// Region.
    pub region: Option<String>,
    /// Zone.
    pub zone: Option<String>,
}

impl Locality {
    /// Whether the locality pattern `pattern` (`region/zone/subzone`, `*` matching the
    /// rest, missing trailing parts matching anything) matches.
    pub fn matches(&self, pattern: &str) -> bool {
        let parts = [
            self.region.as_deref().unwrap_or(""),
            self.zone.as_deref().unwrap_or(""),
            "",
        ];
        for (i, p) in pattern.split('/').enumerate() {
            if p == "*" {
                return true;
            }
            match parts.get(i) {
                Some(v) if *v == p => {}
                _ => return false,
            }
        }
        true
    }
}

/// A destination's locality load balancing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LocalityMode {
    /// No DestinationRule: the agent's own same-zone-first choice (config `zone`).
    #[default]
    SameZoneFirst,
    /// A rule without `outlierDetection`, or `enabled: false`: every endpoint alike.
    Off,
    /// Locality load balancing.
    On(std::sync::Arc<LocalityLb>),
}

impl LocalityMode {
    /// The mode of a rule's policy: its `localityLbSetting` (`None`: Istio's default,
    /// locality-prioritised) and whether it has `outlierDetection`.
    pub fn compile(setting: Option<&LocalityLbSetting>, outlier: bool) -> LocalityMode {
        if !outlier || setting.and_then(|s| s.enabled) == Some(false) {
            return LocalityMode::Off;
        }
        let s = setting.cloned().unwrap_or_default();
        LocalityMode::On(std::sync::Arc::new(LocalityLb {
            distribute: s
                .distribute
                .into_iter()
                .map(|d| (d.from, d.to.into_iter().collect()))
                .collect(),
            failover: s.failover.into_iter().map(|f| (f.from, f.to)).collect(),
            failover_priority: s.failover_priority,
        }))
    }
}

/// A compiled `localityLbSetting`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalityLb {
    distribute: Vec<(String, Vec<(String, u32)>)>,
    failover: Vec<(String, String)>,
    failover_priority: Vec<String>,
}

/// What an endpoint's priority is computed from.
#[derive(Debug, Clone, Copy)]
pub struct EndpointFacts<'a> {
    /// Its locality.
    pub locality: &'a Locality,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
}

/// This agent's own workload, as locality load balancing sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Own {
    /// Its locality.
    pub locality: Locality,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// The value of label `key` of an endpoint, its locality standing in for the topology
/// labels it does not carry.
fn label_of<'a>(
    key: &str,
    labels: &'a BTreeMap<String, String>,
    l: &'a Locality,
) -> Option<&'a str> {
    labels.get(key).map(String::as_str).or(match key {
        REGION_LABEL => l.region.as_deref(),
        ZONE_LABEL => l.zone.as_deref(),
        _ => None,
    })
}

impl LocalityLb {
    /// The `distribute` entry that applies to `own`, if any: its `to` localities.
    fn distribution(&self, own: &Locality) -> Option<&[(String, u32)]> {
        self.distribute
            .iter()
            .find(|(from, _)| own.matches(from))
            .map(|(_, to)| to.as_slice())
    }

    /// Draws the locality (a pattern) a request goes to under `distribute` (`roll`: a
    /// random number), or `None` when no `distribute` entry applies to `own`.
    pub fn draw(&self, own: &Locality, roll: u64) -> Option<&str> {
        let to = self.distribution(own)?;
        let total: u64 = to.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        let mut r = roll % total;
        for (pattern, w) in to {
            if r < u64::from(*w) {
                return Some(pattern);
            }
            r -= u64::from(*w);
        }
        None
    }

    /// The priority of endpoint `e` (0 best) for a request from `own`; `drawn` is what
    /// [`LocalityLb::draw`] gave for the request.
    pub fn priority(&self, own: &Own, e: EndpointFacts<'_>, drawn: Option<&str>) -> u32 {
        if let Some(to) = self.distribution(&own.locality) {
            return match drawn {
                Some(p) if e.locality.matches(p) => 0,
                _ if to.iter().any(|(p, w)| *w > 0 && e.locality.matches(p)) => 1,
                _ => 2,
            };
        }
        let labels = u32::try_from(self.failover_priority.len()).unwrap_or(u32::MAX);
        let by_labels = if self.failover_priority.is_empty() {
            0
        } else {
            let matched = self
                .failover_priority
                .iter()
                .take_while(|k| {
                    let mine = label_of(k, &own.labels, &own.locality);
                    mine.is_some() && mine == label_of(k, e.labels, e.locality)
                })
                .count();
            labels - u32::try_from(matched).unwrap_or(labels)
        };
        // failoverPriority alone ranks by labels only (Istio: the labels replace the
        // locality ranking; the topology labels can be listed to keep it).
        if !self.failover_priority.is_empty() && self.failover.is_empty() {
            return by_labels;
        }
        let (me, it) = (&own.locality, e.locality);
        let by_locality = if me.region == it.region {
            if me.zone == it.zone { 0 } else { 1 }
        } else {
            let other = self
                .failover
                .iter()
                .find(|(from, _)| me.region.as_deref() == Some(from.as_str()));
            match other {
                Some((_, to)) if it.region.as_deref() != Some(to.as_str()) => 3,
                _ => 2,
            }
        };
        by_locality * (labels + 1) + by_labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_api::route::resource::{Distribute, Failover};

    fn loc(region: &str, zone: &str) -> Locality {
        Locality {
            region: Some(region.into()),
            zone: Some(zone.into()),
        }
    }

    fn own(region: &str, zone: &str) -> Own {
        Own {
            locality: loc(region, zone),
            labels: BTreeMap::new(),
        }
    }

    fn lb(setting: LocalityLbSetting) -> std::sync::Arc<LocalityLb> {
        match LocalityMode::compile(Some(&setting), true) {
            LocalityMode::On(l) => l,
            other => panic!("{other:?}"),
        }
    }

    fn prio(l: &LocalityLb, own: &Own, e: &Locality, drawn: Option<&str>) -> u32 {
        let labels = BTreeMap::new();
        l.priority(
            own,
            EndpointFacts {
                locality: e,
                labels: &labels,
            },
            drawn,
        )
    }

    #[test]
    fn patterns_match_region_zone_and_wildcards() {
        let l = loc("us-east", "us-east-1a");
        for p in [
            "us-east",
            "us-east/*",
            "us-east/us-east-1a",
            "*",
            "us-east/us-east-1a/*",
        ] {
            assert!(l.matches(p), "{p}");
        }
        for p in [
            "us-west",
            "us-east/us-east-1b",
            "us-west/*",
            "us-east/us-east-1a/rack1",
        ] {
            assert!(!l.matches(p), "{p}");
        }
        assert!(!Locality::default().matches("us-east"));
    }

    #[test]
    fn only_with_outlier_detection_and_not_when_disabled() {
        let s = LocalityLbSetting::default();
        assert_eq!(LocalityMode::compile(Some(&s), false), LocalityMode::Off);
        assert_eq!(LocalityMode::compile(None, false), LocalityMode::Off);
        let off = LocalityLbSetting {
            enabled: Some(false),
            ..s.clone()
        };
        assert_eq!(LocalityMode::compile(Some(&off), true), LocalityMode::Off);
        assert!(matches!(
            LocalityMode::compile(None, true),
            LocalityMode::On(_)
        ));
    }

    #[test]
    fn prioritised_same_zone_then_region_then_failover_region_then_others() {
        let l = lb(LocalityLbSetting {
            failover: vec![Failover {
                from: "r1".into(),
                to: "r2".into(),
            }],
            ..LocalityLbSetting::default()
        });
        let me = own("r1", "z1");
        let p = |e: Locality| prio(&l, &me, &e, None);
        assert_eq!(p(loc("r1", "z1")), 0);
        assert_eq!(p(loc("r1", "z2")), 1);
        assert_eq!(p(loc("r2", "z3")), 2);
        assert_eq!(p(loc("r3", "z4")), 3);
        assert_eq!(p(Locality::default()), 3);
        // Without a failover entry every other region is alike.
        let plain = lb(LocalityLbSetting::default());
        assert_eq!(prio(&plain, &me, &loc("r3", "z4"), None), 2);
        assert_eq!(prio(&plain, &me, &loc("r2", "z4"), None), 2);
        assert_eq!(prio(&plain, &me, &loc("r1", "z1"), None), 0);
    }

    #[test]
    fn distribute_draws_by_weight_and_ranks_the_drawn_locality_first() {
        let l = lb(LocalityLbSetting {
            distribute: vec![
                Distribute {
                    from: "r1/z1/*".into(),
                    to: [("r1/z1/*".to_owned(), 80), ("r1/z2/*".to_owned(), 20)].into(),
                },
                Distribute {
                    from: "r1/z2/*".into(),
                    to: [("r1/z2/*".to_owned(), 100)].into(),
                },
            ],
            ..LocalityLbSetting::default()
        });
        let me = own("r1", "z1");
        let mut drawn: BTreeMap<String, u32> = BTreeMap::new();
        for roll in 0..100 {
            *drawn
                .entry(l.draw(&me.locality, roll).unwrap().to_owned())
                .or_default() += 1;
        }
        assert_eq!(drawn["r1/z1/*"], 80);
        assert_eq!(drawn["r1/z2/*"], 20);
        let d = Some("r1/z2/*");
        assert_eq!(prio(&l, &me, &loc("r1", "z2"), d), 0);
        assert_eq!(prio(&l, &me, &loc("r1", "z1"), d), 1);
        assert_eq!(prio(&l, &me, &loc("r2", "z1"), d), 2);
        // A client no entry matches keeps the prioritised ranking.
        let elsewhere = own("r9", "z9");
        assert_eq!(l.draw(&elsewhere.locality, 7), None);
        assert_eq!(prio(&l, &elsewhere, &loc("r9", "z9"), None), 0);
        assert_eq!(prio(&l, &elsewhere, &loc("r1", "z1"), None), 2);
    }

    #[test]
    fn failover_priority_ranks_by_matching_labels_in_order() {
        let l = lb(LocalityLbSetting {
            failover_priority: vec!["topology.istio.io/network".into(), ZONE_LABEL.into()],
            ..LocalityLbSetting::default()
        });
        let me = Own {
            locality: loc("r1", "z1"),
            labels: [("topology.istio.io/network".to_owned(), "n1".to_owned())].into(),
        };
        let p = |net: &str, e: Locality| {
            let labels = [("topology.istio.io/network".to_owned(), net.to_owned())].into();
            l.priority(
                &me,
                EndpointFacts {
                    locality: &e,
                    labels: &labels,
                },
                None,
            )
        };
        // The zone label comes from the locality when the endpoint does not carry it.
        assert_eq!(p("n1", loc("r1", "z1")), 0);
        assert_eq!(p("n1", loc("r2", "z2")), 1);
        assert_eq!(p("n2", loc("r1", "z1")), 2, "the first label decides first");
    }
}
