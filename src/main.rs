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
    Sign {
        /// The webhook's HashKey.
        #[arg(long)]
        key: String,
        file: Option<PathBuf>,
    },
    /// Exit 0 when the running service answers /health/live (for container health checks).
    Healthcheck {
        /// Defaults to http://127.0.0.1:<port of server.listen>/health/live.
        #[arg(long)]
        url: Option<String>,
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
        Command::Sign { key, file } => {
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
