//! Test harness: starts the real sidecar binary on a free loopback port with its own data dir (and, when
//! `DATABASE_URL` is set, its own fresh PostgreSQL database), talks HTTP/1.1 to it, and always stops it
//! by PID when dropped.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

static COUNTER: AtomicU32 = AtomicU32::new(0);
const START_TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst),
        nanos
    )
}

/// The PostgreSQL server URL the tests run against (None: SQLite).
pub fn pg_base() -> Option<String> {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"))
}

pub fn is_pg() -> bool {
    pg_base().is_some()
}

/// Creates a fresh database on the test PostgreSQL server and returns its URL.
pub fn fresh_pg_database(base: &str) -> String {
    let name = unique("t").to_lowercase();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::postgres::PgConnection::connect(base)
            .await
            .expect("connect to test PostgreSQL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        let _ = conn.close().await;
    });
    let (prefix, _) = base
        .rsplit_once('/')
        .expect("DATABASE_URL has a database path");
    format!("{prefix}/{name}")
}

pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    pub admin: String,
    pub token: String,
    pub db_url: Option<String>,
    pub env: Vec<(String, String)>,
    pub stdout: Vec<String>,
    /// The port of `/internal` (the public port unless `--internal-listen` was given).
    pub internal_port: u16,
    /// Extra command-line arguments (kept for restarts).
    pub args: Vec<String>,
    /// When true, the server's stderr (its JSON log) goes to `dir/stderr.log`.
    pub log_to_file: bool,
    owns_dir: bool,
}

pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub raw: String,
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    pub fn start_with(env: &[(&str, &str)]) -> Server {
        let dir = std::env::temp_dir().join(unique("llm-sidecar-test"));
        std::fs::create_dir_all(&dir).unwrap();
        let db_url = pg_base().map(|b| fresh_pg_database(&b));
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::launch(dir, db_url, env, true)
    }

    /// A server on an existing data dir (a restored backup); SQLite unless DATABASE_URL is given in `env`.
    pub fn start_in(dir: PathBuf, env: &[(&str, &str)]) -> Server {
        Self::start_on(dir, None, env)
    }

    /// A server on an existing data dir and the given database URL (None: the dir's SQLite file).
    pub fn start_on(dir: PathBuf, db_url: Option<String>, env: &[(&str, &str)]) -> Server {
        std::fs::create_dir_all(&dir).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::launch(dir, db_url, env, true)
    }

    /// A server with extra arguments whose log (stderr) is kept in `dir/stderr.log`.
    pub fn start_logged(env: &[(&str, &str)], args: &[&str]) -> Server {
        let dir = std::env::temp_dir().join(unique("llm-sidecar-test"));
        std::fs::create_dir_all(&dir).unwrap();
        let db_url = pg_base().map(|b| fresh_pg_database(&b));
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let args = args.iter().map(|a| a.to_string()).collect();
        Self::launch_with(dir, db_url, env, true, args, true)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// A second replica sharing this server's database and vault key (its own data dir).
    pub fn replica(&self) -> Server {
        let dir = std::env::temp_dir().join(unique("llm-sidecar-replica"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut env = self.env.clone();
        env.push(("LLM_GATEWAY_INTERNAL_TOKEN".into(), self.token.clone()));
        let db_url = self
            .db_url
            .clone()
            .or_else(|| Some(format!("sqlite://{}/sidecar.db", self.dir.display())));
        let mut s = Self::launch(dir, db_url, env, true);
        s.admin = self.admin.clone();
        s
    }

    /// Stops this server and starts a new one on the same data dir and database.
    pub fn restart(mut self) -> Server {
        self.stop();
        self.owns_dir = false;
        let mut s = Self::launch_with(
            self.dir.clone(),
            self.db_url.clone(),
            self.env.clone(),
            true,
            self.args.clone(),
            self.log_to_file,
        );
        s.admin = self.admin.clone();
        s
    }

    fn launch(
        dir: PathBuf,
        db_url: Option<String>,
        env: Vec<(String, String)>,
        owns_dir: bool,
    ) -> Server {
        Self::launch_with(dir, db_url, env, owns_dir, Vec::new(), false)
    }

    fn launch_with(
        dir: PathBuf,
        db_url: Option<String>,
        env: Vec<(String, String)>,
        owns_dir: bool,
        args: Vec<String>,
        log_to_file: bool,
    ) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llm-gateway-sidecar"));
        cmd.args([
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
        if log_to_file {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("stderr.log"))
                .unwrap();
            cmd.stderr(f);
        } else {
            cmd.stderr(Stdio::inherit());
        }
        for v in [
            "DATABASE_URL",
            "LLM_GATEWAY_VAULT_KEY",
            "LLM_GATEWAY_INTERNAL_TOKEN",
            "LLM_GATEWAY_ADMIN_KEY",
            "LLM_GATEWAY_CACHE_TTL",
            "LLM_GATEWAY_DATA_DIR",
            "SIDECAR_ADDR",
            "LLM_GATEWAY_MODEL_SPECS",
            "LLM_GATEWAY_ALLOWED_DESTINATIONS",
            "LLM_GATEWAY_ADMIN_KEY_FILE",
            "SIDECAR_INTERNAL_ADDR",
            "LLM_GATEWAY_LOG",
            "LLM_GATEWAY_LOG_FORMAT",
            "LLM_GATEWAY_CATALOG_POLL_SECONDS",
        ] {
            cmd.env_remove(v);
        }
        // The fake providers of the tests listen on loopback: allow it explicitly (a test may override).
        cmd.env("LLM_GATEWAY_ALLOWED_DESTINATIONS", "127.0.0.1");
        if let Some(u) = &db_url {
            cmd.env("DATABASE_URL", u);
        }
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn sidecar");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut s = Server {
            child: Some(child),
            port: 0,
            dir,
            admin: String::new(),
            token: String::new(),
            db_url,
            env,
            stdout: Vec::new(),
            internal_port: 0,
            args,
            log_to_file,
            owns_dir,
        };
        let split = s.args.iter().any(|a| a == "--internal-listen");
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => panic!(
                    "sidecar did not start in time; output so far: {:?} {}",
                    s.stdout,
                    s.log()
                ),
            };
            s.stdout.push(line.clone());
            if let Some(k) = line.strip_prefix("admin API key (shown once, store it now): ") {
                s.admin = k.trim().to_string();
            }
            if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
                s.port = rest.split_whitespace().next().unwrap().parse().unwrap();
                if !split {
                    break;
                }
            }
            if let Some(rest) = line.split("internal endpoints on 127.0.0.1:").nth(1) {
                s.internal_port = rest.split_whitespace().next().unwrap().parse().unwrap();
                break;
            }
        }
        if s.internal_port == 0 {
            s.internal_port = s.port;
        }
        s.token = s
            .env
            .iter()
            .find(|(k, _)| k == "LLM_GATEWAY_INTERNAL_TOKEN")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| {
                std::fs::read_to_string(s.dir.join("internal.token"))
                    .unwrap()
                    .trim()
                    .to_string()
            });
        if let Some((_, k)) = s.env.iter().find(|(k, _)| k == "LLM_GATEWAY_ADMIN_KEY") {
            s.admin = k.clone();
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Resp {
        self.request_on(self.port, method, path, headers, body)
    }

    pub fn request_on(
        &self,
        port: u16,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Resp {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let body = body.unwrap_or("");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        stream.write_all(req.as_bytes()).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("read response");
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, mut payload) = text
            .split_once("\r\n\r\n")
            .map(|(h, b)| (h.to_string(), b.to_string()))
            .unwrap();
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            payload = dechunk(&payload);
        }
        let body = if payload.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&payload).unwrap_or(Value::String(payload.clone()))
        };
        Resp {
            status,
            body,
            raw: payload,
        }
    }

    pub fn call(&self, method: &str, path: &str, key: &str, body: Option<&str>) -> Resp {
        self.request(method, path, &[("X-API-Key", key)], body)
    }
    pub fn get(&self, path: &str, key: &str) -> Resp {
        self.call("GET", path, key, None)
    }
    pub fn post(&self, path: &str, key: &str, body: &str) -> Resp {
        self.call("POST", path, key, Some(body))
    }
    pub fn put(&self, path: &str, key: &str, body: &str) -> Resp {
        self.call("PUT", path, key, Some(body))
    }
    pub fn patch(&self, path: &str, key: &str, body: &str) -> Resp {
        self.call("PATCH", path, key, Some(body))
    }
    pub fn delete(&self, path: &str, key: &str) -> Resp {
        self.call("DELETE", path, key, None)
    }

    /// `POST /internal/v1/resolve` for a plain gateway key.
    pub fn resolve(&self, key: &str) -> Resp {
        let body = format!(
            "{{\"keySha256\":\"{}\"}}",
            llm_gateway::config::hash_key(key)
        );
        self.request_on(
            self.internal_port,
            "POST",
            "/internal/v1/resolve",
            &[("x-gateway-token", &self.token)],
            Some(&body),
        )
    }

    /// A new organization through the operator endpoint; returns (org id, its admin key).
    pub fn new_org(&self, name: &str) -> (String, String) {
        let r = self.request_on(
            self.internal_port,
            "POST",
            "/internal/v1/organizations",
            &[("x-gateway-token", &self.token)],
            Some(&format!("{{\"name\":\"{name}\"}}")),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
        (
            r.body["orgId"].as_str().unwrap().to_string(),
            r.body["apiKey"].as_str().unwrap().to_string(),
        )
    }

    /// Creates a key and returns (key id, secret).
    pub fn new_key(&self, admin: &str, body: &str) -> (String, String) {
        let r = self.post("/v1/llm/api-keys", admin, body);
        assert_eq!(r.status, 201, "{}", r.raw);
        (
            r.body["id"].as_str().unwrap().to_string(),
            r.body["key"].as_str().unwrap().to_string(),
        )
    }
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Asserts an API error: status, `error.code`, and that the message is not empty.
#[track_caller]
pub fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "unexpected status; body: {}", r.raw);
    let e = &r.body["error"];
    assert_eq!(
        e["code"].as_str(),
        Some(code),
        "unexpected code; body: {}",
        r.raw
    );
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.raw
    );
    assert!(
        e["type"].is_string() && e.get("param").is_some(),
        "{}",
        r.raw
    );
}
