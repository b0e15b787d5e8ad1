//! The agent's straight line: launch (or attach) → health gate → advertisers
//! → shutdown. `run` and `attach` are the two ways through it.
//!
//! This module owns *when* things happen: it decides to advertise (only
//! after a healthy answer), to withdraw (on a forwarded signal at once, on
//! OpenCode's exit, on a lost health check) and which exit code to return.
//! Every path that started advertisers stops them before returning. It must
//! not know wire formats or protocols; the other modules do.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::advertise::{Advert, Advertisers, Scope, tailnet};
use crate::cli::{AttachPlan, Bind, Mode, Plan, RunPlan};
use crate::error::{AgentError, Result};
use crate::health::{self, HealthCheck};
use crate::identity;
use crate::launch::{self, OpenCode, SignalAction, Signals};

/// How long OpenCode may take to exit after a forwarded signal before it is
/// killed.
pub const KILL_GRACE: Duration = Duration::from_secs(10);
/// After this long without a healthy answer, say so in the log.
const SLOW_START: Duration = Duration::from_secs(30);

/// Runs the plan; returns the exit code.
pub async fn main(plan: Plan) -> Result<i32> {
    match &plan.mode {
        Mode::Run(r) => run(&plan, r).await,
        Mode::Attach(a) => attach(&plan, a).await,
    }
}

/// What is advertised; `tailnet` is the machine's (the part where OpenCode
/// listens is kept).
fn advert(
    plan: &Plan,
    port: u16,
    pid: Option<u32>,
    auth: bool,
    scope: Scope,
    tailnet: &tailnet::Tailnet,
) -> Advert {
    Advert {
        id: plan.id.clone(),
        name: plan.name.clone(),
        hostname: plan.hostname.clone(),
        cwd: plan.cwd.clone(),
        port,
        pid,
        auth,
        version: None,
        scope,
        // Tailnet addresses reach OpenCode only when it listens on them.
        tailnet: scope.tailnet_part(tailnet),
        connected_at: identity::iso8601_utc(SystemTime::now()),
        secret: plan.secret.clone(),
        heartbeat: plan.heartbeat,
    }
}

/// The machine's tailnet facts, looked up only when OpenCode may listen on
/// the tailnet in `scope` (a wildcard or a tailnet address).
async fn tailnet_for(scope: Option<Scope>) -> tailnet::Tailnet {
    match scope {
        Some(Scope::Loopback) => tailnet::Tailnet::default(),
        Some(Scope::Addr(ip)) if !tailnet::is_tailnet(&ip) => tailnet::Tailnet::default(),
        _ => tailnet::detect().await,
    }
}

/// Starts the advertisers and logs the ones that failed.
fn start_advertising(plan: &Plan, advert: &Advert) -> (Advertisers, Vec<AgentError>) {
    let (ads, errors) = Advertisers::start(plan, advert);
    for e in &errors {
        tracing::error!("{e}");
    }
    if !ads.is_empty() {
        tracing::info!(
            name = %advert.name,
            id = %advert.id,
            port = advert.port,
            version = advert.version.as_deref().unwrap_or("unknown"),
            "advertising OpenCode"
        );
    }
    (ads, errors)
}

/// `run`: start OpenCode, advertise it once healthy, mirror its exit.
async fn run(plan: &Plan, r: &RunPlan) -> Result<i32> {
    // Handlers first: from here on no signal can kill the agent unseen.
    let mut signals = Signals::install()?;
    let port = match r.port {
        Some(p) => p,
        None => launch::pick_port(launch::PORT_RANGE, launch::PORT_TRIES, launch::port_is_free)?,
    };
    let ts = match r.bind {
        Bind::Loopback => tailnet::Tailnet::default(),
        // A wildcard listener is on the tailnet too (None: look it up).
        Bind::Lan | Bind::Tailnet => tailnet_for(None).await,
    };
    let host = launch::listen_host(r.bind, ts.ipv4())?;
    let scope = match r.bind {
        Bind::Loopback => Scope::Loopback,
        Bind::Lan => Scope::Lan,
        Bind::Tailnet => Scope::of_host(&host),
    };
    let health = HealthCheck::new(&host, port, plan.credentials.clone())?;
    // With a fleet secret, OpenCode gets the password derived for this id.
    let derived = plan
        .secret
        .as_ref()
        .and(plan.credentials.as_ref())
        .map(|c| c.password.as_str());
    if derived.is_some() {
        tracing::info!(
            id = %plan.id,
            "fleet secret in use: OpenCode requires the password derived for this instance, and announcements are signed"
        );
    }
    let mut oc = OpenCode::spawn(r, port, &host, derived)?;
    tracing::info!(pid = oc.pid(), port, host = %host, serve = r.serve, "OpenCode started");

    let mut ads: Option<Advertisers> = None;
    let mut healthy = false;
    let mut stopping = false;
    let mut kill_at: Option<Instant> = None;
    let started = Instant::now();
    let mut warned_slow = false;
    let status = loop {
        tokio::select! {
            st = oc.wait() => break st?,
            sig = signals.recv() => match launch::signal_action(sig, r.serve) {
                SignalAction::Ignore => tracing::debug!(?sig, "left to OpenCode"),
                SignalAction::Forward => {
                    tracing::info!(?sig, pid = oc.pid(), "forwarding to OpenCode");
                    oc.signal(sig.number());
                    if !stopping {
                        stopping = true;
                        kill_at = Some(Instant::now() + KILL_GRACE);
                        // Withdraw now: browsers drop the instance while
                        // OpenCode is still shutting down.
                        if let Some(a) = ads.take() {
                            a.stop().await;
                        }
                    }
                }
            },
            () = tokio::time::sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                tracing::warn!(pid = oc.pid(), "OpenCode did not exit {} s after the signal; killing it", KILL_GRACE.as_secs());
                oc.signal(libc::SIGKILL);
                kill_at = None;
            },
            h = async {
                tokio::time::sleep(health::GATE_INTERVAL).await;
                health.check().await
            }, if !healthy && !stopping => match h {
                Ok(h) => {
                    healthy = true;
                    tracing::info!(after_ms = started.elapsed().as_millis() as u64, "OpenCode is healthy");
                    let mut a = advert(
                        plan,
                        port,
                        Some(oc.pid()),
                        plan.credentials.is_some(),
                        scope,
                        &ts,
                    );
                    a.version = h.version;
                    ads = Some(start_advertising(plan, &a).0);
                }
                Err(e) => {
                    if !warned_slow && started.elapsed() >= SLOW_START {
                        warned_slow = true;
                        tracing::warn!("OpenCode has not answered /global/health for {} s ({e}); not advertised yet", SLOW_START.as_secs());
                    }
                }
            },
        }
    };
    if let Some(a) = ads.take() {
        a.stop().await;
    }
    let code = launch::exit_code(status);
    tracing::info!(status = %launch::describe(status), "OpenCode exited");
    if !healthy && !stopping {
        return Err(AgentError::ExitedBeforeHealthy {
            status: launch::describe(status),
            code,
            port,
        });
    }
    Ok(code)
}

/// `attach`: advertise a running OpenCode while it stays healthy.
async fn attach(plan: &Plan, a: &AttachPlan) -> Result<i32> {
    let mut signals = Signals::install()?;
    let health = HealthCheck::new(&a.host, a.port, plan.credentials.clone())?;

    // Gate: the server must answer first.
    let deadline = Instant::now() + health::ATTACH_GATE;
    let first = loop {
        let last = tokio::select! {
            sig = signals.recv() => {
                tracing::info!(?sig, "stopped before anything was advertised");
                return Ok(0);
            }
            r = health.check() => match r {
                Ok(h) => break h,
                Err(e) => e.to_string(),
            },
        };
        if Instant::now() >= deadline {
            return Err(AgentError::NotHealthy {
                url: health.url().to_string(),
                secs: health::ATTACH_GATE.as_secs(),
                detail: last,
            });
        }
        tokio::select! {
            sig = signals.recv() => {
                tracing::info!(?sig, "stopped before anything was advertised");
                return Ok(0);
            }
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    };

    let scope = Scope::of_host(&a.host);
    let auth = health
        .requires_auth()
        .await
        .unwrap_or(plan.credentials.is_some());
    if scope != Scope::Loopback && !auth {
        tracing::warn!(
            url = %health.url(),
            "this OpenCode answers without a password and is now advertised beyond this machine; start it with OPENCODE_SERVER_PASSWORD set"
        );
    }
    if plan.secret.is_some() {
        tracing::warn!(
            url = %health.url(),
            "a fleet secret is in use, but `attach` cannot give the running OpenCode the password derived from it: the announcements are signed, yet opencode-mcp (which sends the derived password) will be refused with 401 unless the server has no password. Run it through `opencode-agent run --serve` instead, or pass --no-secret"
        );
    }
    let ts = tailnet_for(Some(scope)).await;
    let mut ad = advert(plan, a.port, None, auth, scope, &ts);
    ad.version = first.version;
    let (ads, errors) = start_advertising(plan, &ad);
    if ads.is_empty() {
        let why: Vec<String> = errors.iter().map(ToString::to_string).collect();
        return Err(AgentError::NothingAdvertised(why.join("; ")));
    }

    let mut failures = 0u32;
    let result = loop {
        tokio::select! {
            sig = signals.recv() => {
                tracing::info!(?sig, "stopping");
                break Ok(0);
            }
            r = async {
                tokio::time::sleep(health::WATCH_INTERVAL).await;
                health.check().await
            } => match r {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(failures, "health check failed: {e}");
                    if failures >= health::WATCH_FAILURES {
                        break Err(AgentError::HealthLost {
                            url: health.url().to_string(),
                            failures,
                            detail: e.to_string(),
                        });
                    }
                }
            },
        }
    };
    ads.stop().await;
    result
}
