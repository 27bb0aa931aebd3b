//! An NBD server exporting one [`BlockDevice`] on a Unix socket, so unmodified programs
//! (`qemu-io`, `qemu-img`, `nbdcopy`) are the clients: `nbd+unix:///?socket=PATH`.
//!
//! Fixed newstyle handshake with `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_LIST` and `NBD_OPT_ABORT` (other options: `NBD_REP_ERR_UNSUP`); simple replies
//! only; commands `READ`, `WRITE` (with `FUA`), `FLUSH`, `TRIM`, `WRITE_ZEROES`, `DISC`. Wire
//! format in [`proto`].
//!
//! Every client is served by its own thread; the device is shared (`CAN_MULTI_CONN`: the
//! device is one, so a flush on one connection covers writes acknowledged on the others).
//!
//! # Trust
//!
//! Client bytes are parsed, never trusted: an option longer than [`proto::MAX_OPTION_LEN`],
//! a request header without the magic, or a write payload larger than
//! [`proto::MAX_PAYLOAD`] ends that connection (the stream cannot be resynchronised); a request
//! outside the export, with unknown flags or of an unknown type gets an error reply
//! (`EINVAL`, `ENOSPC` for writes past the end, `EPERM` on a read-only export).

pub mod proto;

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::block::{BlockDevice, DevError};
use proto::*;

/// Errors that end a client's session.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed or the client hung up.
    #[error("Connection I/O failed")]
    Io(#[from] io::Error),
    /// The client broke the protocol in a way that cannot be answered.
    #[error("Client broke the protocol")]
    Proto(#[from] ProtoError),
    /// The client's flags or an option length are unacceptable.
    #[error("Client sent {0}")]
    Refused(&'static str),
}

/// What the server exports.
pub struct Export {
    /// The export's name (clients may also ask for the default export, "").
    pub name: String,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
}

impl Export {
    fn known(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    fn transmission_flags(&self) -> u16 {
        let d = &self.device;
        let mut f = NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_CAN_MULTI_CONN;
        if d.read_only() {
            f |= NBD_FLAG_READ_ONLY;
        }
        if d.can_trim() {
            f |= NBD_FLAG_SEND_TRIM;
        }
        f
    }

    fn info_export(&self) -> Vec<u8> {
        let mut v = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        v.extend_from_slice(&self.device.size().to_be_bytes());
        v.extend_from_slice(&self.transmission_flags().to_be_bytes());
        v
    }

    fn info_block_size() -> Vec<u8> {
        let mut v = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        // Any alignment works (devices read-modify-write); 4 KiB is best; at most MAX_PAYLOAD.
        for x in [1u32, 4096, MAX_PAYLOAD] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        v
    }
}

fn read_u32<R: Read>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Run the handshake; `Ok(true)` when the client entered transmission, `Ok(false)` when it
/// ended the session cleanly.
pub fn handshake<S: Read + Write>(s: &mut S, export: &Export) -> Result<bool, NbdError> {
    let mut hello = NBDMAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    s.flush()?;
    let cflags = read_u32(s)?;
    if cflags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Refused("unknown client flags"));
    }
    let no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES != 0;
    loop {
        let mut head = [0u8; 16];
        s.read_exact(&mut head)?;
        let mut m = [0u8; 8];
        m.copy_from_slice(&head[..8]);
        if u64::from_be_bytes(m) != IHAVEOPT {
            return Err(NbdError::Refused("an option without IHAVEOPT"));
        }
        let opt = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
        let len = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
        if len > MAX_OPTION_LEN {
            return Err(NbdError::Refused("an oversized option"));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        let reply = |s: &mut S, kind: u32, d: &[u8]| -> io::Result<()> {
            s.write_all(&option_reply(opt, kind, d))
        };
        match opt {
            NBD_OPT_EXPORT_NAME => {
                if !export.known(&data) {
                    return Err(NbdError::Refused("an unknown export name"));
                }
                let mut v = export.device.size().to_be_bytes().to_vec();
                v.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&v)?;
                s.flush()?;
                return Ok(true);
            }
            NBD_OPT_ABORT => {
                reply(s, NBD_REP_ACK, &[])?;
                s.flush()?;
                return Ok(false);
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    reply(s, NBD_REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                } else {
                    let name = export.name.as_bytes();
                    let mut v = u32::try_from(name.len())
                        .unwrap_or(0)
                        .to_be_bytes()
                        .to_vec();
                    v.extend_from_slice(name);
                    reply(s, NBD_REP_SERVER, &v)?;
                    reply(s, NBD_REP_ACK, &[])?;
                }
            }
            NBD_OPT_INFO | NBD_OPT_GO => match InfoRequest::parse(&data) {
                Err(_) => reply(s, NBD_REP_ERR_INVALID, b"malformed info request")?,
                Ok(req) if !export.known(&req.name) => {
                    reply(s, NBD_REP_ERR_UNKNOWN, b"no such export")?;
                }
                Ok(_) => {
                    reply(s, NBD_REP_INFO, &export.info_export())?;
                    reply(s, NBD_REP_INFO, &Export::info_block_size())?;
                    reply(s, NBD_REP_ACK, &[])?;
                    if opt == NBD_OPT_GO {
                        s.flush()?;
                        return Ok(true);
                    }
                }
            },
            _ => reply(s, NBD_REP_ERR_UNSUP, b"option not supported")?,
        }
        s.flush()?;
    }
}

fn errno(e: &DevError) -> u32 {
    match e {
        DevError::OutOfRange { .. } => NBD_EINVAL,
        DevError::ReadOnly => NBD_EPERM,
        DevError::NotSupported => NBD_ENOTSUP,
        DevError::Io(_) => NBD_EIO,
    }
}

/// Serve requests until the client disconnects.
pub fn transmission<S: Read + Write>(s: &mut S, export: &Export) -> Result<(), NbdError> {
    let dev = &export.device;
    let size = dev.size();
    let mut payload = Vec::new();
    loop {
        let mut h = [0u8; REQUEST_SIZE];
        match s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let req = Request::parse(&h)?;
        let len = req.length as usize;
        if req.kind == NBD_CMD_WRITE {
            if req.length > MAX_PAYLOAD {
                return Err(NbdError::Refused("an oversized write"));
            }
            payload.resize(len, 0);
            s.read_exact(&mut payload)?;
        }
        let known_flags = match req.kind {
            NBD_CMD_WRITE => NBD_CMD_FLAG_FUA,
            NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
            NBD_CMD_TRIM => NBD_CMD_FLAG_FUA,
            _ => 0,
        };
        let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
        let then_fua =
            |r: Result<(), DevError>| r.and_then(|()| if fua { dev.flush() } else { Ok(()) });
        let result: Result<(), u32> = if req.flags & !known_flags != 0 {
            Err(NBD_EINVAL)
        } else {
            match req.kind {
                NBD_CMD_DISC => return Ok(()),
                NBD_CMD_READ => {
                    if req.length > MAX_PAYLOAD || !req.in_bounds(size) {
                        Err(NBD_EINVAL)
                    } else {
                        payload.resize(len, 0);
                        match dev.read_at(req.offset, &mut payload) {
                            Ok(()) => {
                                s.write_all(&simple_reply(0, req.cookie))?;
                                s.write_all(&payload)?;
                                s.flush()?;
                                continue;
                            }
                            Err(e) => Err(errno(&e)),
                        }
                    }
                }
                NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES | NBD_CMD_TRIM if dev.read_only() => {
                    Err(NBD_EPERM)
                }
                NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES if !req.in_bounds(size) => Err(NBD_ENOSPC),
                NBD_CMD_TRIM if !req.in_bounds(size) => Err(NBD_EINVAL),
                NBD_CMD_WRITE => {
                    then_fua(dev.write_at(req.offset, &payload)).map_err(|e| errno(&e))
                }
                NBD_CMD_WRITE_ZEROES => {
                    then_fua(dev.write_zeroes(req.offset, u64::from(req.length)))
                        .map_err(|e| errno(&e))
                }
                NBD_CMD_TRIM => {
                    then_fua(dev.trim(req.offset, u64::from(req.length))).map_err(|e| errno(&e))
                }
                NBD_CMD_FLUSH => dev.flush().map_err(|e| errno(&e)),
                _ => Err(NBD_EINVAL),
            }
        };
        let err = result.err().unwrap_or(0);
        if err != 0 {
            tracing::debug!(
                kind = req.kind,
                offset = req.offset,
                len = req.length,
                err,
                "NBD error reply"
            );
        }
        s.write_all(&simple_reply(err, req.cookie))?;
        s.flush()?;
    }
}

/// Serve one client: handshake, then transmission.
pub fn serve<S: Read + Write>(s: &mut S, export: &Export) -> Result<(), NbdError> {
    if handshake(s, export)? {
        transmission(s, export)?;
    }
    Ok(())
}

/// Clients served at once; further connections are closed at once.
pub const MAX_CLIENTS: usize = 64;

/// A server listening on a Unix socket; stopped (and the socket file removed) on drop.
pub struct NbdServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Bind `path` (replacing a stale socket file) and serve `export` from a thread, one more
    /// thread per client (at most [`MAX_CLIENTS`] at once).
    pub fn spawn(path: impl AsRef<Path>, export: Export) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let export = Arc::new(export);
        let st = stop.clone();
        let clients = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(mut c) = conn else { continue };
                    if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                        clients.fetch_sub(1, Ordering::AcqRel);
                        tracing::warn!("too many NBD clients; connection refused");
                        continue;
                    }
                    let (ex, n) = (export.clone(), clients.clone());
                    let spawned =
                        std::thread::Builder::new()
                            .name("nbd-client".into())
                            .spawn(move || {
                                if let Err(e) = serve(&mut c, &ex) {
                                    tracing::debug!(error = %e, "NBD client session ended");
                                }
                                n.fetch_sub(1, Ordering::AcqRel);
                            });
                    if spawned.is_err() {
                        clients.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            })?;
        Ok(Self {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The URI clients use.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.path.display())
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop with a connection of our own.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
