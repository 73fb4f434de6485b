//! The key layout of a run (see the crate docs).

use minigun::remote::broker::StageRun;

/// The keys of one run of one stage. The hash tag `{<pipeline>:<run>}` keeps them in one
/// cluster slot; the announcements stream is per pipeline (`{<pipeline>}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// Work stream, consumer group `mg`.
    pub work: String,
    /// Out stream, consumer group `parent`.
    pub out: String,
    /// Dead-letter stream.
    pub dlq: String,
    /// Control hash.
    pub ctl: String,
    /// Worker table.
    pub workers: String,
    /// The pipeline's announcements stream.
    pub runs: String,
}

/// A name made safe inside a hash tag: `{` and `}` would end the tag early, and `:` would
/// make two names read as one, so each is written as `%` and its hex code (and `%` too).
fn tagged(name: &str) -> String {
    let mut s = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '{' | '}' | ':' | '%' => s.push_str(&format!("%{:02X}", c as u32)),
            c => s.push(c),
        }
    }
    s
}

impl Keys {
    /// The keys of `run` under `namespace`.
    pub fn new(namespace: &str, run: &StageRun) -> Keys {
        let base = format!(
            "{namespace}:{{{}:{}}}:{}",
            tagged(&run.pipeline),
            tagged(&run.run),
            tagged(&run.stage)
        );
        Keys {
            work: format!("{base}:in"),
            out: format!("{base}:out"),
            dlq: format!("{base}:dlq"),
            ctl: format!("{base}:ctl"),
            workers: format!("{base}:workers"),
            runs: runs_key(namespace, &run.pipeline),
        }
    }

    /// Every key of the run itself (not the pipeline's announcements).
    pub fn run_keys(&self) -> [&str; 5] {
        [&self.work, &self.out, &self.dlq, &self.ctl, &self.workers]
    }
}

/// The announcements stream of `pipeline`.
pub(crate) fn runs_key(namespace: &str, pipeline: &str) -> String {
    format!("{namespace}:{{{}}}:runs", tagged(pipeline))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_s_keys_share_one_hash_tag_and_names_cannot_break_it() {
        let run = StageRun {
            pipeline: "p{x}".into(),
            run: "r:1".into(),
            stage: "etl/map".into(),
        };
        let k = Keys::new("mg", &run);
        assert_eq!(k.work, "mg:{p%7Bx%7D:r%3A1}:etl/map:in");
        assert_eq!(k.runs, "mg:{p%7Bx%7D}:runs");
        for key in k.run_keys() {
            assert!(key.starts_with("mg:{p%7Bx%7D:r%3A1}:"), "{key}");
        }
    }
}
