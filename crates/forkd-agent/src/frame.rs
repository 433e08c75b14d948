//! Reading and writing frames (see [`crate::protocol`] for the layout).

use std::io::{self, Read, Write};

use crate::protocol::{FRAME_PREFIX_LEN, MAGIC, MAX_HEADER_LEN, MAX_PAYLOAD_LEN};

/// One frame: a JSON header and a raw payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Vec<u8>,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame I/O failed")]
    Io(#[from] io::Error),
    /// The stream is out of sync (or not speaking this protocol); it cannot be recovered.
    #[error("frame starts with {found:02x?} instead of the magic \"FKA1\"")]
    BadMagic { found: [u8; 4] },
    /// The frame was skipped; `header` holds its header when that part was within limits.
    #[error("frame too large: header {header_len} bytes (limit {MAX_HEADER_LEN}), payload {payload_len} bytes (limit {MAX_PAYLOAD_LEN})")]
    TooLarge {
        header_len: u32,
        payload_len: u32,
        header: Option<Vec<u8>>,
    },
}

/// Reads one frame. `Ok(None)` on a clean end of stream at a frame boundary.
///
/// An oversized frame is consumed (its bytes discarded without being buffered) so the stream
/// stays in sync, and reported as [`FrameError::TooLarge`].
pub fn read_frame<R: Read>(reader: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut prefix = [0u8; FRAME_PREFIX_LEN];
    if !read_exact_or_eof(reader, &mut prefix)? {
        return Ok(None);
    }
    let found: [u8; 4] = prefix[0..4].try_into().expect("4-byte slice");
    if found != MAGIC {
        return Err(FrameError::BadMagic { found });
    }
    let header_len = u32::from_be_bytes(prefix[4..8].try_into().expect("4-byte slice"));
    let payload_len = u32::from_be_bytes(prefix[8..12].try_into().expect("4-byte slice"));
    let header_fits = header_len as usize <= MAX_HEADER_LEN;
    let payload_fits = payload_len as usize <= MAX_PAYLOAD_LEN;
    if !(header_fits && payload_fits) {
        let header = if header_fits {
            Some(read_vec(reader, header_len as usize)?)
        } else {
            discard(reader, u64::from(header_len))?;
            None
        };
        discard(reader, u64::from(payload_len))?;
        return Err(FrameError::TooLarge {
            header_len,
            payload_len,
            header,
        });
    }
    let header = read_vec(reader, header_len as usize)?;
    let payload = read_vec(reader, payload_len as usize)?;
    Ok(Some(Frame { header, payload }))
}

/// Writes one frame. Panics never; oversized input is an `InvalidInput` error.
pub fn write_frame<W: Write + ?Sized>(
    writer: &mut W,
    header: &[u8],
    payload: &[u8],
) -> io::Result<()> {
    if header.len() > MAX_HEADER_LEN || payload.len() > MAX_PAYLOAD_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "frame too large to send: header {} bytes (limit {MAX_HEADER_LEN}), payload {} bytes (limit {MAX_PAYLOAD_LEN})",
                header.len(),
                payload.len()
            ),
        ));
    }
    let mut head = Vec::with_capacity(FRAME_PREFIX_LEN + header.len());
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&(header.len() as u32).to_be_bytes());
    head.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    head.extend_from_slice(header);
    writer.write_all(&head)?;
    writer.write_all(payload)?;
    writer.flush()
}

/// Fills `buf`; `Ok(false)` if the stream ended before the first byte.
fn read_exact_or_eof<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "stream ended inside a frame prefix ({filled} of {} bytes)",
                        buf.len()
                    ),
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn read_vec<R: Read>(reader: &mut R, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf)?;
    Ok(buf)
}

fn discard<R: Read>(reader: &mut R, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut reader.take(len), &mut io::sink())?;
    if copied < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "stream ended inside an oversized frame",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn frames_round_trip_back_to_back() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"{\"a\":1}", b"\x00\x01binary").unwrap();
        write_frame(&mut wire, b"{}", b"").unwrap();
        let mut cursor = Cursor::new(wire);
        let first = read_frame(&mut cursor).unwrap().unwrap();
        assert_eq!(first.header, b"{\"a\":1}");
        assert_eq!(first.payload, b"\x00\x01binary");
        let second = read_frame(&mut cursor).unwrap().unwrap();
        assert_eq!(
            (second.header.as_slice(), second.payload.len()),
            (&b"{}"[..], 0)
        );
        assert!(read_frame(&mut cursor).unwrap().is_none());
    }

    #[test]
    fn bad_magic_is_reported() {
        let mut cursor = Cursor::new(b"GET / HTTP/1.1\r\n".to_vec());
        assert!(matches!(
            read_frame(&mut cursor),
            Err(FrameError::BadMagic { found }) if &found == b"GET "
        ));
    }

    #[test]
    fn oversized_payload_is_skipped_and_stream_stays_in_sync() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&MAGIC);
        wire.extend_from_slice(&2u32.to_be_bytes());
        wire.extend_from_slice(&((MAX_PAYLOAD_LEN + 1) as u32).to_be_bytes());
        wire.extend_from_slice(b"{}");
        wire.extend(std::iter::repeat_n(7u8, MAX_PAYLOAD_LEN + 1));
        write_frame(&mut wire, b"{\"next\":1}", b"").unwrap();
        let mut cursor = Cursor::new(wire);
        match read_frame(&mut cursor) {
            Err(FrameError::TooLarge { header, .. }) => assert_eq!(header.unwrap(), b"{}"),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(
            read_frame(&mut cursor).unwrap().unwrap().header,
            b"{\"next\":1}"
        );
    }

    #[test]
    fn truncated_frame_is_an_io_error() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"{\"a\":1}", b"abc").unwrap();
        wire.truncate(wire.len() - 1);
        assert!(matches!(
            read_frame(&mut Cursor::new(wire)),
            Err(FrameError::Io(_))
        ));
        assert!(matches!(
            read_frame(&mut Cursor::new(b"FKA".to_vec())),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn writer_refuses_oversized_frames() {
        let big = vec![0u8; MAX_PAYLOAD_LEN + 1];
        let err = write_frame(&mut Vec::new(), b"{}", &big).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
