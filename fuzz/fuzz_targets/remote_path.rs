//! Whatever a client sends as a path, an accepted `RemotePath` is canonical:
//! relative, no `.`/`..`/empty segment, no NUL or backslash, and it survives
//! a round trip through its URL form.
#![no_main]

use ferry::protocol::RemotePath;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &str| {
    for parsed in [RemotePath::parse(raw), RemotePath::from_url_path(raw)] {
        let Ok(path) = parsed else { continue };
        let text = path.as_str();
        assert!(!text.starts_with('/'), "{raw:?} → {text:?}");
        assert!(
            !text.contains('\0') && !text.contains('\\'),
            "{raw:?} → {text:?}"
        );
        if !path.is_root() {
            for segment in text.split('/') {
                assert!(!matches!(segment, "" | "." | ".."), "{raw:?} → {text:?}");
            }
        }
        assert_eq!(RemotePath::parse(text).as_ref(), Ok(&path));
        assert_eq!(
            RemotePath::from_url_path(&path.to_url_path()).as_ref(),
            Ok(&path)
        );
    }
});
