//! The one place that knows the wire encoding.
//!
//! Every message on a Vigil stream is a *frame*: a 4-byte big-endian payload length followed
//! by the payload, which is the message encoded with bincode 2 (serde API, standard
//! configuration, variable-length integers). bincode is pinned to `=2.0.1` because the user's
//! brief names it and its 3.0 release is only an "unmaintained" notice; nothing outside this
//! module touches bincode, so the format can be swapped in one place.
//!
//! Decoding is defensive: a length above [`MAX_FRAME_LEN`] is refused before any allocation,
//! bincode runs with the same byte limit (so a length field *inside* the payload cannot
//! make it allocate more), and trailing bytes after a message are an error.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest payload accepted or produced, in bytes (1 MiB).
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Bytes of the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame is truncated: header announces {expected} bytes, only {got} present")]
    Truncated { expected: usize, got: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message has {0} trailing bytes after its end")]
    TrailingBytes(usize),
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("i/o error on stream: {0}")]
    Io(#[from] std::io::Error),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Encodes `msg` as a payload (no length prefix).
pub fn encode_payload<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let payload = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(CodecError::FrameTooLarge {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    Ok(payload)
}

/// Decodes one payload (no length prefix). The whole slice must be one message.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(CodecError::FrameTooLarge {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::TrailingBytes(payload.len() - used));
    }
    Ok(msg)
}

/// Encodes `msg` as a complete frame: length prefix + payload.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let payload = encode_payload(msg)?;
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    // The length fits in u32: encode_payload refused anything above MAX_FRAME_LEN.
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// A frame's payload and the bytes after it.
pub type Split<'a> = (&'a [u8], &'a [u8]);

/// Splits one frame off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, `Ok(Some((payload, rest)))`
/// when it does, and an error when the announced length is over the limit.
pub fn split_frame(buf: &[u8]) -> Result<Option<Split<'_>>, CodecError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(CodecError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let rest = &buf[FRAME_HEADER_LEN..];
    if rest.len() < len {
        return Ok(None);
    }
    Ok(Some(rest.split_at(len)))
}

/// Decodes exactly one frame from a complete buffer (header + payload, nothing after).
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<T, CodecError> {
    match split_frame(buf)? {
        None => {
            let expected = if buf.len() >= FRAME_HEADER_LEN {
                u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
            } else {
                FRAME_HEADER_LEN
            };
            Err(CodecError::Truncated {
                expected,
                got: buf.len().saturating_sub(FRAME_HEADER_LEN),
            })
        }
        Some((payload, rest)) => {
            if !rest.is_empty() {
                return Err(CodecError::TrailingBytes(rest.len()));
            }
            decode_payload(payload)
        }
    }
}

/// Reads one frame from an async stream. `Ok(None)` on a clean end of stream before a frame
/// starts; an error if the stream ends inside a frame or the frame is over the limit.
pub async fn read_frame<R, T>(reader: &mut R) -> Result<Option<T>, CodecError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut filled = 0;
    while filled < FRAME_HEADER_LEN {
        let n = reader.read(&mut header[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(CodecError::Truncated {
                expected: FRAME_HEADER_LEN,
                got: filled,
            });
        }
        filled += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(CodecError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let mut payload = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = reader.read(&mut payload[got..]).await?;
        if n == 0 {
            return Err(CodecError::Truncated { expected: len, got });
        }
        got += n;
    }
    decode_payload(&payload).map(Some)
}

/// Writes one frame to an async stream.
pub async fn write_frame<W, T>(writer: &mut W, msg: &T) -> Result<(), CodecError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = encode_frame(msg)?;
    writer.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AgentToMonitor, Heartbeat, HostFacts, MonitorToAgent};
    use proptest::prelude::*;

    fn sample() -> AgentToMonitor {
        AgentToMonitor::Heartbeat(Heartbeat {
            seq: 7,
            facts: HostFacts {
                hostname: "hv1".into(),
                cpus: 8,
                memory_total_bytes: 1 << 34,
                memory_available_bytes: 1 << 33,
                load_avg: [0.5, 0.25, 0.1],
                uptime_s: 1234,
                boot_id: "b00t".into(),
            },
            mono_ms: 5_000,
            watchdog_ms: Some(10_000),
            pools: vec![crate::wire::PoolStatus {
                name: "primary".into(),
                ok: true,
                detail: String::new(),
            }],
        })
    }

    #[test]
    fn roundtrip() {
        let frame = encode_frame(&sample()).expect("encode");
        let back: AgentToMonitor = decode_frame(&frame).expect("decode");
        assert_eq!(back, sample());
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let mut frame = (u32::MAX).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0u8; 16]);
        let err = decode_frame::<AgentToMonitor>(&frame).expect_err("must refuse");
        assert!(
            matches!(err, CodecError::FrameTooLarge { len, .. } if len == u32::MAX as usize),
            "{err}"
        );
        assert!(err.to_string().contains("exceeds the maximum"));
    }

    #[test]
    fn inner_length_fields_cannot_exceed_the_limit() {
        // A heartbeat whose hostname claims to be 2^40 bytes long.
        let mut payload = vec![1u8]; // variant Heartbeat
        payload.push(7); // seq
        payload.push(253); // varint marker: u64 follows
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let err = decode_payload::<AgentToMonitor>(&payload).expect_err("must refuse");
        assert!(matches!(err, CodecError::Malformed(_)), "{err}");
    }

    #[test]
    fn truncated_frames_say_so() {
        let frame = encode_frame(&sample()).expect("encode");
        for cut in 0..frame.len() {
            let err = decode_frame::<AgentToMonitor>(&frame[..cut]).expect_err("truncated");
            assert!(
                matches!(err, CodecError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut frame = encode_frame(&sample()).expect("encode");
        frame.push(0);
        assert!(decode_frame::<AgentToMonitor>(&frame).is_err());
    }

    #[tokio::test]
    async fn async_reader_handles_split_and_eof() {
        let mut bytes = encode_frame(&sample()).expect("encode");
        bytes.extend(encode_frame(&sample()).expect("encode"));
        let mut cursor = std::io::Cursor::new(bytes.clone());
        let a: Option<AgentToMonitor> = read_frame(&mut cursor).await.expect("first");
        let b: Option<AgentToMonitor> = read_frame(&mut cursor).await.expect("second");
        let c: Option<AgentToMonitor> = read_frame(&mut cursor).await.expect("eof");
        assert_eq!(a, Some(sample()));
        assert_eq!(b, Some(sample()));
        assert_eq!(c, None);
        // EOF in the middle of a frame is an error, not a clean end.
        let mut cut = std::io::Cursor::new(bytes[..bytes.len() - 3].to_vec());
        let _: Option<AgentToMonitor> = read_frame(&mut cut).await.expect("first is whole");
        let err = read_frame::<_, AgentToMonitor>(&mut cut)
            .await
            .expect_err("cut");
        assert!(matches!(err, CodecError::Truncated { .. }));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_frame::<AgentToMonitor>(&bytes);
            let _ = decode_frame::<MonitorToAgent>(&bytes);
            let _ = decode_payload::<AgentToMonitor>(&bytes);
            let _ = decode_payload::<MonitorToAgent>(&bytes);
            let _ = decode_payload::<crate::wire::AdminRequest>(&bytes);
            let _ = decode_payload::<crate::wire::AdminResponse>(&bytes);
        }

        #[test]
        fn mutated_valid_frames_never_panic(idx in any::<usize>(), val in any::<u8>(), cut in any::<usize>()) {
            let mut frame = encode_frame(&sample()).expect("encode");
            let i = idx % frame.len();
            frame[i] = val;
            let end = cut % (frame.len() + 1);
            let _ = decode_frame::<AgentToMonitor>(&frame[..end]);
        }

        #[test]
        fn any_announced_length_is_bounded(len in any::<u32>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut frame = len.to_be_bytes().to_vec();
            frame.extend_from_slice(&tail);
            match decode_frame::<AgentToMonitor>(&frame) {
                Err(CodecError::FrameTooLarge { .. }) => prop_assert!(len as usize > MAX_FRAME_LEN),
                Err(CodecError::Truncated { .. }) => prop_assert!(len as usize > tail.len()),
                Err(CodecError::TrailingBytes(_)) => prop_assert!((len as usize) < tail.len()),
                _ => {}
            }
        }
    }
}
