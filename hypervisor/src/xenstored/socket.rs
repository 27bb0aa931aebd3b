//! The daemon over a Unix stream socket (the toolstack's way in).
//!
//! Each accepted client gets a reader thread (socket to
//! [`Connection::feed`](super::Connection::feed)) and a writer thread (outbox to socket), and
//! is domain 0. The socket speaks the plain message stream of
//! `devchan::xenstore::wire`, exactly what Xen's `libxenstore` and xenstore tools expect.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use devchan::xenstore::Client;

use super::{Output, Xenstored, XenstoredError};

/// Where Xen's client library looks for the daemon's socket: `$XENSTORED_PATH`, else
/// `$XENSTORED_RUNDIR/socket`, else `/var/run/xenstored/socket`.
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("XENSTORED_PATH") {
        return PathBuf::from(p);
    }
    let rundir = std::env::var_os("XENSTORED_RUNDIR")
        .map_or_else(|| PathBuf::from("/var/run/xenstored"), PathBuf::from);
    rundir.join("socket")
}

/// A client connected to the daemon's socket at `path` (as domain 0).
pub fn connect(path: impl AsRef<Path>) -> io::Result<Client<UnixStream>> {
    Ok(Client::new(UnixStream::connect(path)?))
}

/// A listening socket.
pub struct SocketServer {
    listener: UnixListener,
    path: PathBuf,
    server: Arc<Xenstored>,
    stop: Arc<AtomicBool>,
}

/// A server running in its own thread; [`ServerHandle::stop`] ends it.
pub struct ServerHandle {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl SocketServer {
    /// Binds `path` (an existing socket file there is replaced).
    pub fn bind(path: impl AsRef<Path>, server: Arc<Xenstored>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(&path)?;
        Ok(Self {
            listener,
            path,
            server,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts clients until stopped, each served by its own threads.
    pub fn run(self) -> io::Result<()> {
        for stream in self.listener.incoming() {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            match stream {
                Ok(s) => {
                    let server = Arc::clone(&self.server);
                    thread::Builder::new()
                        .name("xs-client".into())
                        .spawn(move || {
                            if let Err(e) = serve_client(&server, s) {
                                tracing::debug!(error = %e, "xenstore client dropped");
                            }
                        })?;
                }
                Err(e) => tracing::warn!(error = %e, "xenstore accept failed"),
            }
        }
        let _ = std::fs::remove_file(&self.path);
        Ok(())
    }

    /// Runs the accept loop in a thread.
    pub fn spawn(self) -> io::Result<ServerHandle> {
        let (path, stop) = (self.path.clone(), Arc::clone(&self.stop));
        let thread = thread::Builder::new()
            .name("xs-accept".into())
            .spawn(move || self.run())?;
        Ok(ServerHandle {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

impl ServerHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting (existing clients carry on until they disconnect) and waits.
    pub fn stop(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("xenstored accept thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Serves one socket client as domain 0 until it disconnects.
pub fn serve_client(server: &Arc<Xenstored>, stream: UnixStream) -> Result<(), XenstoredError> {
    let mut conn = server.connect(0, None);
    let rx = conn.take_receiver();
    let mut out = stream.try_clone()?;
    let writer = thread::Builder::new()
        .name("xs-client-out".into())
        .spawn(move || {
            while let Ok(o) = rx.recv() {
                match o {
                    Output::Bytes(b) => {
                        if out.write_all(&b).is_err() {
                            break;
                        }
                    }
                    Output::Close => break,
                }
            }
            let _ = out.shutdown(Shutdown::Both);
        })?;
    let mut input = stream;
    let mut buf = [0u8; 4096];
    let result = loop {
        match input.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = conn.feed(&buf[..n]) {
                    break Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e.into()),
        }
    };
    // Dropping the connection drops its outbox sender, which ends the writer.
    drop(conn);
    let _ = input.shutdown(Shutdown::Both);
    let _ = writer.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use devchan::xenstore::client::NO_TX;

    #[test]
    fn serves_clients_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let xs = Xenstored::new();
        let handle = SocketServer::bind(&path, xs).unwrap().spawn().unwrap();
        let mut a = connect(&path).unwrap();
        let mut b = connect(&path).unwrap();
        b.watch("/s", "tok").unwrap();
        a.write(NO_TX, "/s/k", b"v").unwrap();
        assert_eq!(b.next_event().unwrap().path, "/s");
        assert_eq!(b.next_event().unwrap().path, "/s/k");
        assert_eq!(b.read(NO_TX, "/s/k").unwrap(), b"v");
        handle.stop().unwrap();
        assert!(!path.exists());
    }
}
