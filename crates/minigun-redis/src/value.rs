//! Reading the server's replies: stream entries with binary fields, as [`redis::Value`]s.

use minigun::remote::broker::BrokerResult;
use minigun::remote::BrokerError;
use redis::Value;

/// A stream entry: its id and its fields (`None`: the entry was deleted while pending).
pub(crate) type Entry = (String, Option<Vec<(Vec<u8>, Vec<u8>)>>);

fn other(what: &str, v: &Value) -> BrokerError {
    BrokerError::Other(format!("unexpected reply for {what}: {v:?}"))
}

/// The bytes of a string or integer reply.
pub(crate) fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.clone().into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

/// [`bytes`] of a reply that is no longer needed (a bulk string is moved, not copied).
fn owned_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        v => bytes(&v),
    }
}

/// A string reply as text (ids, names).
pub(crate) fn text(v: &Value) -> Option<String> {
    bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A number reply, or a string holding one.
pub(crate) fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        v => text(v)?.trim().parse().ok(),
    }
}

/// The items of an array reply (nil: none).
pub(crate) fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => Vec::new(),
    }
}

/// A flat list of field, value, field, value…
pub(crate) fn pairs(v: Value) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let list: Vec<Value> = match v {
        Value::Nil => return None,
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        v => items(v),
    };
    let mut out = Vec::with_capacity(list.len() / 2);
    let mut it = list.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((owned_bytes(k)?, owned_bytes(v)?));
    }
    Some(out)
}

/// One entry `[id, [field, value, …]]`.
pub(crate) fn entry(v: Value) -> BrokerResult<Entry> {
    let id = match &v {
        Value::Array(a) | Value::Set(a) => a.first().and_then(text),
        _ => None,
    };
    let Some(id) = id else {
        return Err(BrokerError::Other(format!(
            "unexpected stream entry: {v:?}"
        )));
    };
    Ok((id, items(v).into_iter().nth(1).and_then(pairs)))
}

/// The entries of one stream in an XREAD or XREADGROUP reply (nil when the block timed out).
pub(crate) fn read_reply(v: Value) -> BrokerResult<Vec<Entry>> {
    let streams: Vec<Value> = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(m) => m.into_iter().map(|(_, v)| v).collect(),
        Value::Array(a) => a
            .into_iter()
            .map(|s| items(s).into_iter().nth(1).unwrap_or(Value::Nil))
            .collect(),
        v => return Err(other("a stream read", &v)),
    };
    let mut out = Vec::new();
    for s in streams {
        for e in items(s) {
            out.push(entry(e)?);
        }
    }
    Ok(out)
}

/// The entries of an XRANGE reply.
pub(crate) fn range_reply(v: Value) -> BrokerResult<Vec<Entry>> {
    items(v).into_iter().map(entry).collect()
}

/// A field's value.
pub(crate) fn field<'a>(fields: &'a [(Vec<u8>, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| k == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

/// A field's value as a number.
pub(crate) fn field_number(fields: &[(Vec<u8>, Vec<u8>)], name: &str) -> Option<u64> {
    std::str::from_utf8(field(fields, name)?).ok()?.parse().ok()
}

/// A field's value as text.
pub(crate) fn field_text(fields: &[(Vec<u8>, Vec<u8>)], name: &str) -> Option<String> {
    field(fields, name).map(|b| String::from_utf8_lossy(b).into_owned())
}

/// Whether `id` is a stream entry id (`<ms>-<seq>`): anything else cannot be held by anyone,
/// and the server would answer it with an error rather than "not pending".
pub(crate) fn is_entry_id(id: &str) -> bool {
    let mut parts = id.splitn(2, '-');
    let digits =
        |s: Option<&str>| s.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    digits(parts.next()) && digits(parts.next())
}

/// The two numbers of a stream entry id (`<ms>-<seq>`), which order ids as the server does.
pub(crate) fn entry_id_parts(id: &str) -> Option<(u64, u64)> {
    if !is_entry_id(id) {
        return None;
    }
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The value of `name:` in an INFO reply.
pub(crate) fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_are_recognised() {
        assert!(is_entry_id("1733500000000-0"));
        assert!(!is_entry_id("12"));
        assert!(!is_entry_id("1-"));
        assert!(!is_entry_id("a-1"));
        assert!(!is_entry_id("1-2-3"));
        assert_eq!(entry_id_parts("17-2"), Some((17, 2)));
        assert_eq!(entry_id_parts("99999999999999999999-0"), None);
        assert!(entry_id_parts("9-10") > entry_id_parts("9-9"));
    }

    #[test]
    fn binary_fields_survive_parsing() {
        let v = Value::Array(vec![
            Value::BulkString(b"1-1".to_vec()),
            Value::Array(vec![
                Value::BulkString(b"p".to_vec()),
                Value::BulkString(vec![0xff, 0, 0xfe]),
            ]),
        ]);
        let (id, fields) = entry(v).expect("entry");
        assert_eq!(id, "1-1");
        let fields = fields.expect("fields");
        assert_eq!(field(&fields, "p"), Some(&[0xff, 0, 0xfe][..]));
    }

    #[test]
    fn info_fields_are_read_by_name() {
        let info = "# Server\r\nrun_id:abc\r\nmaxmemory_policy:noeviction\r\n";
        assert_eq!(info_field(info, "run_id").as_deref(), Some("abc"));
        assert_eq!(
            info_field(info, "maxmemory_policy").as_deref(),
            Some("noeviction")
        );
        assert_eq!(info_field(info, "run"), None);
    }
}
