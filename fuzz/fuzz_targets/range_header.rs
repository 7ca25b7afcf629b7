//! Any `Range` header against any size resolves to a range inside the object,
//! the whole object, or "unsatisfiable" — never a panic or an out-of-bounds range.
#![no_main]

use ferry::protocol::RangeRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, u64)| {
    let (header, size) = input;
    match RangeRequest::resolve(Some(header), size) {
        RangeRequest::Partial(range) => {
            assert!(range.start <= range.end, "{header:?} {size}: {range:?}");
            assert!(range.end < size, "{header:?} {size}: {range:?}");
            assert_eq!(range.len(), range.end - range.start + 1);
            let _ = range.content_range(size);
        }
        RangeRequest::Full | RangeRequest::Unsatisfiable => {}
    }
});
