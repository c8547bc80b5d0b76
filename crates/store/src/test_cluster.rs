//! A throwaway PostgreSQL 15 cluster for tests and benchmarks: `initdb` in
//! a temporary directory, `pg_ctl` on a free loopback port, stopped (and
//! its directory removed) when dropped. PostgreSQL refuses to run as root,
//! so as root the cluster is made and run as the `postgres` user, which
//! owns its directory.
//!
//! [`Cluster::shared`] is one cluster per test process, each test taking a
//! fresh database of it ([`Cluster::database`]); a process never drops its
//! statics, so a watchdog process stops that cluster (and removes its
//! directory) once the test process has exited, however it exited.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's PostgreSQL 15 programs.
pub const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running cluster with a superuser `cordon` (password `password` when
/// started with [`Cluster::with_password`]) and a database `cordon`.
pub struct Cluster {
    dir: tempfile::TempDir,
    pub port: u16,
    password: Option<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `program args…`, as the `postgres` user when we are root.
fn as_owner(program: &str, args: &[&str]) -> Command {
    let path = format!("{BIN}/{program}");
    if rustix::process::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]).args(args);
        c
    } else {
        let mut c = Command::new(path);
        c.args(args);
        c
    }
}

/// `command` as one line of shell (our paths hold no quotes).
fn shell_words(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(mut command: Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("cannot run {what}: {e} (is postgresql-15 installed? `make test` installs it)"));
    assert!(out.status.success(), "{what} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

impl Cluster {
    /// A cluster that trusts every local connection.
    pub fn start() -> Cluster {
        Self::start_with(None)
    }

    /// A cluster that asks for the password (SCRAM) on every connection.
    pub fn with_password(password: &str) -> Cluster {
        Self::start_with(Some(password.to_string()))
    }

    fn start_with(password: Option<String>) -> Cluster {
        let dir = tempfile::Builder::new().prefix("cordon-pg-").tempdir().unwrap();
        if rustix::process::geteuid().is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:postgres").arg(dir.path());
                    c
                },
                "chown",
            );
        }
        let data = dir.path().join("data");
        let mut initdb = as_owner("initdb", &["-D", &data.to_string_lossy(), "-U", "cordon", "-E", "UTF8", "--no-sync", "--no-instructions"]);
        match &password {
            Some(password) => {
                let file = dir.path().join("pw");
                std::fs::write(&file, password).unwrap();
                if rustix::process::geteuid().is_root() {
                    run(
                        {
                            let mut c = Command::new("chown");
                            c.arg("postgres:postgres").arg(&file);
                            c
                        },
                        "chown",
                    );
                }
                initdb.args(["-A", "scram-sha-256", "--pwfile"]).arg(&file);
            }
            None => {
                initdb.args(["-A", "trust"]);
            }
        }
        run(initdb, "initdb");
        let port = free_port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            dir.path().display()
        );
        let log = dir.path().join("log");
        run(as_owner("pg_ctl", &["-D", &data.to_string_lossy(), "-o", &options, "-l", &log.to_string_lossy(), "-w", "-t", "60", "start"]), "pg_ctl start");
        let cluster = Cluster { dir, port, password };
        run(
            {
                let mut c = Command::new(format!("{BIN}/psql"));
                c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "cordon", "-d", "postgres", "-q", "-c", "CREATE DATABASE cordon"]);
                if let Some(p) = &cluster.password {
                    c.env("PGPASSWORD", p);
                }
                c
            },
            "createdb",
        );
        cluster
    }

    /// This process's cluster, started on first use and stopped by a
    /// watchdog when the process exits.
    pub fn shared() -> &'static Cluster {
        static SHARED: std::sync::OnceLock<Cluster> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let cluster = Cluster::start();
            let stop = format!(
                "tail --pid={} -f /dev/null; {} >/dev/null 2>&1; rm -rf {}",
                std::process::id(),
                shell_words(&cluster.stop_command()),
                cluster.dir().display()
            );
            // Never waited for: it outlives this process by design (init reaps it).
            #[allow(clippy::zombie_processes)]
            Command::new("sh")
                .args(["-c", &stop])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("cannot start the cluster's watchdog");
            cluster
        })
    }

    /// A new, empty database of this cluster; its URL.
    pub fn database(&self) -> String {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!("t{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        self.psql(&format!("CREATE DATABASE {name}"));
        format!("postgres://cordon@127.0.0.1:{}/{name}", self.port)
    }

    /// `postgres://cordon@127.0.0.1:PORT/cordon` (no password in it).
    pub fn url(&self) -> String {
        format!("postgres://cordon@127.0.0.1:{}/cordon", self.port)
    }

    /// The URL with the password in it, as an operator might write it.
    pub fn url_with_password(&self) -> String {
        format!("postgres://cordon:{}@127.0.0.1:{}/cordon", self.password.as_deref().unwrap_or(""), self.port)
    }

    /// A new store on this cluster.
    pub fn store(&self) -> crate::PostgresStore {
        crate::PostgresStore::open(&self.url(), self.password.as_deref(), "the test cluster").unwrap()
    }

    /// Runs `sql` with psql and returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("cordon", sql)
    }

    /// Runs `sql` in database `database` (as [`Cluster::database`] names
    /// it: the last part of its URL); its output, or a panic.
    pub fn psql_in(&self, database: &str, sql: &str) -> String {
        let mut c = Command::new(format!("{BIN}/psql"));
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "cordon", "-d", database, "-At", "-c", sql]);
        if let Some(p) = &self.password {
            c.env("PGPASSWORD", p);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn stop_command(&self) -> Command {
        as_owner("pg_ctl", &["-D", &self.data().to_string_lossy(), "-m", "immediate", "-w", "stop"])
    }

    /// Stops the cluster at once (as a crash would).
    pub fn stop(&self) {
        let _ = self.stop_command().output();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
