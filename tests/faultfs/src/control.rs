//! The control channel: a unix socket taking one-line commands.
//!
//! Commands: `ok`, `eio`, `hang` (switch mode), `status`. Each gets one line back:
//! `ok mode=<mode> name=<name> parked=<n> since_ms=<unix ms> eio_replies=<n> parked_total=<n>`
//! on success (the first field after `ok` is always `mode=`), `error: <text>` otherwise. A
//! connection may send several commands, one per line.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::mode::{now_ms, Controller, Mode};

/// A parsed `ok ...` answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Mode after the command.
    pub mode: Mode,
    /// Instance name.
    pub name: String,
    /// Requests parked by `hang` right now.
    pub parked: usize,
    /// Unix-ms time of the last mode change.
    pub since_ms: u128,
}

impl Status {
    /// Parses a server answer; an `error: ...` line becomes `Err`.
    pub fn parse(line: &str) -> io::Result<Status> {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("ok ") else {
            return Err(io::Error::other(format!("faultfs control: {line}")));
        };
        let mut mode = None;
        let mut name = String::new();
        let mut parked = 0;
        let mut since_ms = 0;
        for field in rest.split_whitespace() {
            match field.split_once('=') {
                Some(("mode", v)) => mode = v.parse::<Mode>().ok(),
                Some(("name", v)) => name = v.to_owned(),
                Some(("parked", v)) => parked = v.parse().unwrap_or(0),
                Some(("since_ms", v)) => since_ms = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        let mode = mode.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("no mode in {line:?}"))
        })?;
        Ok(Status {
            mode,
            name,
            parked,
            since_ms,
        })
    }
}

/// Answers one command line (without the newline).
pub fn handle_command(ctl: &Controller, line: &str) -> String {
    let cmd = line.trim();
    if cmd != "status" {
        match cmd.parse::<Mode>() {
            Ok(mode) => {
                ctl.set_mode(mode);
            }
            Err(_) => {
                return format!("error: unknown command {cmd:?} (expected ok|eio|hang|status)")
            }
        }
    }
    let (eio, parked_total) = ctl.counters();
    format!(
        "ok mode={} name={} parked={} since_ms={} eio_replies={} parked_total={}",
        ctl.mode(),
        ctl.name().replace(char::is_whitespace, "_"),
        ctl.parked(),
        ctl.since_ms(),
        eio,
        parked_total
    )
}

/// Sends one command and returns the answer line (without newline). Every socket
/// operation is bounded by `timeout`.
pub fn request(socket: &Path, command: &str, timeout: Duration) -> io::Result<String> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    (&stream).write_all(format!("{}\n", command.trim()).as_bytes())?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "faultfs control closed without answering",
        ));
    }
    Ok(line.trim_end().to_owned())
}

/// Sets the mode of the instance behind `socket`.
pub fn set_mode(socket: &Path, mode: Mode, timeout: Duration) -> io::Result<Status> {
    let status = Status::parse(&request(socket, mode.as_str(), timeout)?)?;
    if status.mode != mode {
        return Err(io::Error::other(format!(
            "faultfs control: asked for {mode}, got {}",
            status.mode
        )));
    }
    Ok(status)
}

/// Reads the status of the instance behind `socket`.
pub fn status(socket: &Path, timeout: Duration) -> io::Result<Status> {
    Status::parse(&request(socket, "status", timeout)?)
}

/// A listening control socket. Dropping it stops the listener and removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Binds `path` (replacing a stale socket file there, mode 0600) and serves `ctl` on it from
/// a background thread; each connection gets its own thread.
pub fn serve(path: &Path, ctl: Controller) -> io::Result<ControlServer> {
    serve_lines(path, Arc::new(move |line: &str| handle_command(&ctl, line)))
}

/// Answers one command line (without the newline) with one line (without the newline).
pub type LineHandler = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// Like [`serve`], with any one-line-in, one-line-out `handler` (the lab watchdog's control
/// socket uses it too).
pub fn serve_lines(path: &Path, handler: LineHandler) -> io::Result<ControlServer> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("faultfs-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                match conn {
                    Ok(stream) => {
                        let handler = Arc::clone(&handler);
                        let spawned = std::thread::Builder::new()
                            .name("faultfs-control-conn".into())
                            .spawn(move || serve_conn(stream, &*handler));
                        if let Err(e) = spawned {
                            eprintln!("{} vigil-faultfs: control thread: {e}", now_ms());
                        }
                    }
                    Err(e) => {
                        eprintln!("{} vigil-faultfs: control accept: {e}", now_ms());
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(ControlServer {
        path: path.to_path_buf(),
        stop,
        thread: Some(thread),
    })
}

fn serve_conn(stream: UnixStream, handler: &(dyn Fn(&str) -> String + Send + Sync)) {
    // A client that connects and says nothing must not hold a thread forever.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let answer = handler(&line);
        if (&stream)
            .write_all(format!("{answer}\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
}

impl ControlServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_status() {
        let ctl = Controller::new("h1");
        let a = handle_command(&ctl, "eio\n");
        let s = Status::parse(&a).expect("parse");
        assert_eq!(s.mode, Mode::Eio);
        assert_eq!(s.name, "h1");
        assert!(handle_command(&ctl, "bogus").starts_with("error: "));
        assert!(Status::parse("error: nope").is_err());
        assert_eq!(
            Status::parse(&handle_command(&ctl, "status"))
                .expect("parse")
                .mode,
            Mode::Eio
        );
    }

    #[test]
    fn socket_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("ctl.sock");
        let ctl = Controller::new("x");
        let server = serve(&sock, ctl.clone()).expect("serve");
        let t = Duration::from_secs(5);
        assert_eq!(
            set_mode(&sock, Mode::Hang, t).expect("hang").mode,
            Mode::Hang
        );
        assert_eq!(ctl.mode(), Mode::Hang);
        assert_eq!(status(&sock, t).expect("status").mode, Mode::Hang);
        assert!(request(&sock, "frobnicate", t)
            .expect("answer")
            .starts_with("error:"));
        drop(server);
        assert!(!sock.exists());
    }
}
