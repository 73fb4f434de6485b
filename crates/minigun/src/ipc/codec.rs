//! How values become payloads and back: the [`Codec`] trait for items (postcard by default),
//! a stage's codec bound to its item types ([`WireFns`]), and the encoding of the control
//! messages' own payloads (always postcard).

use serde::{de::DeserializeOwned, Serialize};
use std::any::{Any, TypeId};

/// How items are turned into frame payloads and back when they cross a process.
///
/// postcard ([`Postcard`]) is the default: a stable, documented, compact format with clean
/// errors on bad input. Choose another per stage with
/// [`StageRef::codec`](crate::StageRef::codec), for example a self-describing format for
/// types that postcard cannot represent (`#[serde(flatten)]`, untagged enums).
///
/// ```
/// use minigun::Codec;
/// use serde::{de::DeserializeOwned, Serialize};
/// /// JSON across the pipe.
/// struct Json;
/// impl Codec for Json {
///     fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
///         serde_json::to_writer(out, value).map_err(|e| e.to_string())
///     }
///     fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
///         serde_json::from_slice(bytes).map_err(|e| e.to_string())
///     }
/// }
/// ```
pub trait Codec: 'static {
    /// Appends the encoding of `value` to `out`. On error `out` may hold a partial encoding
    /// past its original length; the caller truncates it.
    fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String>;
    /// Decodes a value from a whole payload.
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String>;
}

/// postcard: a stable, documented, compact format with clean errors on bad input (the
/// default codec). A `Serialize` that fails with its own message (`Error::custom`) keeps its
/// words in the error, at any depth of the value, and so does the decoded type's own
/// `Deserialize` (postcard itself would say only "Serde Serialization Error").
#[derive(Debug, Clone, Copy, Default)]
pub struct Postcard;

impl Codec for Postcard {
    fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
        postcard::serialize_with_flavor(value, AppendTo(out)).map_err(|e| match e {
            postcard::Error::SerdeSerCustom => custom_encode_error(value),
            e => e.to_string(),
        })
    }
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        postcard::from_bytes(bytes).map_err(|e| match e {
            postcard::Error::SerdeDeCustom => custom_decode_error::<T>(bytes),
            e => e.to_string(),
        })
    }
}

// postcard's error keeps no text of a custom serde error (a `Serialize` or `Deserialize` that
// fails with `Error::custom("its own words")` reads "Serde Serialization Error"). After such a
// failure the value goes once more through a path whose error keeps the words; the hot path is
// untouched. Encoding: serde-value serialises the value into a tree, with its own error type at
// every depth. Decoding: postcard behind erased-serde, which keeps the words of the decoded
// type's own `Deserialize` (a type nested inside it loses them at postcard's boundary, and
// postcard's text stays).

/// The user's words of a custom error that failed `value`'s postcard encoding.
fn custom_encode_error<T: Serialize + ?Sized>(value: &T) -> String {
    match serde_value::to_value(value) {
        Err(serde_value::SerializerError::Custom(words)) => words,
        _ => postcard::Error::SerdeSerCustom.to_string(),
    }
}

/// The user's words of a custom error that failed decoding a `T` from `bytes`.
fn custom_decode_error<T: DeserializeOwned>(bytes: &[u8]) -> String {
    let mut de = postcard::Deserializer::from_bytes(bytes);
    let mut erased = <dyn erased_serde::Deserializer>::erase(&mut de);
    match erased_serde::deserialize::<T>(&mut erased) {
        Err(e) => e.to_string(),
        Ok(_) => postcard::Error::SerdeDeCustom.to_string(),
    }
}

/// postcard's output appended to a `Vec` in place (its `io::Write` path makes a `write_all`
/// call for every varint byte).
struct AppendTo<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendTo<'_> {
    type Output = ();
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }
    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

type Enc<T> = fn(&T, &mut Vec<u8>) -> Result<(), String>;
type Dec<T> = fn(&[u8]) -> Result<T, String>;

/// A stage's codec, bound to its item types (plain function pointers: no type parameter has
/// to travel through the executors).
pub(crate) struct WireFns<I, O> {
    pub(crate) encode_in: Enc<I>,
    pub(crate) decode_in: Dec<I>,
    pub(crate) encode_out: Enc<O>,
    pub(crate) decode_out: Dec<O>,
    /// The input is a `Vec<u8>` whose encoding is its bytes as they are (see
    /// [`raw_bytes`]): an item can be its own payload, taken with [`cast`], not copied.
    pub(crate) raw_in: bool,
}

impl<I, O> Clone for WireFns<I, O> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I, O> Copy for WireFns<I, O> {}

fn enc<C: Codec, T: Serialize + 'static>(v: &T, out: &mut Vec<u8>) -> Result<(), String> {
    if let Some(bytes) = raw_bytes::<C, T>(v) {
        out.extend_from_slice(bytes);
        return Ok(());
    }
    C::encode(v, out)
}
fn dec<C: Codec, T: DeserializeOwned + 'static>(b: &[u8]) -> Result<T, String> {
    if is_raw_bytes::<C, T>() {
        return Ok(cast(b.to_vec()).unwrap_or_else(|_| unreachable!("T is Vec<u8>")));
    }
    C::decode(b)
}

// `Vec<u8>` items under postcard: serde sees a sequence and postcard writes it one byte at a
// time. Every payload of a stage's codec travels behind a length (a frame's, a run item's, an
// answer's), so a byte vector needs no length of its own: its encoding is its bytes as they
// are, one copy, and a large input item is its own payload, not copied at all (the feeder
// takes its buffer: `cast`).

/// Whether `T` under codec `C` is a byte vector encoded as its bytes.
pub(crate) fn is_raw_bytes<C: 'static, T: 'static>() -> bool {
    TypeId::of::<C>() == TypeId::of::<Postcard>() && TypeId::of::<T>() == TypeId::of::<Vec<u8>>()
}

/// `v`'s bytes, if `T` under codec `C` is a byte vector encoded as its bytes.
fn raw_bytes<C: 'static, T: 'static>(v: &T) -> Option<&[u8]> {
    match is_raw_bytes::<C, T>() {
        true => (v as &dyn Any).downcast_ref::<Vec<u8>>().map(Vec::as_slice),
        false => None,
    }
}

/// `v` as a `U`, if `T` is `U` (or `v` back): moves a value between a generic type and the
/// one it is known to be, without copying it.
pub(crate) fn cast<T: 'static, U: 'static>(v: T) -> Result<U, T> {
    let mut slot = Some(v);
    if let Some(u) = (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        return Ok(u.take().expect("the value was just put there"));
    }
    Err(slot.take().expect("the value is still there"))
}

fn not_serialisable<T>(_: &T, _: &mut Vec<u8>) -> Result<(), String> {
    Err("this stage's input type is not serialisable".into())
}
fn not_deserialisable<T>(_: &[u8]) -> Result<T, String> {
    Err("this stage's input type is not serialisable".into())
}

impl<I: 'static, O: Serialize + DeserializeOwned + 'static> WireFns<I, O> {
    /// Outputs through `C`; the input never crosses (cow_fork with a non-serde input).
    pub(crate) fn outputs<C: Codec>() -> Self {
        WireFns {
            encode_in: not_serialisable::<I>,
            decode_in: not_deserialisable::<I>,
            encode_out: enc::<C, O>,
            decode_out: dec::<C, O>,
            raw_in: false,
        }
    }
}

impl<I: Serialize + DeserializeOwned + 'static, O: Serialize + DeserializeOwned + 'static>
    WireFns<I, O>
{
    /// Inputs and outputs through `C`.
    pub(crate) fn both<C: Codec>() -> Self {
        WireFns {
            encode_in: enc::<C, I>,
            decode_in: dec::<C, I>,
            encode_out: enc::<C, O>,
            decode_out: dec::<C, O>,
            raw_in: is_raw_bytes::<C, I>(),
        }
    }
}

/// Encodes a payload (appends to `out`).
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
    Postcard::encode(value, out)
}

/// Decodes a payload.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    Postcard::decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn byte_vectors_under_postcard_are_their_own_bytes() {
        let v: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let mut out = vec![7];
        enc::<Postcard, Vec<u8>>(&v, &mut out).unwrap();
        assert_eq!((out[0], &out[1..]), (7, &v[..]), "appended as they are");
        assert_eq!(dec::<Postcard, Vec<u8>>(&v).unwrap(), v);
        assert_eq!(dec::<Postcard, Vec<u8>>(&[]).unwrap(), Vec::<u8>::new());
        let wire = WireFns::<Vec<u8>, Vec<u8>>::both::<Postcard>();
        assert!(wire.raw_in);
        // Other types and codecs are untouched.
        assert!(raw_bytes::<Postcard, Vec<u16>>(&vec![1u16]).is_none());
        assert!(!is_raw_bytes::<crate::ipc::codec::tests::Other, Vec<u8>>());
        assert!(!WireFns::<Vec<u16>, Vec<u8>>::both::<Postcard>().raw_in);
        let mut out = Vec::new();
        enc::<Postcard, Vec<u16>>(&vec![1, 300], &mut out).unwrap();
        assert_eq!(out, postcard::to_allocvec(&vec![1u16, 300]).unwrap());
        // A cast moves the value itself, or gives it back.
        let ptr = v.as_ptr();
        let back: Vec<u8> = cast::<Vec<u8>, Vec<u8>>(v).unwrap();
        assert_eq!(back.as_ptr(), ptr, "not copied");
        let back = cast::<Vec<u8>, String>(back).unwrap_err();
        assert_eq!(back.as_ptr(), ptr);
    }

    struct Other;

    /// Fails to serialise, or to deserialise, with its own words.
    #[derive(Debug)]
    struct Picky;
    impl Serialize for Picky {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("picky will not be written"))
        }
    }
    impl<'de> Deserialize<'de> for Picky {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let n = u32::deserialize(d)?;
            Err(serde::de::Error::custom(format!("picky will not read {n}")))
        }
    }

    #[test]
    fn postcard_errors_keep_the_users_words() {
        let mut out = vec![9];
        let e = Postcard::decode::<Picky>(&[7]).unwrap_err();
        assert_eq!(e, "picky will not read 7");
        let e = Postcard::encode(&Picky, &mut out).unwrap_err();
        assert_eq!(e, "picky will not be written");
        let e = Postcard::encode(&(1u8, vec![Picky]), &mut out).unwrap_err();
        assert_eq!(e, "picky will not be written");
        // postcard's own errors keep postcard's text.
        let e = Postcard::decode::<u32>(&[]).unwrap_err();
        assert_eq!(e, postcard::Error::DeserializeUnexpectedEnd.to_string());
    }
}
