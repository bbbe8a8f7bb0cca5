//! `causewayctl analyze`: what is wrong or about to go wrong in the mesh, and in policy
//! files before they are applied. The checks are `causeway_api::analyze` (the same code
//! the controller runs); docs/analyze.md lists every code.

use std::path::PathBuf;
use std::time::Duration;

use causeway_api::analyze::{
    AnalyzeRequest, Level, PolicyFacts, Report, Snapshot, Suppression, Thresholds, analyze,
    analyze_files_with_routes,
};
use reqwest::Method;

use super::{Api, Output};

/// Exit status when the analysis found what `--fail-on` fails on (1 is kept for "could
/// not analyze": bad arguments, controller unreachable).
pub(crate) const EXIT_FINDINGS: u8 = 3;

/// The analysis found messages at or above `--fail-on`.
#[derive(Debug)]
pub(crate) struct Findings(String);

impl std::fmt::Display for Findings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Findings {}

/// What fails the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum FailOn {
    /// Any Error.
    Error,
    /// Any Error or Warning.
    Warning,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 10m, 4h, 1d)"))
}

/// Arguments of `causewayctl analyze`.
#[derive(clap::Args, Debug)]
pub(crate) struct AnalyzeArgs {
    /// Policy files to check before applying them: a file, a directory, or - (repeatable).
    /// Analyzed together with the live mesh, as if applied.
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    /// Check the files alone, without a controller.
    #[arg(long, requires = "files")]
    pub(crate) offline: bool,
    /// Hide one code for one resource: CODE=RESOURCE, as the message names it
    /// (CODE=* for every resource; repeatable).
    #[arg(long, value_parser = |s: &str| s.parse::<Suppression>())]
    suppress: Vec<Suppression>,
    /// Fail (exit status 3) on any Error (default) or on any Error or Warning.
    #[arg(long, value_enum, default_value = "error")]
    fail_on: FailOn,
    /// Endpoints stale (their source down) longer than this are reported (CW0103).
    #[arg(long, value_parser = duration, default_value = "5m")]
    stale_after: Duration,
    /// Agent certificates expiring within this are reported (CW0201).
    #[arg(long, value_parser = duration, default_value = "4h")]
    cert_expiry_within: Duration,
    /// Agents not connected for longer than this are reported (CW0202).
    #[arg(long, value_parser = duration, default_value = "10m")]
    disconnected_after: Duration,
    /// A VIP range used to this percentage or more is reported (CW0105).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    vip_used_percent: u8,
}

impl AnalyzeArgs {
    fn thresholds(&self) -> Thresholds {
        Thresholds {
            stale_after_secs: self.stale_after.as_secs(),
            cert_expiry_secs: self.cert_expiry_within.as_secs(),
            disconnected_secs: self.disconnected_after.as_secs(),
            vip_used_percent: self.vip_used_percent,
        }
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Runs the analysis; `api` is `None` with `--offline`.
pub(crate) async fn run(api: Option<&Api>, out: Output, args: &AnalyzeArgs) -> anyhow::Result<()> {
    let mut texts = Vec::new();
    for path in super::policy::expand(&args.files)? {
        texts.push((path.display().to_string(), super::policy::read(&path)?));
    }
    let (resources, routes, file_messages) = analyze_files_with_routes(&texts);
    let mut report = match api {
        None => {
            let snapshot = Snapshot {
                live: false,
                now: now_unix(),
                policies: resources
                    .into_iter()
                    .enumerate()
                    .map(|(i, f)| PolicyFacts {
                        seq: u64::try_from(i).unwrap_or(u64::MAX),
                        origin: Some(format!("{} doc {}", f.origin, f.doc)),
                        resource: f.resource,
                    })
                    .collect(),
                ..Snapshot::default()
            };
            let mut snapshot = snapshot;
            snapshot.overlay_routes(routes);
            analyze(&snapshot, &args.thresholds())
        }
        Some(api) => {
            let body = serde_json::to_value(AnalyzeRequest {
                resources,
                routes,
                thresholds: args.thresholds(),
            })?;
            api.call::<Report>(Method::POST, "/v1/analyze", Some(body))
                .await?
                .typed
        }
    };
    report.messages.extend(file_messages);
    report.suppress(&args.suppress);
    report.normalize();
    let value = serde_json::to_value(&report)?;
    super::print(out, &value, |_| text(&report));
    let errors = report.count(Level::Error);
    let warnings = report.count(Level::Warning);
    let failing = match args.fail_on {
        FailOn::Error => errors,
        FailOn::Warning => errors + warnings,
    };
    if failing > 0 {
        return Err(Findings(format!(
            "analyze found {errors} error{} and {warnings} warning{} (--fail-on {})",
            plural(errors),
            plural(warnings),
            match args.fail_on {
                FailOn::Error => "error",
                FailOn::Warning => "warning",
            }
        ))
        .into());
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn text(r: &Report) -> String {
    let mut s = String::new();
    for m in &r.messages {
        s.push_str(&format!(
            "{:<7} {} {}: {}\n        fix: {}\n",
            m.level.to_string(),
            m.code,
            m.resource,
            m.message,
            m.fix
        ));
    }
    let (e, w, i) = (
        r.count(Level::Error),
        r.count(Level::Warning),
        r.count(Level::Info),
    );
    if r.messages.is_empty() {
        s.push_str("no problems found\n");
    } else {
        s.push_str(&format!(
            "{e} error{}, {w} warning{}, {i} info\n",
            plural(e),
            plural(w)
        ));
    }
    s
}
