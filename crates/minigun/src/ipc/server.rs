//! The messages between a cow_fork parent and its fork server (see "The fork server" in this
//! module's README): item, `fork` and `cancel` frames on the server's input pipe, records of
//! reports on the socket back (one or more reports each, at most one `forked`).

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

/// The largest number of reports the server puts in one record, so a record always fits in
/// [`MAX_REPORT`] bytes (an `exited` report is a frame of 18 bytes, a `forked` one of 17).
pub(crate) const MAX_REPORTS: usize = 128;

impl FromForker {
    /// The report as one frame, for child `seq`.
    #[cfg(test)]
    pub(crate) fn encode(&self, seq: u64) -> Vec<u8> {
        let mut buf = Vec::with_capacity(frame::HEADER + 8);
        self.encode_into(seq, &mut buf);
        buf
    }

    /// Appends the report as one frame, for child `seq`, to `buf` (a record being made).
    pub(crate) fn encode_into(&self, seq: u64, buf: &mut Vec<u8>) {
        let exit = |tag: u8, v: i32| {
            let mut b = [tag, 0, 0, 0, 0];
            b[1..].copy_from_slice(&v.to_le_bytes());
            b
        };
        let (kind, payload): (Kind, &[u8]) = match self {
            FromForker::Forked { pid } => (Kind::Forked, &pid.to_le_bytes()),
            FromForker::Exited(Exit::Code(c)) => (Kind::Exited, &exit(0, *c)),
            FromForker::Exited(Exit::Signal(s)) => (Kind::Exited, &exit(1, *s)),
            FromForker::ForkFailed(m) => {
                // At a character boundary, to fit one record.
                let mut end = m.len().min(MAX_REPORT - frame::HEADER - 8);
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                (Kind::ForkFailed, &m.as_bytes()[..end])
            }
        };
        frame::push(buf, kind, seq, payload, MAX_REPORT).expect("reports are short");
    }

    /// A report record: one or more frames, checked, in the order sent; at most one of them
    /// is a `forked` report (the record's fds are its).
    pub(crate) fn decode(record: &[u8]) -> Result<Vec<(u64, FromForker)>, String> {
        let mut dec = Decoder::new(MAX_REPORT);
        dec.extend(record);
        let mut reports = Vec::new();
        loop {
            match dec.next(|kind, id, p| (id, Self::payload(kind, p))) {
                Ok(Some((id, Ok(report)))) => reports.push((id, report)),
                Ok(Some((_, Err(e)))) => return Err(e),
                Ok(None) if dec.pending() == 0 && !reports.is_empty() => break,
                Ok(None) => {
                    return Err(format!(
                        "a report record of {} bytes is not whole frames",
                        record.len()
                    ))
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        let forked = reports
            .iter()
            .filter(|(_, r)| matches!(r, FromForker::Forked { .. }))
            .count();
        match forked {
            0 | 1 => Ok(reports),
            n => Err(format!("a report record with {n} forked reports")),
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
        let mut record = Vec::new();
        for (seq, r) in all.iter().enumerate() {
            let bytes = r.encode(seq as u64);
            assert_eq!(
                FromForker::decode(&bytes),
                Ok(vec![(seq as u64, r.clone())])
            );
            r.encode_into(seq as u64, &mut record);
        }
        // Several reports in one record, in order.
        let each = all.iter().cloned().enumerate().map(|(s, r)| (s as u64, r));
        assert_eq!(FromForker::decode(&record), Ok(each.collect()));
        let mut most = Vec::new();
        FromForker::Forked { pid: 1 }.encode_into(0, &mut most);
        for seq in 1..MAX_REPORTS as u64 {
            FromForker::Exited(Exit::Signal(9)).encode_into(seq, &mut most);
        }
        assert!(
            most.len() <= MAX_REPORT,
            "the most reports of a record fit in it"
        );
        let mut two = FromForker::Forked { pid: 1 }.encode(0);
        two.extend(FromForker::Forked { pid: 2 }.encode(1));
        assert!(
            FromForker::decode(&two).is_err(),
            "one forked report per record"
        );
        assert!(FromForker::decode(&[1, 2, 3]).is_err());
        assert!(FromForker::decode(&[]).is_err(), "no report");
        let mut cut = FromForker::Exited(Exit::Code(0)).encode(0);
        cut.extend(&FromForker::Exited(Exit::Code(0)).encode(1)[..5]);
        assert!(FromForker::decode(&cut).is_err(), "not whole frames");
        // A long message is cut, at a character boundary, to fit one report.
        let long = FromForker::ForkFailed("é".repeat(MAX_REPORT));
        match FromForker::decode(&long.encode(7)).as_deref() {
            Ok([(7, FromForker::ForkFailed(m))]) => {
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
