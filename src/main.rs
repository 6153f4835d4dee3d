use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ordercloud_cdp_forwarder::config::{ConfigSources, Settings};
use ordercloud_cdp_forwarder::ordercloud::signature;
use ordercloud_cdp_forwarder::{shutdown_signal, telemetry, Application};

/// Forwards signed Sitecore OrderCloud webhooks to the Sitecore CDP Stream API.
#[derive(Parser)]
#[command(name = "ordercloud-cdp-forwarder", version)]
struct Cli {
    /// Configuration file layered over config/default.toml.
    #[arg(long, global = true, env = "FORWARDER_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Validate the configuration and print it with secrets masked; exit 1 when invalid.
    CheckConfig,
    /// Print the X-oc-hash of a body (a file, or - / nothing for standard input).
    #[command(group(clap::ArgGroup::new("the_key").required(true).args(["key", "key_file"])))]
    Sign {
        /// The webhook's HashKey. Prefer --key-file or FORWARDER_SIGN_KEY: a key in the command line
        /// shows in `ps` and the shell's history.
        #[arg(long, env = "FORWARDER_SIGN_KEY", hide_env_values = true)]
        key: Option<String>,
        /// A file holding the HashKey (surrounding whitespace ignored).
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
        file: Option<PathBuf>,
    },
    /// Inspect, replay or purge dead letters (opens the configured store directly).
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetterCommand),
    /// Exit 0 when the running service answers /health/live (for container health checks).
    Healthcheck {
        /// Defaults to http://127.0.0.1:<port of server.listen>/health/live.
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// List dead letters, oldest first.
    List {
        /// One JSON document instead of one line per dead letter.
        #[arg(long)]
        json: bool,
        /// Only those dead-lettered since TIME (RFC 3339, or an age such as 6h or 7d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Put dead letters back in their shoppers' queues, in their original order.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "all", "since"])))]
    Replay {
        /// A dead letter's id (repeatable).
        #[arg(long)]
        id: Vec<i64>,
        #[arg(long)]
        all: bool,
        /// Those dead-lettered since TIME (RFC 3339, or an age such as 6h).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
    },
    /// Delete dead letters older than TIME (RFC 3339, or an age such as 30d). Says how many would
    /// go unless --yes; refuses to take those of the last hour unless --force.
    Purge {
        #[arg(long, value_name = "TIME")]
        before: String,
        /// Delete them (without it, only how many would go is shown).
        #[arg(long)]
        yes: bool,
        /// Allow TIME later than an hour ago.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = ConfigSources {
        file: cli.config.clone(),
        base_dir: None,
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&sources),
        Command::CheckConfig => match Settings::load(&sources) {
            Ok(settings) => {
                println!("{}", settings.masked_json());
                eprintln!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Sign { key, key_file, file } => {
            let key = match (key, key_file) {
                (_, Some(path)) => match std::fs::read_to_string(&path) {
                    Ok(text) => text.trim().to_string(),
                    Err(e) => {
                        eprintln!("cannot read the key file {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                },
                (Some(key), None) => key.trim().to_string(),
                (None, None) => unreachable!("clap requires one"),
            };
            let mut body = Vec::new();
            let read = match file {
                Some(path) if path.as_os_str() != "-" => std::fs::read(&path).map(|b| body = b),
                _ => std::io::stdin().read_to_end(&mut body).map(|_| ()),
            };
            if let Err(e) = read {
                eprintln!("cannot read the body: {e}");
                return ExitCode::FAILURE;
            }
            println!("{}", signature::sign(key.as_bytes(), &body));
            ExitCode::SUCCESS
        }
        Command::Healthcheck { url } => healthcheck(&sources, url),
        Command::DeadLetters(command) => dead_letter_command(&sources, command),
    }
}

fn dead_letter_command(sources: &ConfigSources, command: DeadLetterCommand) -> ExitCode {
    use ordercloud_cdp_forwarder::dead_letters::{self, Selection};
    let settings = match Settings::load(sources) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime().block_on(async move {
        let store =
            ordercloud_cdp_forwarder::store::open(&settings.store, ordercloud_cdp_forwarder::store::Role::Tool).await?;
        let parse = |t: &str| dead_letters::parse_time(t).map_err(anyhow::Error::msg);
        let outcome = match command {
            DeadLetterCommand::List { json, since, limit } => {
                let since = since.as_deref().map(parse).transpose()?;
                // One more than shown: whether the list was cut at --limit.
                let mut list = dead_letters::list(&*store, since, limit.saturating_add(1)).await?;
                let more = list.len() > limit;
                list.truncate(limit);
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({"dead_letters": list, "more": more}))?
                    );
                } else {
                    for d in &list {
                        println!("{}", dead_letters::format_line(d));
                    }
                    if more {
                        eprintln!("{} dead letter(s) shown; more exist (raise --limit)", list.len());
                    } else {
                        eprintln!("{} dead letter(s)", list.len());
                    }
                }
                Ok(())
            }
            DeadLetterCommand::Replay { id, all, since } => {
                let selection = match (id.is_empty(), all, since) {
                    (false, _, _) => Selection::Ids(id),
                    (true, true, _) => Selection::All,
                    (true, false, Some(since)) => Selection::Since(parse(&since)?),
                    (true, false, None) => anyhow::bail!("give --id, --all or --since"),
                };
                let n = dead_letters::replay(&*store, &selection).await?;
                println!("replayed {n} dead letter(s)");
                Ok(())
            }
            DeadLetterCommand::Purge { before, yes, force } => {
                let before = parse(&before)?;
                dead_letters::check_purge_age(before, force)
                    .map_err(|e| anyhow::anyhow!("{e}: give --force to purge them anyway"))?;
                if yes {
                    let n = dead_letters::purge(&*store, before).await?;
                    println!("purged {n} dead letter(s)");
                } else {
                    let n = store.count_dead_letters_before(before).await?;
                    println!("{n} dead letter(s) would be purged; nothing was: run again with --yes to purge them");
                }
                Ok(())
            }
        };
        store.close().await;
        outcome
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn serve(sources: &ConfigSources) -> ExitCode {
    let settings = match Settings::load(sources) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    telemetry::init_logging(&settings.log);
    let result = runtime().block_on(async move {
        let app = Application::build(settings).await?;
        app.run(shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "forwarder stopped on an error");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn healthcheck(sources: &ConfigSources, url: Option<String>) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        let port = Settings::load(sources)
            .ok()
            .and_then(|s| s.server.listen.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port())
            .unwrap_or(8080);
        format!("http://127.0.0.1:{port}/health/live")
    });
    let ok = runtime().block_on(async {
        reqwest::Client::new()
            .get(&url)
            .timeout(std::time::Duration::from_secs(3))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
    });
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("{url} did not answer 200");
        ExitCode::FAILURE
    }
}
