//! `scaleout probe URL`: one `GET`, exit 0 on a 2xx answer within the
//! timeout, 1 otherwise (saying why). The image has no shell and no curl;
//! this is its Docker `HEALTHCHECK`.

use std::time::Duration;

use anyhow::{anyhow, bail};

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// What to GET, e.g. http://127.0.0.1:8081/readyz.
    url: String,
    /// How long the answer may take.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    timeout: Duration,
    /// Print the answer's body (at most 64 KiB).
    #[arg(long)]
    print: bool,
}

/// The most of a body `--print` shows.
const MAX_PRINTED: usize = 64 * 1024;

pub async fn run(args: ProbeArgs) -> anyhow::Result<()> {
    // A password in the URL is not repeated in messages (Docker keeps a
    // healthcheck's output).
    let shown = match reqwest::Url::parse(&args.url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => args.url.clone(),
    };
    if !(args.url.starts_with("http://") || args.url.starts_with("https://")) {
        bail!("{shown}: give an http:// or https:// URL");
    }
    if args.timeout.is_zero() {
        bail!("--timeout must be more than 0");
    }
    let http = reqwest::Client::builder()
        .timeout(args.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| anyhow!("an HTTP client: {e}"))?;
    let answer = http
        .get(&args.url)
        .send()
        .await
        .map_err(|e| anyhow!("{shown}: no answer: {}", causes(&e)))?;
    let status = answer.status();
    if args.print {
        let mut answer = answer;
        let mut body = Vec::new();
        while let Some(chunk) = answer
            .chunk()
            .await
            .map_err(|e| anyhow!("{shown}: {}", causes(&e)))?
        {
            body.extend_from_slice(&chunk);
            if body.len() >= MAX_PRINTED {
                body.truncate(MAX_PRINTED);
                break;
            }
        }
        println!("{}", String::from_utf8_lossy(&body));
    }
    if !status.is_success() {
        bail!("{shown}: {status}");
    }
    Ok(())
}

/// An error and what caused it, down to the first cause ("connection
/// refused", "dns error"), not only reqwest's summary.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text
}
