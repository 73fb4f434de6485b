//! Any byte stream, delivered in any chunk size, must decode to typed messages or a typed
//! error: a frame of any kind with any payload never panics the parent or a worker.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&chunk, rest)) = data.split_first() {
        minigun::fuzzing::decode_messages(rest, chunk as usize + 1, 1 << 16);
    }
});
