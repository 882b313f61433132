//! The HTTP client of `infer` and `report`: `--server`, the bearer token, and the one
//! mapping from transport failures and error answers to one-line [`CliError`]s.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use reqwest::header::RETRY_AFTER;
use reqwest::{RequestBuilder, Response, StatusCode};

use super::CliError;

/// The token itself, for environments that inject secrets as variables (read only when
/// no `--token-file` is given; never a flag, so it does not show in `ps`).
pub const TOKEN_ENV: &str = "MUSETALK_SIDECAR_TOKEN";

/// Where the service is and how to authenticate to it.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Base URL of the running service (http:// only: this client has no TLS).
    #[arg(long, env = "MUSETALK_SIDECAR_SERVER", default_value = "http://127.0.0.1:8000", value_name = "URL")]
    pub server: String,

    /// File holding the bearer token for a service started with --auth-token-file (its first line that is not empty or a # comment). Without it, the token is read from MUSETALK_SIDECAR_TOKEN when set.
    #[arg(long, env = "MUSETALK_SIDECAR_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// Where a token came from, to name it when the service refuses it.
enum TokenSource {
    File(PathBuf),
    Env,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<(String, TokenSource)>,
}

/// The innermost cause of an error chain (reqwest's own message is only "error sending request").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let text = cur.to_string();
    // "Connection refused (os error 111)" → "connection refused"
    let text = match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(c) if chars.clone().next().is_some_and(|d| d.is_lowercase()) => c.to_lowercase().chain(chars).collect(),
        _ => text,
    }
}

impl Client {
    pub fn new(args: &ServerArgs) -> Result<Client, CliError> {
        let base = args.server.trim().trim_end_matches('/').to_string();
        let url = reqwest::Url::parse(&base)
            .map_err(|e| CliError::usage(format!("--server `{}` is not a URL ({e}); give one like http://127.0.0.1:8000", args.server)))?;
        if url.scheme() != "http" {
            return Err(CliError::usage(format!(
                "--server `{}`: only http:// URLs are supported (this client has no TLS; reach an https endpoint through a local proxy or port-forward)",
                args.server
            )));
        }
        let token = match &args.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| CliError::usage(format!("cannot read --token-file {}: {e}", path.display())))?;
                let token = text
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty() && !l.starts_with('#'))
                    .ok_or_else(|| CliError::usage(format!("--token-file {} holds no token (put the token on its first line)", path.display())))?;
                Some((token.to_string(), TokenSource::File(path.clone())))
            }
            None => std::env::var(TOKEN_ENV).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).map(|t| (t, TokenSource::Env)),
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Stalls only: uploads and downloads may take long, and the event stream
            // carries a keep-alive comment every 15 s.
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("musetalk-sidecar/", env!("CARGO_PKG_VERSION")));
        // A loopback service is never reached through a proxy from the environment.
        let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        let loopback = host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if loopback {
            builder = builder.no_proxy();
        }
        let http = builder.build().map_err(|e| CliError::failed(format!("cannot build the HTTP client: {}", root_cause(&e))))?;
        Ok(Client { http, base, token })
    }

    /// The service's base URL, as given (without a trailing `/`).
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn auth(&self, rb: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some((t, _)) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.auth(self.http.get(self.url(path)))
    }

    pub fn head(&self, path: &str) -> RequestBuilder {
        self.auth(self.http.head(self.url(path)))
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.auth(self.http.post(self.url(path)))
    }

    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.auth(self.http.delete(self.url(path)))
    }

    /// Sends; transport failures become one clear line (HTTP error answers do not: see [`Client::error_for`]).
    pub async fn send(&self, rb: RequestBuilder) -> Result<Response, CliError> {
        rb.send().await.map_err(|e| self.transport_error(&e))
    }

    pub fn transport_error(&self, e: &reqwest::Error) -> CliError {
        let cause = root_cause(e);
        if e.is_connect() {
            return CliError::failed(format!(
                "cannot reach the service at {} ({cause}; is `musetalk-sidecar serve` running? set --server or MUSETALK_SIDECAR_SERVER)",
                self.base
            ));
        }
        if e.is_timeout() {
            return CliError::failed(format!("the service at {} stopped answering ({cause}); is it overloaded or stuck? see its logs", self.base));
        }
        CliError::failed(format!("talking to the service at {} failed: {cause}", self.base))
    }

    /// An error answer as one line. `job` names the job the request was about, so a
    /// 404 says which job is unknown.
    pub async fn error_for(&self, resp: Response, job: Option<&str>) -> CliError {
        let status = resp.status();
        let retry = resp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let text = resp.text().await.unwrap_or_default();
        let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let code = body["error"].as_str().unwrap_or("");
        let detail = body["detail"].as_str().map(str::to_string).unwrap_or_else(|| {
            let t = text.trim();
            if t.is_empty() { status.canonical_reason().unwrap_or("no detail").to_string() } else { t.chars().take(300).collect() }
        });
        match (status, job) {
            (StatusCode::UNAUTHORIZED, _) => CliError::usage(match &self.token {
                None => format!(
                    "the service at {} requires a token (401): pass --token-file FILE (or set MUSETALK_SIDECAR_TOKEN_FILE or {TOKEN_ENV}) with a token from its --auth-token-file",
                    self.base
                ),
                Some((_, TokenSource::File(p))) => format!(
                    "the service at {} refused the token from --token-file {} (401): use a token listed in the service's --auth-token-file",
                    self.base,
                    p.display()
                ),
                Some((_, TokenSource::Env)) => format!(
                    "the service at {} refused the token from {TOKEN_ENV} (401): use a token listed in the service's --auth-token-file",
                    self.base
                ),
            }),
            (StatusCode::NOT_FOUND, Some(id)) if code == "job_not_found" => CliError::failed(format!(
                "no job `{id}` on the service at {} (finished jobs are kept for the service's --job-retention; GET /v1/jobs lists them)",
                self.base
            )),
            (StatusCode::NOT_FOUND, _) if code == "route_not_found" || code.is_empty() => CliError::failed(format!(
                "{} answered 404 for this request: is --server a musetalk-sidecar service (and its --listen port, not --admin-listen)?",
                self.base
            )),
            (StatusCode::TOO_MANY_REQUESTS, _) => CliError::failed(format!(
                "the service is busy ({detail}); retry in {} s",
                retry.as_deref().unwrap_or("a few")
            )),
            // The request itself was wrong: bad media, too large, not multipart.
            (StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE, _) => {
                CliError::usage(format!("the service refused the request ({} {code}): {detail}", status.as_u16()))
            }
            _ => CliError::failed(format!(
                "the service answered {}{}: {detail}",
                status.as_u16(),
                if code.is_empty() { String::new() } else { format!(" {code}") }
            )),
        }
    }
}
