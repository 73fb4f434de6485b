//! Any byte stream, delivered in any chunk size, must decode to frames or a typed error:
//! never a panic, an endless loop or an allocation sized by a hostile length prefix.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&chunk, rest)) = data.split_first() {
        minigun::fuzzing::decode_frames(rest, chunk as usize + 1, 1 << 16);
    }
});
