//! What a WebSocket peer sends — binary frames and text messages — decodes
//! or is refused, never panics; a decoded header re-encodes to the same bytes.
#![no_main]

use ferry::protocol::ws::{ClientMessage, FRAME_HEADER_LEN, FrameHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match FrameHeader::decode(data) {
        Some((header, payload)) => {
            assert_eq!(header.encode()[..], data[..FRAME_HEADER_LEN]);
            assert_eq!(payload.len(), data.len() - FRAME_HEADER_LEN);
        }
        None => assert!(data.len() < FRAME_HEADER_LEN),
    }
    let _ = serde_json::from_slice::<ClientMessage>(data);
});
