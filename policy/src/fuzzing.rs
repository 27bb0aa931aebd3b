//! Fuzz bodies: run by `cargo fuzz` (`policy/fuzz/`) and, over random inputs, by the unit tests.

use crate::Policy;

/// Parses arbitrary bytes as a policy. Never panics; when it parses, checks that the policy
/// reloads onto itself with no change, and when it fails, that every diagnostic renders and
/// points inside the text.
pub fn parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Policy::parse(&text, "fuzz.toml") {
        Ok(p) => {
            let changes = Policy::diff(&p, &p).expect("reloading a policy onto itself is safe");
            assert!(changes.is_empty(), "self-diff not empty: {changes:?}");
        }
        Err(e) => {
            assert!(!e.diagnostics.is_empty(), "an error with no diagnostic");
            for d in &e.diagnostics {
                assert!(
                    d.span.start <= text.len() && d.line >= 1 && d.column >= 1,
                    "{d:?}"
                );
            }
            let _ = e.render();
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    const EXAMPLES: [&str; 2] = [
        include_str!("../examples/two-guests-one-disk.toml"),
        include_str!("../examples/net-and-disk.toml"),
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn arbitrary_text(s in "\\PC{0,200}") {
            super::parse(s.as_bytes());
        }

        #[test]
        fn toml_like_text(s in "(\\[\\[?(device|guest|guest\\.net|guest\\.disk|restart)\\]\\]?\n|(name|kind|size|image|device|offset|length|mac|share|link|wire|read_only|ips) = (\"[a-z0-9:. /-]{0,12}\"|[0-9]{1,4}|true|\\[\"10.0.0.1\"\\])\n){0,30}") {
            super::parse(s.as_bytes());
        }

        #[test]
        fn mutated_examples(which in 0usize..2, cuts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
            let mut bytes = EXAMPLES[which].as_bytes().to_vec();
            for (at, b) in cuts {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            super::parse(&bytes);
        }
    }
}
