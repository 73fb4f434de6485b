//! A stage can choose the codec its items cross the pipe with. postcard (the default) cannot
//! represent an untagged enum; a self-describing codec (JSON here) can.
mod common;
use common::Sink;
use minigun::{Codec, Exec, FailureKind, Pipeline};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

struct Json;
impl Codec for Json {
    fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
        serde_json::to_writer(out, value).map_err(|e| e.to_string())
    }
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
enum Value {
    Number(u64),
    Text(String),
}

fn run(exec: Exec, json: bool) -> (Vec<Value>, minigun::RunReport) {
    let p = Pipeline::new("codec");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all(0..20u64).map_err(Into::into));
    let s = p.map("convert", |x: u64| {
        Ok(if x.is_multiple_of(2) {
            Value::Number(x)
        } else {
            Value::Text(format!("#{x}"))
        })
    });
    let s = if json { s.codec::<Json>() } else { s.wire() };
    s.executor(exec);
    p.map("back", |v: Value| Ok(v)).codec::<Json>().ipc_fork(2);
    p.consumer("sink", move |v: Value| {
        g.push(v);
        Ok(())
    });
    let report = p.run().unwrap();
    (got.sorted(), report)
}

#[test]
fn a_chosen_codec_carries_what_postcard_cannot() {
    let mut want: Vec<Value> = (0..20u64)
        .map(|x| {
            if x.is_multiple_of(2) {
                Value::Number(x)
            } else {
                Value::Text(format!("#{x}"))
            }
        })
        .collect();
    want.sort();
    for exec in [Exec::cow_fork(2), Exec::ipc_fork(2)] {
        let (got, report) = run(exec.clone(), true);
        assert_eq!(got, want, "{exec}: {report}");
        // The default codec cannot decode the untagged enum: each item fails, typed.
        let (got, report) = run(exec.clone(), false);
        assert!(got.is_empty(), "{exec}");
        let convert = report.stage("convert").unwrap();
        assert_eq!(convert.failed, 20, "{exec}: {report}");
        assert_eq!(
            report.failures[0].kind,
            FailureKind::Protocol,
            "{exec}: {report}"
        );
    }
}

// The feeder encodes small items into one buffer per hand-off and gives large ones a buffer
// each, switching as sizes change: every item still crosses whole, as itself, in order.
#[test]
fn items_of_mixed_sizes_cross_whole_and_in_order() {
    // Runs of small and of large items, then single large items among small ones.
    let size = |i: u64| -> usize {
        match i {
            0..300 => 1 + (i as usize % 7),
            300..400 => 40_000 + i as usize,
            400..700 => 3,
            _ if i.is_multiple_of(50) => 70_000,
            _ => 10,
        }
    };
    let item = move |i: u64| -> Vec<u8> { (0..size(i)).map(|k| (i as usize + k) as u8).collect() };
    for exec in [
        Exec::ipc_fork(2).ordered(),
        Exec::ipc_fork(3).ordered().batch_results(false),
    ] {
        let p = Pipeline::new("mixed-sizes");
        p.producer("gen", move |out| {
            out.emit_all((0..1000u64).map(item)).map_err(Into::into)
        });
        // Each result names its input by its bytes: length and checksum.
        p.map("measure", |v: Vec<u8>| {
            let sum = v.iter().map(|&b| b as u64).sum::<u64>();
            Ok((v.len(), sum))
        })
        .wire()
        .executor(exec);
        let got = Sink::default();
        let g = got.clone();
        p.consumer("collect", move |r: (usize, u64)| {
            g.push(r);
            Ok(())
        });
        let report = p.run().unwrap();
        assert_eq!(report.failures_total, 0, "{report}");
        let want: Vec<(usize, u64)> = (0..1000u64)
            .map(|i| {
                let v = item(i);
                (v.len(), v.iter().map(|&b| b as u64).sum())
            })
            .collect();
        assert!(
            *got.0.lock().unwrap() == want,
            "results differ from the inputs' measures"
        );
    }
}

/// A number that refuses to be written when it is 7, and to be read back when it is 5, in
/// its own words.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Touchy(u64);

impl Serialize for Touchy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == 7 {
            return Err(serde::ser::Error::custom("touchy 7 stays home"));
        }
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Touchy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u64::deserialize(d)? {
            5 => Err(serde::de::Error::custom("touchy 5 cannot be read back")),
            n => Ok(Touchy(n)),
        }
    }
}

/// The message of the failure of item `item`.
fn message_of(r: &minigun::RunReport, item: u64) -> String {
    let f = r.failures.iter().find(|f| f.item == Some(item));
    f.unwrap_or_else(|| panic!("item {item} failed: {r}"))
        .message
        .clone()
}

// A serialiser's own error message reaches the report in the user's words: encoding an input
// in the parent, decoding it in an ipc worker, encoding an output in a child (nested in a
// tuple).
#[test]
fn a_serialisers_own_words_are_kept() {
    let p = Pipeline::new("touchy-in");
    p.producer("gen", |out| {
        out.emit_all((0..10).map(Touchy)).map_err(Into::into)
    });
    p.map("read", |t: Touchy| Ok(t.0)).ipc_fork(2);
    let got = Sink::<u64>::default();
    got.consume(&p);
    let r = p.run().unwrap();
    assert_eq!(got.sorted(), vec![0, 1, 2, 3, 4, 6, 8, 9], "{r}");
    let m = message_of(&r, 7);
    assert!(m.contains("touchy 7 stays home"), "parent encode: {m}");
    let m = message_of(&r, 5);
    assert!(
        m.contains("touchy 5 cannot be read back"),
        "child decode: {m}"
    );

    for exec in [Exec::cow_fork(2), Exec::ipc_fork(2)] {
        let p = Pipeline::new("touchy-out");
        p.producer("gen", |out| out.emit_all(0..10u64).map_err(Into::into));
        p.map("write", |x: u64| Ok((x, vec![Touchy(x)])))
            .wire()
            .executor(exec);
        p.consumer("sink", |_: (u64, Vec<Touchy>)| Ok(()));
        let r = p.run().unwrap();
        let f = r.failures.iter().find(|f| f.item == Some(7)).unwrap();
        assert_eq!(f.kind, FailureKind::Encode, "{r}");
        assert!(
            f.message.contains("touchy 7 stays home"),
            "child encode: {f}"
        );
    }
}
