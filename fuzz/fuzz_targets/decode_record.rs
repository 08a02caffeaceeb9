//! Fuzzes frame decoding and the event payload codec: `decode_frame` on the bytes
//! at a frame's start, then `decode_event` on what it vouches for, and
//! `decode_event` on the raw input too (a payload with a valid CRC is still
//! untrusted input to the codec).
#![no_main]

use auditwal::wal::format::{
    decode_frame, encode_frame, FrameOutcome, RecordKind, FRAME_ALIGN, FRAME_HEADER_LEN,
};
use auditwal::wal::payload::{decode_event, encode_event};
use libfuzzer_sys::fuzz_target;

/// A payload that decodes must mean the same event once re-encoded and decoded
/// (bytes may differ: the codec does not insist on minimal varints).
fn check_payload(payload: &[u8]) {
    if let Ok(first) = decode_event(payload) {
        let mut again = Vec::new();
        encode_event(&first.event, first.sample_rate, &mut again)
            .expect("a decoded event re-encodes");
        let second = decode_event(&again).expect("a re-encoded event decodes");
        assert_eq!(first, second);
    }
}

fuzz_target!(|data: &[u8]| {
    if let FrameOutcome::Record { record, frame_len } = decode_frame(data) {
        assert!(frame_len <= data.len() && frame_len % FRAME_ALIGN == 0);
        let body = FRAME_HEADER_LEN + record.payload.len();
        assert_eq!(record.payload, &data[FRAME_HEADER_LEN..body]);
        let mut buf = vec![0u8; frame_len];
        let n = encode_frame(&mut buf, record.lsn, record.kind, record.payload)
            .expect("a decoded frame re-encodes");
        assert_eq!(n, frame_len);
        assert_eq!(
            &buf[..body],
            &data[..body],
            "header and payload re-encode identically"
        );
        if record.kind == RecordKind::Event {
            check_payload(record.payload);
        }
    }
    check_payload(data);
});
