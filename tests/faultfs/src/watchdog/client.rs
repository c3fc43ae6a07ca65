//! The Linux watchdog API as a program uses it (open, `WDIOC_*` ioctls, feeding writes, magic
//! close), for the tests and for trying a device by hand (`vigil-lab-watchdog try`). Works on
//! `/dev/watchdog` too: never point it at a real device on a machine you care about, since
//! opening one arms it.

// The only unsafe code of this crate: ioctl(2) on our own file descriptor with a buffer we own.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::wdioc;

/// An open watchdog device. Dropping it closes without the magic 'V' (it stays armed).
#[derive(Debug)]
pub struct WatchdogDevice {
    file: File,
}

impl WatchdogDevice {
    /// `open(path, O_WRONLY)`: arms the watchdog.
    pub fn open(path: &Path) -> io::Result<WatchdogDevice> {
        Ok(WatchdogDevice {
            file: OpenOptions::new().write(true).open(path)?,
        })
    }

    /// Issues `cmd` with `buf` as its argument (in and out); returns ioctl's result.
    pub fn ioctl_raw(&self, cmd: u32, buf: &mut [u8]) -> io::Result<i32> {
        let size = ((cmd >> 16) & 0x3fff) as usize;
        if buf.len() < size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ioctl {cmd:#x} needs a {size}-byte argument"),
            ));
        }
        // SAFETY: the kernel reads/writes at most `size` bytes (from the command number) at
        // the pointer, and `buf` is at least that long and lives across the call.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                cmd as libc::Ioctl,
                buf.as_mut_ptr().cast::<libc::c_void>(),
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    fn ioctl_int(&self, cmd: u32, value: i32) -> io::Result<i32> {
        let mut buf = value.to_ne_bytes();
        self.ioctl_raw(cmd, &mut buf)?;
        Ok(i32::from_ne_bytes(buf))
    }

    /// `WDIOC_SETTIMEOUT`: returns the timeout the device accepted.
    pub fn set_timeout(&self, secs: i32) -> io::Result<i32> {
        self.ioctl_int(wdioc::SETTIMEOUT, secs)
    }

    /// `WDIOC_GETTIMEOUT`.
    pub fn timeout(&self) -> io::Result<i32> {
        self.ioctl_int(wdioc::GETTIMEOUT, 0)
    }

    /// `WDIOC_GETTIMELEFT`.
    pub fn time_left(&self) -> io::Result<i32> {
        self.ioctl_int(wdioc::GETTIMELEFT, 0)
    }

    /// `WDIOC_KEEPALIVE`.
    pub fn keepalive(&self) -> io::Result<()> {
        self.ioctl_int(wdioc::KEEPALIVE, 0).map(|_| ())
    }

    /// `WDIOC_GETSUPPORT`: the options bits and the identity.
    pub fn support(&self) -> io::Result<(u32, String)> {
        let mut buf = [0u8; wdioc::INFO_SIZE as usize];
        self.ioctl_raw(wdioc::GETSUPPORT, &mut buf)?;
        let options = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let id = &buf[8..];
        let end = id.iter().position(|b| *b == 0).unwrap_or(id.len());
        Ok((options, String::from_utf8_lossy(&id[..end]).into_owned()))
    }

    /// A feeding write (one byte that is not 'V').
    pub fn feed(&mut self) -> io::Result<()> {
        self.file.write_all(b"\0")
    }

    /// Any write (feeds; a 'V' in it allows the next close to disarm).
    pub fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.file.write(data)
    }

    /// Writes the magic 'V' and closes: disarms the watchdog (unless nowayout).
    pub fn magic_close(mut self) -> io::Result<()> {
        self.file.write_all(b"V")?;
        drop(self);
        Ok(())
    }
}
