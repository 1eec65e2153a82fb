//! llm-gateway-sidecar: the control plane of the LLM gateway.
//!
//! It stores provider registrations (keys sealed in a vault), custom configurations, gateway API keys
//! and settings, serves the public management API, and answers the Envoy filter's key lookups on
//! `POST /internal/v1/resolve` with an [`llm_gateway::config::Identity`] compiled by the filter's own
//! compiler.

mod budgets;
mod caller;
mod db;
mod error;
mod metrics;
mod org;
mod prices;
mod routes;
mod specs;
mod state;
mod tx;
mod util;
mod vault;

use std::future::IntoFuture;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

const USAGE: &str = "usage: llm-gateway-sidecar [serve] [--data-dir DIR] [--listen ADDR]
       llm-gateway-sidecar migrate [--data-dir DIR]
                                        apply pending database migrations and exit (pre-upgrade job;
                                        serve also applies them)
       llm-gateway-sidecar backup --to DIR [--data-dir DIR]
                                        online SQLite backup (VACUUM INTO DIR/sidecar.db) plus a copy of
                                        vault.key (provider keys cannot be decrypted without it); for
                                        PostgreSQL use pg_dump (docs/operations.md)
       llm-gateway-sidecar openapi      print the OpenAPI document (what sidecar/openapi.json holds)
       llm-gateway-sidecar admin-key rotate [--org ORG] [--keep-old] [--data-dir DIR]
                                        create a new admin key of organization ORG (id or name; default:
                                        the first one, created at first start) and print it on stdout; its
                                        previous admin keys are revoked unless --keep-old (recovering a
                                        lost key). Works while the sidecar runs (same DATABASE_URL)

  --data-dir DIR   data directory (env LLM_GATEWAY_DATA_DIR, default ./.run/sidecar)
  --listen ADDR    listen address (env SIDECAR_ADDR, default 127.0.0.1:8081; port 0 picks a free port)
  --internal-listen ADDR
                   serve /internal/*, /metrics and health on this separate address (env
                   SIDECAR_INTERNAL_ADDR); the public address then refuses /internal. Unset: one address
                   serves everything (compatible default)

Environment:
  DATABASE_URL                 postgres://... to use PostgreSQL (default: SQLite file DIR/sidecar.db)
  LLM_GATEWAY_VAULT_KEY        base64 of 32 bytes (default: DIR/vault.key, created 0600)
  LLM_GATEWAY_INTERNAL_TOKEN   token of /internal/* (default: DIR/internal.token, created 0600)
  LLM_GATEWAY_ADMIN_KEY        admin API key of the organization created on first start (never printed)
  LLM_GATEWAY_ADMIN_KEY_FILE   the same, read from a file (a mounted secret); without either, a key is
                               generated and printed once on stdout
  LLM_GATEWAY_CATALOG_POLL_SECONDS  how often the catalog files are checked for changes (default 10, 0: off;
                               SIGHUP reloads them at once)
  LLM_GATEWAY_LOG              log filter (default info; e.g. warn, debug, request=off)
  LLM_GATEWAY_LOG_FORMAT       json (default) or text
  LLM_GATEWAY_CACHE_TTL        ttlSeconds returned by /internal/v1/resolve (default 30)
  LLM_GATEWAY_MODEL_SPECS      hosted model catalog (default config/hosted-model-specs.json, else built in)
  LLM_GATEWAY_MODEL_PRICES     list-price catalog (default config/model-prices.json, else built in)
  LLM_GATEWAY_ALLOWED_DESTINATIONS  operator allow-list of provider destinations (loopback, link-local,
                               private ranges for SaaS providers), e.g. 127.0.0.1:8000,10.0.0.0/8
                               (see docs/security.md)";

struct Options {
    migrate_only: bool,
    /// `admin-key rotate`: Some((org, keep_old)).
    rotate_admin: Option<(Option<String>, bool)>,
    backup_to: Option<PathBuf>,
    data_dir: PathBuf,
    listen: String,
    internal_listen: Option<String>,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn options() -> Result<Option<Options>, String> {
    let mut data_dir =
        env_nonempty("LLM_GATEWAY_DATA_DIR").unwrap_or_else(|| "./.run/sidecar".to_string());
    let mut listen = env_nonempty("SIDECAR_ADDR").unwrap_or_else(|| "127.0.0.1:8081".to_string());
    let mut internal_listen = env_nonempty("SIDECAR_INTERNAL_ADDR");
    let mut args = std::env::args().skip(1).peekable();
    let mut migrate_only = false;
    let mut backup = false;
    let mut backup_to = None;
    let mut rotate = false;
    let mut rotate_org = None;
    let mut keep_old = false;
    match args.peek().map(String::as_str) {
        Some("admin-key") => {
            args.next();
            if args.next().as_deref() != Some("rotate") {
                return Err(format!("admin-key needs the action 'rotate'\n{USAGE}"));
            }
            rotate = true;
        }
        Some("serve") => {
            args.next();
        }
        Some("migrate") => {
            migrate_only = true;
            args.next();
        }
        Some("backup") => {
            backup = true;
            args.next();
        }
        _ => {}
    }
    while let Some(a) = args.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--data-dir" => data_dir = value()?,
            "--listen" => listen = value()?,
            "--to" if backup => backup_to = Some(PathBuf::from(value()?)),
            "--org" if rotate => rotate_org = Some(value()?),
            "--keep-old" if rotate => keep_old = true,
            "--internal-listen" => internal_listen = Some(value()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
        }
    }
    if backup && backup_to.is_none() {
        return Err(format!("backup needs --to DIR\n{USAGE}"));
    }
    Ok(Some(Options {
        migrate_only,
        rotate_admin: rotate.then_some((rotate_org, keep_old)),
        backup_to,
        data_dir: PathBuf::from(data_dir),
        listen,
        internal_listen,
    }))
}

async fn run() -> Result<(), String> {
    if std::env::args().nth(1).as_deref() == Some("openapi") {
        print!("{}", routes::openapi_json());
        return Ok(());
    }
    let Some(opts) = options()? else {
        return Ok(());
    };
    std::fs::create_dir_all(&opts.data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", opts.data_dir.display()))?;
    let _ = std::fs::set_permissions(&opts.data_dir, std::fs::Permissions::from_mode(0o700));

    let (url, is_pg) = match env_nonempty("DATABASE_URL") {
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => (u, true),
        Some(u) if u.starts_with("sqlite:") => (u, false),
        Some(_) => return Err("DATABASE_URL must be a postgres:// or sqlite: URL".to_string()),
        None => {
            let path = opts.data_dir.join("sidecar.db");
            // Created 0600 up front; SQLite gives its -wal/-shm files the same mode.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            (format!("sqlite://{}?mode=rwc", path.display()), false)
        }
    };
    if let Some(dest) = &opts.backup_to {
        if is_pg {
            return Err(
                "backup: the database is PostgreSQL; back it up with pg_dump (and keep vault.key / \
                 LLM_GATEWAY_VAULT_KEY with it), see docs/operations.md"
                    .into(),
            );
        }
        let pool = db::connect(&url, is_pg).await?;
        return backup(&pool, &opts.data_dir, dest).await;
    }
    let pool = db::connect(&url, is_pg).await?;
    if let Some((org, keep_old)) = &opts.rotate_admin {
        db::migrate(&pool, is_pg).await?;
        let (org_id, key) = db::rotate_admin_key(&pool, org.as_deref(), *keep_old).await?;
        eprintln!("llm-gateway-sidecar: new admin key of organization {org_id} (stdout)");
        println!("{key}");
        pool.close().await;
        return Ok(());
    }
    if opts.migrate_only {
        let applied = db::migrate(&pool, is_pg).await?;
        tracing::info!(?applied, "migrations applied");
        println!("llm-gateway-sidecar: schema at version {applied:?}");
        pool.close().await;
        return Ok(());
    }
    let vault = vault::Vault::load(&opts.data_dir)?;
    let internal_token = match env_nonempty("LLM_GATEWAY_INTERNAL_TOKEN") {
        Some(t) => t,
        None => util::read_or_create_secret(&opts.data_dir.join("internal.token"), || {
            util::random_hex(32)
        })?,
    };
    let ttl_seconds = match env_nonempty("LLM_GATEWAY_CACHE_TTL") {
        Some(v) => v
            .parse::<u32>()
            .map_err(|_| format!("LLM_GATEWAY_CACHE_TTL '{v}' is not a number of seconds"))?,
        None => 30,
    };
    let destinations = llm_gateway::destination::Policy::parse(
        &env_nonempty(llm_gateway::destination::ALLOW_ENV).unwrap_or_default(),
    )
    .map_err(|e| format!("{}: {e}", llm_gateway::destination::ALLOW_ENV))?;
    let catalogs = state::Catalogs::load()?;

    let admin_key = match (
        env_nonempty("LLM_GATEWAY_ADMIN_KEY"),
        env_nonempty("LLM_GATEWAY_ADMIN_KEY_FILE"),
    ) {
        (Some(k), _) => Some(k),
        (None, Some(path)) => Some(
            std::fs::read_to_string(&path)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("LLM_GATEWAY_ADMIN_KEY_FILE {path}: {e}"))?,
        )
        .filter(|k| !k.is_empty()),
        (None, None) => None,
    };
    if let Some(boot) = db::init(&pool, is_pg, admin_key).await? {
        tracing::info!(organization = %boot.org_id, "created the first organization");
        println!("llm-gateway-sidecar: created organization {}", boot.org_id);
        match boot.printed_key {
            // Only a generated key is shown (once, on stdout, not in the log); a provided one never is.
            Some(k) => println!("admin API key (shown once, store it now): {k}"),
            None => {
                println!("admin API key: taken from LLM_GATEWAY_ADMIN_KEY (or _FILE), not printed")
            }
        }
    }

    let state = Arc::new(state::Inner {
        pool,
        vault,
        internal_token,
        ttl_seconds,
        write_lock: tokio::sync::Mutex::new(()),
        catalogs: std::sync::RwLock::new(Arc::new(catalogs)),
        destinations,
        openapi: routes::openapi_json(),
        metrics: metrics::Metrics::default(),
    });
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let internal = match &opts.internal_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| format!("cannot listen on {a}: {e}"))?,
        ),
        None => None,
    };
    let backend = if is_pg { "postgresql" } else { "sqlite" };
    tokio::spawn(reload_on_sighup(state.clone()));
    let poll = match env_nonempty("LLM_GATEWAY_CATALOG_POLL_SECONDS") {
        Some(v) => v.parse::<u64>().map_err(|_| {
            format!("LLM_GATEWAY_CATALOG_POLL_SECONDS '{v}' is not a number of seconds")
        })?,
        None => 10,
    };
    if poll > 0 {
        tokio::spawn(reload_on_change(
            state.clone(),
            std::time::Duration::from_secs(poll),
        ));
    }
    let public = match &internal {
        Some(_) => routes::Listener::Public,
        None => routes::Listener::All,
    };
    let public = axum::serve(listener, routes::router(state.clone(), public))
        .with_graceful_shutdown(shutdown());
    println!("llm-gateway-sidecar listening on {addr} ({backend})");
    tracing::info!(%addr, backend, "listening");
    let Some(internal) = internal else {
        let _ = std::io::stdout().flush();
        return public.await.map_err(|e| format!("server: {e}"));
    };
    let iaddr = internal.local_addr().map_err(|e| e.to_string())?;
    println!("llm-gateway-sidecar internal endpoints on {iaddr}");
    tracing::info!(addr = %iaddr, "internal endpoints listening");
    let _ = std::io::stdout().flush();
    let internal = axum::serve(internal, routes::router(state, routes::Listener::Internal))
        .with_graceful_shutdown(shutdown());
    let (a, b) = tokio::join!(public.into_future(), internal.into_future());
    a.and(b).map_err(|e| format!("server: {e}"))
}

/// Online backup of a SQLite database: `VACUUM INTO` writes a consistent copy while the server keeps
/// running; the vault key file goes next to it (0600). Restore = put both files in a data dir.
async fn backup(
    pool: &sqlx::AnyPool,
    data_dir: &std::path::Path,
    dest: &std::path::Path,
) -> Result<(), String> {
    std::fs::create_dir_all(dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    let _ = std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o700));
    let db = dest.join("sidecar.db");
    if db.exists() {
        return Err(format!(
            "{} exists; back up into an empty directory",
            db.display()
        ));
    }
    let target = db
        .to_str()
        .ok_or("the backup path is not UTF-8")?
        .replace('\'', "''");
    sqlx::query(&format!("VACUUM INTO '{target}'"))
        .execute(pool)
        .await
        .map_err(|e| format!("backup: {e}"))?;
    let _ = std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600));
    let key = data_dir.join("vault.key");
    if key.exists() {
        let to = dest.join("vault.key");
        std::fs::copy(&key, &to).map_err(|e| format!("cannot copy vault.key: {e}"))?;
        let _ = std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600));
        println!(
            "llm-gateway-sidecar: backed up {} and vault.key",
            db.display()
        );
    } else {
        println!(
            "llm-gateway-sidecar: backed up {}; the vault key comes from LLM_GATEWAY_VAULT_KEY: keep it with the backup",
            db.display()
        );
    }
    pool.close().await;
    Ok(())
}

/// `kill -HUP`: re-read the catalogs (hosted model specs, list prices) without a restart; a bad file is
/// logged and the previous catalogs keep serving.
async fn reload_on_sighup(st: state::AppState) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        match st.reload_catalogs() {
            Ok(()) => tracing::info!("catalogs reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "catalog reload failed; the previous catalogs keep serving")
            }
        }
    }
}

/// The catalog files in use (an explicit path or the default under the working dir).
fn catalog_files() -> Vec<PathBuf> {
    [
        ("LLM_GATEWAY_MODEL_SPECS", "config/hosted-model-specs.json"),
        ("LLM_GATEWAY_MODEL_PRICES", "config/model-prices.json"),
    ]
    .iter()
    .map(|(var, default)| PathBuf::from(env_nonempty(var).unwrap_or_else(|| default.to_string())))
    .collect()
}

fn stamps(files: &[PathBuf]) -> Vec<Option<(std::time::SystemTime, u64)>> {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Watches the catalog files (what a Kubernetes ConfigMap mount updates, without any signal): a change of
/// modification time or size reloads them, like SIGHUP.
async fn reload_on_change(st: state::AppState, every: std::time::Duration) {
    let files = catalog_files();
    let mut last = stamps(&files);
    loop {
        tokio::time::sleep(every).await;
        let now = stamps(&files);
        if now == last {
            continue;
        }
        last = now;
        match st.reload_catalogs() {
            Ok(()) => tracing::info!("catalog files changed: catalogs reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "catalog reload failed; the previous catalogs keep serving")
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LLM_GATEWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if env_nonempty("LLM_GATEWAY_LOG_FORMAT").as_deref() == Some("text") {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    init_logging();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "llm-gateway-sidecar cannot run");
            ExitCode::FAILURE
        }
    }
}
