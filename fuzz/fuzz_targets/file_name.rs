//! The package file-name validator (`validate::is_valid_file_name`): a name it accepts is used
//! as a file name by consumers that unpack a package, so it must be one harmless path component.
//!
//! Properties of every accepted name: 1..=255 bytes of `[A-Za-z0-9._-]`, first byte a letter or
//! digit; no `/`, `\`, NUL, `..`, whitespace or control character; not `.` or `..`; exactly one
//! normal component when read as a path; still accepted after ASCII lower-casing (names are
//! compared case-insensitively for duplicates). And the validator agrees with a straightforward
//! restatement of the rule.
#![no_main]

use std::path::{Component, Path};

use kubbi::http::validate::is_valid_file_name;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let owned;
    let name = match std::str::from_utf8(data) {
        Ok(s) => s,
        Err(_) => {
            owned = String::from_utf8_lossy(data).into_owned();
            &owned
        }
    };
    let ok = is_valid_file_name(name);

    let expected = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
        && !name.as_bytes().windows(2).any(|w| w == b"..");
    assert_eq!(ok, expected, "{name:?}");

    if ok {
        for bad in ['/', '\\', '\0', ':'] {
            assert!(!name.contains(bad), "{name:?}");
        }
        assert!(!name.contains(".."), "{name:?}");
        assert!(!name.starts_with('.') && !name.starts_with('-'), "{name:?}");
        assert!(
            !name.chars().any(|c| c.is_whitespace() || c.is_control()),
            "{name:?}"
        );
        assert!(name.is_ascii());
        let mut components = Path::new(name).components();
        assert_eq!(
            components.next(),
            Some(Component::Normal(name.as_ref())),
            "{name:?}"
        );
        assert_eq!(components.next(), None, "{name:?}");
        assert!(is_valid_file_name(&name.to_ascii_lowercase()));
        assert!(is_valid_file_name(&name.to_ascii_uppercase()));
    }
});
