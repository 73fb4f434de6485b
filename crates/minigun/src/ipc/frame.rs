//! Length-prefixed frames: encoding into a buffer, incremental decoding from a byte stream.

/// Bytes before the payload: len (4) + kind (1) + id (8).
pub(crate) const HEADER: usize = 13;

/// Message kinds (see the module docs of `ipc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Item = 1,
    Result = 2,
    Done = 3,
    Error = 4,
    Shutdown = 5,
    Log = 6,
    Routed = 7,
    ResultDone = 8,
    Fork = 9,
    Forked = 10,
    Exited = 11,
    ForkFailed = 12,
    Cancel = 13,
    Items = 14,
    Results = 15,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Item,
            2 => Kind::Result,
            3 => Kind::Done,
            4 => Kind::Error,
            5 => Kind::Shutdown,
            6 => Kind::Log,
            7 => Kind::Routed,
            8 => Kind::ResultDone,
            9 => Kind::Fork,
            10 => Kind::Forked,
            11 => Kind::Exited,
            12 => Kind::ForkFailed,
            13 => Kind::Cancel,
            14 => Kind::Items,
            15 => Kind::Results,
            _ => return None,
        })
    }
}

/// A stream that is not a valid sequence of frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame length {0} is shorter than its header")]
    Short(usize),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
}

/// Starts a frame at the end of `buf`; returns its start for [`finish`].
pub(crate) fn begin(buf: &mut Vec<u8>, kind: Kind, id: u64) -> usize {
    let start = buf.len();
    // The length is written by `finish`.
    buf.extend_from_slice(&header(kind, id, 0));
    start
}

/// The header of a frame whose payload of `len` bytes is written after it separately.
pub(crate) fn header(kind: Kind, id: u64, len: usize) -> [u8; HEADER] {
    let len = u32::try_from(len + HEADER - 4).expect("a frame's length fits in 32 bits");
    let mut h = [0; HEADER];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4] = kind as u8;
    h[5..].copy_from_slice(&id.to_le_bytes());
    h
}

/// Writes the length of the frame begun at `start`; a frame over `max` is removed again.
pub(crate) fn finish(buf: &mut Vec<u8>, start: usize, max: usize) -> Result<(), FrameError> {
    let len = buf.len() - start - 4;
    if len > max || len > u32::MAX as usize {
        buf.truncate(start);
        return Err(FrameError::TooLarge { len, max });
    }
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Turns the frame at `start`, which must be the last one in `buf`, into a frame of `kind`
/// with `trailer` appended to its payload. `false` (and `buf` unchanged) if that frame is not
/// the last one or the result would exceed `max`.
pub(crate) fn retag(
    buf: &mut Vec<u8>,
    start: usize,
    kind: Kind,
    trailer: &[u8],
    max: usize,
) -> bool {
    let Some(head) = buf.get(start..start + 4) else {
        return false;
    };
    let len = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
    if start + 4 + len != buf.len() || len + trailer.len() > max.min(u32::MAX as usize) {
        return false;
    }
    buf[start + 4] = kind as u8;
    buf.extend_from_slice(trailer);
    buf[start..start + 4].copy_from_slice(&((len + trailer.len()) as u32).to_le_bytes());
    true
}

/// Appends a complete frame with a raw payload.
pub(crate) fn push(
    buf: &mut Vec<u8>,
    kind: Kind,
    id: u64,
    payload: &[u8],
    max: usize,
) -> Result<(), FrameError> {
    let s = begin(buf, kind, id);
    buf.extend_from_slice(payload);
    finish(buf, s, max)
}

/// Incremental decoder: feed it bytes as they arrive, take complete frames out.
#[derive(Debug)]
pub(crate) struct Decoder {
    buf: Vec<u8>,
    start: usize,
    max: usize,
}

impl Decoder {
    pub(crate) fn new(max: usize) -> Self {
        Decoder {
            buf: Vec::new(),
            start: 0,
            max,
        }
    }

    /// Reads once from `fd` into the buffer (at most `chunk` bytes, without zero-filling:
    /// untouched capacity costs no page faults). Returns the number of bytes read (0 = EOF).
    #[cfg(target_os = "linux")]
    pub(crate) fn read_from(
        &mut self,
        fd: impl std::os::fd::AsFd,
        chunk: usize,
    ) -> rustix::io::Result<usize> {
        if self.start > 0 && (self.start == self.buf.len() || self.start >= 1 << 16) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(chunk);
        rustix::io::read(fd, rustix::buffer::spare_capacity(&mut self.buf))
    }

    /// Appends bytes (received some other way than `read_from`).
    pub(crate) fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The bytes received that do not yet form a complete frame.
    pub(crate) fn pending_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Drops every byte received and not yet taken as a frame.
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    /// Bytes received that do not yet form a complete frame.
    pub(crate) fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Takes the next complete frame, if any, and hands it to `f`.
    pub(crate) fn next<R>(
        &mut self,
        f: impl FnOnce(Kind, u64, &[u8]) -> R,
    ) -> Result<Option<R>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(avail[..4].try_into().expect("4 bytes")) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if len < HEADER - 4 {
            return Err(FrameError::Short(len));
        }
        if avail.len() < 5 {
            return Ok(None);
        }
        let kind = Kind::from_u8(avail[4]).ok_or(FrameError::BadKind(avail[4]))?;
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let id = u64::from_le_bytes(avail[5..13].try_into().expect("8 bytes"));
        let r = f(kind, id, &avail[HEADER..4 + len]);
        self.start += 4 + len;
        Ok(Some(r))
    }
}

/// Decodes a byte stream delivered in chunks (for fuzzing): frames until the first error.
pub(crate) fn fuzz_decode(data: &[u8], chunk: usize, max: usize) -> usize {
    let mut d = Decoder::new(max);
    let mut frames = 0;
    for part in data.chunks(chunk.max(1)) {
        d.buf.extend_from_slice(part);
        loop {
            match d.next(|kind, id, payload| (kind, id, payload.len())) {
                Ok(Some(_)) => frames += 1,
                Ok(None) => break,
                Err(_) => return frames,
            }
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(d: &mut Decoder) -> Result<Vec<(Kind, u64, Vec<u8>)>, FrameError> {
        let mut v = Vec::new();
        while let Some(f) = d.next(|k, id, p| (k, id, p.to_vec()))? {
            v.push(f);
        }
        Ok(v)
    }

    #[test]
    fn round_trip_and_partial_delivery() {
        let mut buf = Vec::new();
        push(&mut buf, Kind::Result, 7, b"hello", 1 << 20).unwrap();
        push(&mut buf, Kind::Done, 7, b"", 1 << 20).unwrap();
        let mut d = Decoder::new(1 << 20);
        d.extend(&buf[..10]);
        assert!(frames(&mut d).unwrap().is_empty());
        assert_eq!(d.pending(), 10);
        d.extend(&buf[10..]);
        let got = frames(&mut d).unwrap();
        assert_eq!(
            got,
            vec![
                (Kind::Result, 7, b"hello".to_vec()),
                (Kind::Done, 7, vec![])
            ]
        );
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        let mut buf = Vec::new();
        assert_eq!(
            push(&mut buf, Kind::Result, 1, &[0; 100], 50),
            Err(FrameError::TooLarge { len: 109, max: 50 })
        );
        assert!(buf.is_empty(), "a refused frame leaves nothing behind");
        let mut d = Decoder::new(50);
        d.extend(&1000u32.to_le_bytes());
        assert_eq!(
            d.next(|_, _, _| ()),
            Err(FrameError::TooLarge { len: 1000, max: 50 })
        );
    }

    #[test]
    fn retag_joins_only_the_last_frame_within_the_limit() {
        let mut buf = Vec::new();
        push(&mut buf, Kind::Result, 7, b"abc", 100).unwrap();
        let second = buf.len();
        push(&mut buf, Kind::Result, 7, b"de", 100).unwrap();
        let before = buf.clone();
        // Not the last frame: refused, nothing changed.
        assert!(!retag(&mut buf, 0, Kind::ResultDone, &[9; 8], 100));
        // Over the limit (9 + 2 + 8 = 19 > 18): refused, nothing changed.
        assert!(!retag(&mut buf, second, Kind::ResultDone, &[9; 8], 18));
        assert_eq!(buf, before);
        assert!(retag(&mut buf, second, Kind::ResultDone, &[9; 8], 19));
        let mut d = Decoder::new(100);
        d.extend(&buf);
        let mut joined = b"de".to_vec();
        joined.extend_from_slice(&[9; 8]);
        assert_eq!(
            frames(&mut d).unwrap(),
            vec![
                (Kind::Result, 7, b"abc".to_vec()),
                (Kind::ResultDone, 7, joined)
            ]
        );
    }

    #[test]
    fn bad_kind_and_short_length() {
        let mut d = Decoder::new(100);
        d.extend(&[9, 0, 0, 0, 42]);
        assert_eq!(d.next(|_, _, _| ()), Err(FrameError::BadKind(42)));
        let mut d = Decoder::new(100);
        d.extend(&[3, 0, 0, 0, 1]);
        assert_eq!(d.next(|_, _, _| ()), Err(FrameError::Short(3)));
    }

    proptest! {
        #[test]
        fn any_split_decodes_the_same(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20), cut in 1usize..64) {
            let mut buf = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                push(&mut buf, Kind::Result, i as u64, p, 1 << 20).unwrap();
            }
            let mut d = Decoder::new(1 << 20);
            let mut got = Vec::new();
            for chunk in buf.chunks(cut) {
                d.extend(chunk);
                got.extend(frames(&mut d).unwrap());
            }
            prop_assert_eq!(got.len(), payloads.len());
            for (i, (k, id, p)) in got.into_iter().enumerate() {
                prop_assert_eq!(k, Kind::Result);
                prop_assert_eq!(id, i as u64);
                prop_assert_eq!(&p, &payloads[i]);
            }
        }

        #[test]
        fn mutated_streams_never_panic(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..10),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
            chunk in 1usize..40,
        ) {
            let mut buf = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                push(&mut buf, Kind::Result, i as u64, p, 1 << 20).unwrap();
            }
            let good = fuzz_decode(&buf, chunk, 4096);
            prop_assert_eq!(good, payloads.len());
            for (at, b) in flips {
                let at = at % buf.len();
                buf[at] ^= b;
            }
            buf.truncate(cut % (buf.len() + 1));
            let n = fuzz_decode(&buf, chunk, 4096);
            prop_assert!(n <= payloads.len() + buf.len() / HEADER);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = Decoder::new(4096);
            d.extend(&bytes);
            for _ in 0..600 {
                match d.next(|_, _, p| p.len()) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
