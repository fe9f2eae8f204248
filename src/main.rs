//! The `watchpost` command line. Parses arguments and calls into the library; exit codes
//! follow the Nagios plugin convention where it applies (3 = config or usage error).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};

use watchpost::logging::{self, LogFormat};
use watchpost::{chaos, check, config, control, demo, incident, notify, report, store};

/// `println!` that returns the write error instead of panicking, so a closed pipe
/// (`watchpost validate | head -0`) ends the command quietly (see `main`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?;
    }};
}

/// `print!` without a newline, same error handling as [`out!`].
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)?;
    }};
}

#[derive(Parser)]
#[command(
    name = "watchpost",
    version,
    about = "Synthetic monitoring for HTTP, WebSocket and realtime speech-to-text services",
    after_long_help = "Exit codes: 0 ok; 1 degraded (check) or not delivered (notify-test); 2 down (check); \
3 configuration or usage error.\n\
Environment: WATCHPOST_CONFIG (the config file), WATCHPOST_LOG (log filter, e.g. debug). \
Logs go to stderr.\n\
Files: config/watchpost.toml (relative to the working directory unless -c or WATCHPOST_CONFIG \
says otherwise), the probe files its [agent] probes globs name, <data_dir>/watchpost.db."
)]
struct Cli {
    /// Main configuration file.
    #[arg(
        short,
        long,
        global = true,
        default_value = "config/watchpost.toml",
        env = "WATCHPOST_CONFIG"
    )]
    config: PathBuf,
    /// Data directory, instead of `[agent] data_dir` (for containers and service managers).
    #[arg(long, global = true, env = "WATCHPOST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Log format (logs go to stderr): text, coloured only on a terminal without NO_COLOR,
    /// or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportFormat {
    Table,
    Json,
    Markdown,
    Csv,
    Html,
}

#[derive(Subcommand)]
enum Cmd {
    /// The daemon: schedule, record, evaluate, notify, serve the API.
    Run,
    /// Run probes once now and print results (exit 0 up · 1 degraded · 2 down · 3 error).
    Check {
        /// Probes to run (default: every enabled probe).
        probes: Vec<String>,
        /// One JSON object per probe per line.
        #[arg(long)]
        json: bool,
    },
    /// Load and check config, probes, audio files and env secrets (no network).
    Validate,
    /// Latency-budget review from stored histograms.
    Report {
        /// How far back to look.
        #[arg(long, default_value = "24h")]
        window: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
        format: ReportFormat,
        /// Shorthand for --format json.
        #[arg(long)]
        json: bool,
        /// Write to this file instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Fleet: only this location's runs (default: every location's histograms merged,
        /// with each location's figures under its row).
        #[arg(long, value_name = "NAME")]
        location: Option<String>,
    },
    /// Incident history.
    Incidents {
        /// Only open incidents.
        #[arg(long)]
        open: bool,
        /// One JSON object per incident per line (with its timeline and notifications).
        #[arg(long)]
        json: bool,
    },
    /// Run a scripted outage and judge its expectations (exit 0 all held · 1 any failed ·
    /// 3 config error).
    Rehearse {
        /// The rehearsal file (see config/rehearsals/).
        file: PathBuf,
        /// Print one JSON document (verdicts and timeline) instead of the table.
        #[arg(long)]
        json: bool,
        /// Also write a self-contained HTML report with the timeline drawn.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Run it on the live agent at this API URL (POST /api/v1/rehearsals) and follow it;
        /// FILE must be inside the config directory, which the agent reads it from.
        #[arg(long)]
        agent: Option<String>,
        /// With --agent: the environment variable holding the API token (default: the
        /// config's [agent] api_token_env).
        #[arg(long, requires = "agent")]
        token_env: Option<String>,
    },
    /// A scheduled review (`[[review]]`): when it goes next, or `--now` to send one at once
    /// (exit 0 all delivered · 1 any failed · 3 config error).
    Review {
        /// The review's name, as in `[[review]] name`.
        name: String,
        /// Send it now (the window ending now) to each of its notifiers.
        #[arg(long)]
        now: bool,
    },
    /// Send one clearly marked test event to a notifier.
    NotifyTest {
        /// Name of a `[notifier.NAME]` table in the config.
        notifier: String,
    },
    /// Maintenance windows on a running agent, through its API (token from api_token_env).
    Maintenance {
        #[command(subcommand)]
        cmd: MaintenanceCmd,
    },
    /// Embedded demo services + agent + dashboard, one command.
    Demo {
        /// Dashboard address.
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: String,
        /// Stop by itself after this long (e.g. "2m"); default: until Ctrl-C.
        #[arg(long = "for")]
        duration: Option<String>,
        /// Keep the demo's config and data here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print a JSON Schema of the configuration, for editors (taplo / Even Better TOML).
    Schema {
        /// Which file: the main config or a probe file.
        #[arg(value_enum, default_value_t = SchemaFile::Config)]
        file: SchemaFile,
    },
    /// Print a shell completion script (e.g. `watchpost completions bash > /etc/bash_completion.d/watchpost`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `watchpost man > watchpost.1`.
    Man,
}

#[derive(Clone, Copy, ValueEnum)]
enum SchemaFile {
    /// `config/watchpost.toml`.
    Config,
    /// A probe file (`probes/*.toml`).
    Probe,
}

#[derive(Subcommand)]
enum MaintenanceCmd {
    /// Start a window on COMPONENT now (no incident opens for it while it runs).
    Start {
        /// The component's name, as in `[[component]] name`.
        component: String,
        /// How long the window lasts (e.g. "15m", "2h"; at most 7d).
        #[arg(long = "for")]
        duration: String,
        /// Shown on the timeline and in notifications.
        #[arg(long, default_value = "")]
        reason: String,
        /// The agent's API (default: http://<[agent] listen>).
        #[arg(long)]
        agent: Option<String>,
        /// Print the window as JSON.
        #[arg(long)]
        json: bool,
    },
    /// End a running window now.
    End {
        /// The window's id (printed by `start`, listed by `list`).
        id: i64,
        /// The agent's API (default: http://<[agent] listen>).
        #[arg(long)]
        agent: Option<String>,
        /// Print the window as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the windows started through the API that have not ended.
    List {
        /// The agent's API (default: http://<[agent] listen>).
        #[arg(long)]
        agent: Option<String>,
        /// One JSON object per window per line.
        #[arg(long)]
        json: bool,
    },
}

/// `rehearse FILE --agent URL`: start FILE (named relative to the config directory, where
/// the agent reads it) on the agent, print its timeline as it goes, and return its final
/// document; `Err` is the exit code after saying why (3: usage, 1: refused or unreachable).
async fn rehearse_on_agent(
    c: &config::Config,
    file: &std::path::Path,
    agent: &str,
    token_env: Option<&str>,
    live: &mut (dyn FnMut(&chaos::run::Mark) + Send),
) -> Result<serde_json::Value, u8> {
    use reqwest::Method;
    let base = control::agent_url(c, Some(agent)).map_err(|e| {
        eprintln!("error: {e:#}");
        3u8
    })?;
    let token = match token_env {
        Some(var) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Some(config::Secret::new(var, v)),
            _ => {
                eprintln!("error: --token-env {var}: the variable is not set");
                return Err(3);
            }
        },
        None => c.agent.api_token.clone(),
    };
    let inside = |p: &std::path::Path| std::fs::canonicalize(p).ok();
    let rel = match (inside(file), inside(&c.dir)) {
        (Some(f), Some(d)) => f
            .strip_prefix(&d)
            .ok()
            .map(|r| r.to_string_lossy().into_owned()),
        _ => None,
    };
    let Some(rel) = rel else {
        eprintln!(
            "error: {} is not inside the config directory {}: the agent reads rehearsal files from there",
            file.display(),
            c.dir.display()
        );
        return Err(3);
    };
    let refused = |e: control::ClientError| {
        eprintln!("error: {e}");
        if token_env.is_none()
            && c.agent.api_token.is_none()
            && matches!(
                e,
                control::ClientError::Refused {
                    status: 401 | 403,
                    ..
                }
            )
        {
            eprintln!("hint: set [agent] api_token_env (or pass --token-env) and export the token in this shell");
        }
        1u8
    };
    let started = control::call(
        &base,
        token.as_ref(),
        Method::POST,
        "/api/v1/rehearsals",
        Some(serde_json::json!({ "file": rel })),
    )
    .await
    .map_err(refused)?;
    let Some(id) = started["rehearsal_id"].as_str().map(str::to_string) else {
        eprintln!("error: the agent did not say which rehearsal it started");
        return Err(1);
    };
    eprintln!("rehearsal {id} started on {base}");
    let mut shown = std::collections::HashSet::new();
    let interrupt = shutdown_signal();
    tokio::pin!(interrupt);
    loop {
        let doc = control::call(
            &base,
            None,
            Method::GET,
            &format!("/api/v1/rehearsals/{id}"),
            None,
        )
        .await
        .map_err(refused)?;
        let marks: Vec<chaos::run::Mark> = doc["timeline"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| serde_json::from_value(m.clone()).ok())
                    .collect()
            })
            .unwrap_or_default();
        for m in marks {
            if shown.insert(format!("{}|{}|{}", m.at_ms, m.event, m.detail)) {
                live(&m);
            }
        }
        if doc["status"] != "running" {
            return Ok(doc);
        }
        tokio::select! {
            _ = &mut interrupt => {
                eprintln!("stopped following; rehearsal {id} goes on on the agent (GET {base}/api/v1/rehearsals/{id})");
                return Err(1);
            }
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
        }
    }
}

/// `watchpost maintenance …`: 0 done · 1 refused or unreachable · 3 config or usage error.
async fn maintenance(c: &config::Config, cmd: MaintenanceCmd) -> anyhow::Result<u8> {
    use reqwest::Method;
    let agent = match &cmd {
        MaintenanceCmd::Start { agent, .. }
        | MaintenanceCmd::End { agent, .. }
        | MaintenanceCmd::List { agent, .. } => agent.clone(),
    };
    let base = match control::agent_url(c, agent.as_deref()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(3);
        }
    };
    let token = c.agent.api_token.as_ref();
    let (method, path, body, json) = match cmd {
        MaintenanceCmd::Start {
            component,
            duration,
            reason,
            json,
            ..
        } => {
            if let Err(e) = config::duration::parse(&duration) {
                eprintln!("error: --for: {e}");
                return Ok(3);
            }
            let body =
                serde_json::json!({"component": component, "duration": duration, "reason": reason});
            (
                Method::POST,
                "/api/v1/maintenance".to_string(),
                Some(body),
                json,
            )
        }
        MaintenanceCmd::End { id, json, .. } => (
            Method::DELETE,
            format!("/api/v1/maintenance/{id}"),
            None,
            json,
        ),
        MaintenanceCmd::List { json, .. } => {
            (Method::GET, "/api/v1/maintenance".to_string(), None, json)
        }
    };
    let is_list = method == Method::GET;
    let is_end = method == Method::DELETE;
    let v = match control::call(&base, token, method, &path, body).await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            if token.is_none()
                && matches!(
                    e,
                    control::ClientError::Refused {
                        status: 401 | 403,
                        ..
                    }
                )
            {
                eprintln!("hint: set [agent] api_token_env and export the token in this shell");
            }
            return Ok(1);
        }
    };
    let windows: Vec<serde_json::Value> = if is_list {
        v.get("windows")
            .and_then(|w| w.as_array())
            .cloned()
            .unwrap_or_default()
    } else {
        vec![v]
    };
    if is_list && windows.is_empty() && !json {
        out!("no maintenance windows running");
    }
    for w in &windows {
        if json {
            out!("{w}");
        } else {
            let f = |k: &str| {
                w.get(k)
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                    .unwrap_or_default()
            };
            let verb = if is_end {
                "ended"
            } else if is_list {
                "running"
            } else {
                "started"
            };
            out!(
                "maintenance window {} on {:?} {verb}, until {}: {}",
                f("id"),
                f("component"),
                f("ends_at"),
                f("reason")
            );
        }
    }
    Ok(0)
}

fn main() -> ExitCode {
    let parsed = <Cli as clap::CommandFactory>::command()
        .try_get_matches()
        .and_then(|m| <Cli as clap::FromArgMatches>::from_arg_matches(&m).map(|c| (c, m)));
    let (cli, matches) = match parsed {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(3),
            };
        }
    };
    // The demo writes and runs its own config: a -c it would silently ignore is refused.
    if matches!(cli.cmd, Cmd::Demo { .. })
        && matches.value_source("config") == Some(clap::parser::ValueSource::CommandLine)
    {
        eprintln!("error: demo runs its own embedded config and ignores -c/--config; use `demo --dir DIR` to keep it, or `run -c FILE` for your own");
        return ExitCode::from(3);
    }
    logging::init(
        cli.log_format,
        matches!(cli.cmd, Cmd::Run | Cmd::Demo { .. }),
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        // Whoever read our output has gone (`| head`): a normal end, not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
    }
}

/// Load config (with `--data-dir` applied) or print every problem as `file:line:col: message`.
fn load(path: &std::path::Path, data_dir: Option<&std::path::Path>) -> Result<config::Config, u8> {
    with_data_dir(report_errors(config::load(path)), data_dir)
}

/// The config for commands that only read the database: notifiers' secrets not needed.
fn load_for_reading(
    path: &std::path::Path,
    data_dir: Option<&std::path::Path>,
) -> Result<config::Config, u8> {
    with_data_dir(report_errors(config::load_for_reading(path)), data_dir)
}

fn report_errors(
    loaded: Result<config::Config, config::ConfigErrors>,
) -> Result<config::Config, u8> {
    loaded.map_err(|errs| {
        for d in &errs.0 {
            eprintln!("{d}");
        }
        eprintln!("{} configuration error(s)", errs.0.len());
        3
    })
}

/// `--data-dir` / `WATCHPOST_DATA_DIR` over `[agent] data_dir`.
fn with_data_dir(
    loaded: Result<config::Config, u8>,
    data_dir: Option<&std::path::Path>,
) -> Result<config::Config, u8> {
    let mut c = loaded?;
    if let Some(dir) = data_dir {
        c.agent.data_dir = dir.to_path_buf();
    }
    Ok(c)
}

async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    match cli.cmd {
        Cmd::Schema { file } => {
            let which = match file {
                SchemaFile::Config => config::schema::Which::Main,
                SchemaFile::Probe => config::schema::Which::Probe,
            };
            out!(
                "{}",
                serde_json::to_string_pretty(&config::schema::schema(which))?
            );
            Ok(0)
        }
        Cmd::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "watchpost", &mut buf);
            out_raw!("{}", String::from_utf8_lossy(&buf));
            Ok(0)
        }
        Cmd::Man => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut buf)?;
            out_raw!("{}", String::from_utf8_lossy(&buf));
            Ok(0)
        }
        Cmd::Validate => {
            let c = match load(&cli.config, cli.data_dir.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            out!(
                "{}: ok ({} probes, {} enabled, {} components, {} notifiers)",
                cli.config.display(),
                c.probes.len(),
                c.probes.iter().filter(|p| p.enabled).count(),
                c.components.len(),
                c.notifiers.len()
            );
            Ok(0)
        }
        Cmd::Check { probes, json } => {
            let c = match load(&cli.config, cli.data_dir.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            if probes.is_empty() {
                for p in check::not_running_own_api_probes(&c).await {
                    eprintln!(
                        "note: {} not checked: it watches this agent's own API ({}), where nothing \
                         listens yet; start the agent with `watchpost run` (it then checks itself), \
                         or check it by name: watchpost check {}",
                        p.name,
                        p.spec.url(),
                        p.name
                    );
                }
            }
            let results = match check::run_probes(&c, &probes).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return Ok(3);
                }
            };
            // The verdict is the exit code (Nagios): a reader that went away (`| head -1`)
            // must not turn a DOWN into an OK, so write errors only stop the printing.
            let print = || -> anyhow::Result<()> {
                for r in &results {
                    if json {
                        out!("{}", r.to_json());
                    } else {
                        out!("{}", r.summary());
                    }
                }
                Ok(())
            };
            let _ = print();
            if results.is_empty() {
                let disabled: Vec<&str> = c
                    .probes
                    .iter()
                    .filter(|p| !p.enabled)
                    .map(|p| p.name.as_str())
                    .collect();
                eprintln!(
                    "no probe checked; the disabled ones ({}) run once you point them at your \
                     services and set enabled = true",
                    if disabled.is_empty() {
                        "none".to_string()
                    } else {
                        disabled.join(", ")
                    }
                );
            }
            Ok(check::exit_code(&results))
        }
        Cmd::Run => {
            let c = match load(&cli.config, cli.data_dir.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let listener = match &c.agent.listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?,
                ),
                None => None,
            };
            watchpost::run(Arc::new(c), listener, shutdown_signal()).await?;
            Ok(0)
        }
        Cmd::Report {
            window,
            format,
            json,
            output,
            location,
        } => {
            let c = match load_for_reading(&cli.config, cli.data_dir.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let w = match config::duration::parse(&window) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("error: --window: {e}");
                    return Ok(3);
                }
            };
            let now = chrono::Utc::now().timestamp_millis();
            let r = match store::Target::of(&c)?.reader()? {
                Some(conn) => {
                    match report::build_for(&c, &conn, w, now, location.as_deref()) {
                        Ok(r) => r,
                        // An unknown location is a usage error, not a failure.
                        Err(e) if e.is::<store::UnknownLocation>() => {
                            eprintln!("error: --location: {e:#}");
                            return Ok(3);
                        }
                        Err(e) => return Err(e),
                    }
                }
                None => report::Report::empty(w, now),
            };
            let format = match (json, format) {
                (true, _) | (_, ReportFormat::Json) => report::Format::Json,
                (_, ReportFormat::Table) => report::Format::Table,
                (_, ReportFormat::Markdown) => report::Format::Markdown,
                (_, ReportFormat::Csv) => report::Format::Csv,
                (_, ReportFormat::Html) => report::Format::Html,
            };
            let text = report::render(&r, format)?;
            match output {
                Some(p) => std::fs::write(&p, text)
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", p.display()))?,
                None => out_raw!("{text}"),
            }
            Ok(0)
        }
        Cmd::Incidents { open, json } => {
            let c = match load_for_reading(&cli.config, cli.data_dir.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let list = match store::Target::of(&c)?.reader()? {
                Some(conn) => incident::list_incidents(&conn, open)?,
                None => vec![],
            };
            if json {
                for i in &list {
                    out!("{}", serde_json::to_string(i)?);
                }
            } else {
                out_raw!("{}", incident::render_incidents(&list));
            }
            Ok(0)
        }
        Cmd::Review { name, now } => {
            let c = match load(&cli.config, cli.data_dir.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let review = match watchpost::review::find(&c, &name) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(3);
                }
            };
            if !now {
                out!(
                    "{}",
                    watchpost::review::next_line(review, chrono::Utc::now())
                );
                return Ok(0);
            }
            let mut failed = false;
            for (notifier, r) in watchpost::review::send_now(&c, &name).await? {
                match r {
                    Ok(what) => out!("{notifier}: {what}"),
                    Err(e) => {
                        failed = true;
                        eprintln!("error: {notifier}: review not delivered: {e}");
                    }
                }
            }
            Ok(u8::from(failed))
        }
        Cmd::NotifyTest { notifier } => {
            let c = match load(&cli.config, cli.data_dir.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            if !c.notifiers.iter().any(|n| n.name == notifier) {
                let known: Vec<&str> = c.notifiers.iter().map(|n| n.name.as_str()).collect();
                eprintln!(
                    "error: unknown notifier {notifier:?} (configured: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                );
                return Ok(3);
            }
            match notify::notify_test(&c, &notifier).await {
                Ok(()) => {
                    out!("test event delivered to {notifier}");
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    Ok(1)
                }
            }
        }
        Cmd::Maintenance { cmd } => {
            let c = match load(&cli.config, cli.data_dir.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            maintenance(&c, cmd).await
        }
        Cmd::Rehearse {
            file,
            json,
            output,
            agent,
            token_env,
        } => {
            let c = match load(&cli.config, cli.data_dir.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let r = match chaos::file::load(&file, &c) {
                Ok(r) => r,
                Err(errs) => {
                    for d in &errs.0 {
                        eprintln!("{d}");
                    }
                    eprintln!("{} rehearsal error(s)", errs.0.len());
                    return Ok(3);
                }
            };
            // The live timeline goes to stderr, so stdout stays the table or the JSON.
            let mut live = |m: &chaos::run::Mark| eprintln!("{}", chaos::report::live_line(m));
            let (report, doc) = match agent {
                None => {
                    let report = chaos::run::rehearse(&c, &r, shutdown_signal(), &mut live).await?;
                    let doc = serde_json::to_value(&report)?;
                    (report, doc)
                }
                Some(url) => {
                    if !r.notify.is_empty() {
                        eprintln!("error: {}: [notify] swaps work only in a standalone rehearsal (without --agent)", file.display());
                        return Ok(3);
                    }
                    match rehearse_on_agent(&c, &file, &url, token_env.as_deref(), &mut live).await
                    {
                        Ok(doc) => match serde_json::from_value(doc.clone()) {
                            Ok(report) => (report, doc),
                            Err(e) => {
                                eprintln!(
                                    "error: the agent's answer is not a rehearsal report: {e}"
                                );
                                return Ok(1);
                            }
                        },
                        Err(code) => return Ok(code),
                    }
                }
            };
            if let Some(p) = &output {
                std::fs::write(p, chaos::report::render_html(&report))
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", p.display()))?;
            }
            let code = if report.passed { 0 } else { 1 };
            // The verdict is the exit code: a closed stdout must not turn a failure into 0.
            let print = || -> anyhow::Result<()> {
                if json {
                    out!("{}", serde_json::to_string_pretty(&doc)?);
                } else {
                    out_raw!("{}", chaos::report::render_table(&report));
                }
                Ok(())
            };
            let _ = print();
            Ok(code)
        }
        Cmd::Demo {
            listen,
            duration,
            dir,
        } => {
            let limit = match duration.as_deref().map(config::duration::parse).transpose() {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: --for: {e}");
                    return Ok(3);
                }
            };
            let stop = async move {
                match limit {
                    Some(d) => {
                        tokio::select! {
                            _ = tokio::time::sleep(d) => {}
                            _ = shutdown_signal() => {}
                        }
                    }
                    None => shutdown_signal().await,
                }
            };
            demo::run(&listen, dir, stop).await?;
            Ok(0)
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when
/// the future is first polled: a SIGTERM that arrives while the daemon is still starting
/// (opening the store) is a clean stop, not the default action that kills the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_argument_and_flag_has_help_text() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        for a in cmd.get_arguments() {
            if a.get_help().is_none() && !matches!(a.get_id().as_str(), "help" | "version") {
                missing.push(format!("watchpost --{}", a.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() {
                missing.push(format!("watchpost {}", sub.get_name()));
            }
            for a in sub.get_arguments() {
                if a.get_help().is_none() && a.get_id().as_str() != "help" {
                    missing.push(format!("watchpost {} {}", sub.get_name(), a.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
