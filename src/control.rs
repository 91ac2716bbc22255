//! The control socket of a running mount: `layervol snapshot MNT`, `layervol status MNT`.
//!
//! One Unix stream socket per mount, under `/run/layervol/` (or `$LAYERVOL_RUN_DIR`), named
//! by a hash of the canonical mountpoint so that a command given only MNT finds it. The
//! protocol is one JSON request line, one JSON response line. The socket is 0600: only the
//! mounting user (root) may snapshot or query.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Snapshot,
    Status,
    /// Squash frozen layers online (`layervol squash MNT`).
    Squash {
        #[serde(default)]
        from: Option<u64>,
        #[serde(default)]
        through: Option<u64>,
    },
    Pin {
        epoch: u64,
    },
    Unpin {
        epoch: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn run_dir() -> PathBuf {
    std::env::var_os("LAYERVOL_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/layervol"))
}

/// The control socket path of the mount at `mnt` (canonical path).
pub fn socket_path(mnt: &Path) -> PathBuf {
    // FNV-1a: stable across versions and machines, and short enough for sun_path.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in mnt.as_os_str().as_encoded_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    run_dir().join(format!("{h:016x}.sock"))
}

/// Where the daemon of the mount at `mnt` (canonical path) writes its log (warnings,
/// errors, a panic's message) once it runs in the background: beside its control socket.
pub fn log_path(mnt: &Path) -> PathBuf {
    socket_path(mnt).with_extension("log")
}

/// Serves requests on the mount's socket from a background thread until the process ends.
/// Each connection has its own thread: `status` answers while a squash runs.
pub fn serve(
    mnt: &Path,
    handler: impl Fn(Request) -> anyhow::Result<serde_json::Value> + Send + Sync + 'static,
) -> anyhow::Result<PathBuf> {
    let handler = std::sync::Arc::new(handler);
    let path = socket_path(mnt);
    std::fs::create_dir_all(run_dir()).context("cannot create the control socket directory")?;
    // A socket left by a daemon that died: nobody answers on it.
    if path.exists() && UnixStream::connect(&path).is_err() {
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot bind the control socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let handler = handler.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || answer(&conn, &*handler));
                if let Err(e) = spawned {
                    tracing::error!("cannot start a thread for a control connection: {e}");
                }
            }
        })?;
    Ok(path)
}

fn answer(conn: &UnixStream, handler: &dyn Fn(Request) -> anyhow::Result<serde_json::Value>) {
    let resp = match read_request(conn) {
        Ok(req) => match handler(req) {
            Ok(v) => Response {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Response {
                ok: false,
                result: None,
                error: Some(format!("{e:#}")),
            },
        },
        Err(e) => Response {
            ok: false,
            result: None,
            error: Some(format!("bad request: {e:#}")),
        },
    };
    let mut w = conn;
    let _ = serde_json::to_writer(&mut w, &resp);
    let _ = w.write_all(b"\n");
}

/// One line, at most 1 MiB: a peer cannot make the daemon buffer without bound.
fn read_line(conn: &UnixStream) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(conn.take(1 << 20)).read_line(&mut line)?;
    Ok(line)
}

fn read_request(conn: &UnixStream) -> anyhow::Result<Request> {
    Ok(serde_json::from_str(&read_line(conn)?)?)
}

/// Sends one request to the mount at `mnt` and returns its result.
pub fn call(mnt: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    let mnt = mnt
        .canonicalize()
        .with_context(|| format!("`{}` is not a mountpoint that can be used", mnt.display()))?;
    let path = socket_path(&mnt);
    let mut conn = UnixStream::connect(&path).with_context(|| {
        format!(
            "no layervol volume is mounted on `{}` (no control socket {})",
            mnt.display(),
            path.display()
        )
    })?;
    serde_json::to_writer(&mut conn, req)?;
    conn.write_all(b"\n")?;
    let line = read_line(&conn)?;
    let resp: Response = serde_json::from_str(&line).context("bad answer from the daemon")?;
    match (resp.ok, resp.result, resp.error) {
        (true, Some(v), _) => Ok(v),
        (_, _, Some(e)) => bail!("{e}"),
        _ => bail!("empty answer from the daemon"),
    }
}
