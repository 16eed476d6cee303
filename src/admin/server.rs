//! The daemon's end of the admin socket: binds it root-only, reads one request per connection
//! and answers with what the [`Handler`] (the daemon) makes of it. Each connection is its own
//! task, so a slow command (a reload) never delays a `list`.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use super::{Request, Response};

/// What the commands do.
pub trait Handler: Send + Sync + 'static {
    fn handle(self: Arc<Self>, req: Request) -> impl Future<Output = Response> + Send;
}

/// Serves the admin socket at `path` until the task is dropped.
pub async fn serve<H: Handler>(path: PathBuf, handler: Arc<H>) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    // A stale socket from a crashed run would make bind fail.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(anyhow!(
                "another xdpvs is serving the admin socket {}",
                path.display()
            ));
        }
        std::fs::remove_file(&path)?;
    }
    // Create the socket with no permissions for group/other from the start (no window in
    // which another user could connect), then set 0600 explicitly.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(&path);
    unsafe { libc::umask(old) };
    let listener =
        listener.with_context(|| format!("binding the admin socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %path.display(), "admin socket ready (mode 0600)");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, handler).await {
                warn!(error = %format!("{e:#}"), "admin request failed");
            }
        });
    }
}

async fn connection<H: Handler>(stream: UnixStream, handler: Arc<H>) -> Result<()> {
    // Only root may talk to the daemon, whatever the socket's mode says.
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let resp = if cred.uid() != 0 {
        Response::error("permission denied: the admin socket is for root")
    } else {
        let mut line = String::new();
        let mut reader = BufReader::new(read).take(64 * 1024);
        tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
            .await
            .map_err(|_| anyhow!("admin client sent no request"))??;
        match serde_json::from_str::<Request>(&line) {
            Ok(req) => handler.handle(req).await,
            Err(e) => Response::error(format!("bad request: {e}")),
        }
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await?;
    Ok(())
}
