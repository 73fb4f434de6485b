//! The messages between a cow_fork parent and its fork server (see "The fork server" in this
//! module's README): item, `fork` and `cancel` frames on the server's input pipe, one report
//! per record on the socket back.

use super::frame::{self, Decoder, Kind};
use super::message::MessageError;
use crate::sys::Exit;

/// A frame from the parent to its fork server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ToForker<'a> {
    /// An input item, encoded by the stage's codec (decoded only in the child that runs it).
    Item(&'a [u8]),
    /// Fork one child for the items sent since the last `fork`; the frame's id is the
    /// child's sequence number.
    Fork,
    /// The run is aborting: fork none of the children asked for and not yet forked.
    Cancel,
}

impl<'a> ToForker<'a> {
    /// What a frame from the parent means.
    pub(crate) fn decode(kind: Kind, payload: &'a [u8]) -> Result<Self, MessageError> {
        match kind {
            Kind::Item => Ok(ToForker::Item(payload)),
            Kind::Fork if payload.is_empty() => Ok(ToForker::Fork),
            Kind::Cancel if payload.is_empty() => Ok(ToForker::Cancel),
            other => Err(MessageError::Unexpected {
                kind: other,
                from: "the parent",
            }),
        }
    }
}

/// A report from the fork server about the child with a sequence number (the frame's id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FromForker {
    /// Forked with this pid; the record carries the read end of its result pipe, then its
    /// pidfd.
    Forked { pid: i32 },
    /// Reaped by the server.
    Exited(Exit),
    /// No child was made (pipe or fork failed), with why.
    ForkFailed(String),
}

/// The largest report: a header and at most a short message.
pub(crate) const MAX_REPORT: usize = 4096;

impl FromForker {
    /// The report as one frame, for child `seq`.
    pub(crate) fn encode(&self, seq: u64) -> Vec<u8> {
        let mut buf = Vec::with_capacity(frame::HEADER + 8);
        let (kind, payload) = match self {
            FromForker::Forked { pid } => (Kind::Forked, pid.to_le_bytes().to_vec()),
            FromForker::Exited(Exit::Code(c)) => (Kind::Exited, exit_bytes(0, *c)),
            FromForker::Exited(Exit::Signal(s)) => (Kind::Exited, exit_bytes(1, *s)),
            FromForker::ForkFailed(m) => {
                let mut m = m.clone();
                // At a character boundary: `truncate` panics inside one.
                let mut end = m.len().min(MAX_REPORT - frame::HEADER - 8);
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                m.truncate(end);
                (Kind::ForkFailed, m.into_bytes())
            }
        };
        frame::push(&mut buf, kind, seq, &payload, MAX_REPORT).expect("reports are short");
        buf
    }

    /// A report record: exactly one frame, checked.
    pub(crate) fn decode(record: &[u8]) -> Result<(u64, FromForker), String> {
        let mut dec = Decoder::new(MAX_REPORT);
        dec.extend(record);
        let decoded = dec.next(|kind, id, p| (id, Self::payload(kind, p)));
        match decoded {
            Ok(Some((id, Ok(report)))) if dec.pending() == 0 => Ok((id, report)),
            Ok(Some((_, Err(e)))) => Err(e),
            Ok(_) => Err(format!(
                "a report record of {} bytes is not one frame",
                record.len()
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    fn payload(kind: Kind, p: &[u8]) -> Result<FromForker, String> {
        match (kind, p.len()) {
            (Kind::Forked, 4) => Ok(FromForker::Forked {
                pid: i32::from_le_bytes(p.try_into().expect("4 bytes")),
            }),
            (Kind::Exited, 5) => {
                let v = i32::from_le_bytes(p[1..].try_into().expect("4 bytes"));
                match p[0] {
                    0 => Ok(FromForker::Exited(Exit::Code(v))),
                    1 => Ok(FromForker::Exited(Exit::Signal(v))),
                    t => Err(format!("exit report with tag {t}")),
                }
            }
            (Kind::ForkFailed, _) => Ok(FromForker::ForkFailed(
                String::from_utf8_lossy(p).into_owned(),
            )),
            (kind, len) => Err(format!("unexpected {kind:?} report of {len} bytes")),
        }
    }
}

fn exit_bytes(tag: u8, v: i32) -> Vec<u8> {
    let mut b = vec![tag];
    b.extend_from_slice(&v.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_foreign_records_are_refused() {
        let all = [
            FromForker::Forked { pid: 4242 },
            FromForker::Exited(Exit::Code(3)),
            FromForker::Exited(Exit::Signal(9)),
            FromForker::ForkFailed("fork failed: no memory".into()),
        ];
        for (seq, r) in all.into_iter().enumerate() {
            let bytes = r.encode(seq as u64);
            assert_eq!(FromForker::decode(&bytes), Ok((seq as u64, r)));
        }
        let mut two = FromForker::Forked { pid: 1 }.encode(0);
        two.extend(FromForker::Forked { pid: 2 }.encode(1));
        assert!(FromForker::decode(&two).is_err(), "one frame per record");
        assert!(FromForker::decode(&[1, 2, 3]).is_err());
        // A long message is cut, at a character boundary, to fit one report.
        let long = FromForker::ForkFailed("é".repeat(MAX_REPORT));
        match FromForker::decode(&long.encode(7)) {
            Ok((7, FromForker::ForkFailed(m))) => {
                assert!(m.len() < MAX_REPORT && m.chars().all(|c| c == 'é'), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let mut bad = Vec::new();
        frame::push(&mut bad, Kind::Result, 0, b"x", 100).unwrap();
        assert!(FromForker::decode(&bad).is_err(), "not a report kind");
    }

    #[test]
    fn the_server_takes_items_and_forks_only() {
        assert_eq!(ToForker::decode(Kind::Item, b"a"), Ok(ToForker::Item(b"a")));
        assert_eq!(ToForker::decode(Kind::Fork, b""), Ok(ToForker::Fork));
        assert_eq!(ToForker::decode(Kind::Cancel, b""), Ok(ToForker::Cancel));
        assert!(ToForker::decode(Kind::Shutdown, b"").is_err());
        assert!(ToForker::decode(Kind::Fork, b"x").is_err());
    }
}
