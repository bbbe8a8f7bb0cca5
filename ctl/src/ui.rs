//! `causewayctl ui`: a one-time login URL for the controller's web UI.

use anyhow::{Context as _, bail};
use clap::Args;
use reqwest::Method;

use super::Api;

/// Options of `causewayctl ui`.
#[derive(Args, Debug)]
pub(crate) struct UiArgs {
    /// Print the login URL alone on stdout (for scripts).
    #[arg(long, conflicts_with = "open")]
    print_url: bool,
    /// Open the URL in the desktop's browser (xdg-open).
    #[arg(long)]
    open: bool,
}

/// Asks the controller for a one-time login code and prints (or opens) the URL.
pub(crate) async fn run(api: &Api, args: &UiArgs) -> anyhow::Result<()> {
    let answer = api
        .call::<causeway_api::admin::LoginCode>(Method::POST, "/v1/ui/login-codes", None)
        .await
        .context("cannot get a web UI login code from the controller")?;
    let code = &answer.typed.code;
    if code.is_empty() {
        bail!(
            "the controller answered an empty login code; is it the same version as causewayctl?"
        );
    }
    let ttl = answer.typed.expires_in_secs;
    // The code goes in the fragment: browsers never send it, so no server or proxy logs it.
    let url = format!("{}/ui/login#code={code}", api.base());
    if args.print_url {
        return super::write_stdout(format!("{url}\n").as_bytes());
    }
    if args.open {
        let status = std::process::Command::new("xdg-open")
            .arg(&url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {
                eprintln!(
                    "opened the web UI in your browser (the login link works once, within {ttl} s)"
                );
                return Ok(());
            }
            Ok(s) => eprintln!("xdg-open failed ({s}); open this URL yourself:"),
            Err(e) => eprintln!("cannot run xdg-open ({e}); open this URL yourself:"),
        }
    } else {
        eprintln!("Open this URL in a browser within {ttl} s; it logs in once:");
    }
    super::write_stdout(format!("{url}\n").as_bytes())
}
