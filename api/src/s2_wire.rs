//! The wire format of the S2 writer protocol, as the official SDK's `out` writer speaks it (pure
//! code, no IO): the protobuf messages, the framing of `s2s/proto` append sessions, the JSON form
//! of REST appends and acks, S2's batch limits, and the conversion of a batch into the records
//! the pipeline writes.
//!
//! Framing of an append session (both directions): a 3-byte big-endian length (= 1 + body), one
//! flag byte (bit 7: terminal; bits 6–5: compression, only "none" is accepted), the body. A
//! client frame's body is an `AppendInput`; a server frame's body is an `AppendAck`, or for a
//! terminal frame a 2-byte big-endian HTTP status followed by a JSON error `{code, message}`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use shared::commands::WrittenRecord;
use shared::domain::headers::RecordHeaders;

/// Most records in one batch (S2's limit).
pub const MAX_BATCH_RECORDS: usize = 1_000;
/// Most metered bytes in one batch (S2's limit; see [`metered_bytes`]).
pub const MAX_BATCH_METERED_BYTES: usize = 1 << 20;
/// Largest frame of an append session, length prefix excluded.
pub const MAX_FRAME_BYTES: usize = 2 << 20;

const TERMINAL_FLAG: u8 = 0x80;
const COMPRESSION_BITS: u8 = 0x60;

#[derive(Clone, PartialEq, prost::Message)]
pub struct AppendInput {
    #[prost(message, repeated, tag = "1")]
    pub records: Vec<AppendRecord>,
    #[prost(uint64, optional, tag = "2")]
    pub match_seq_num: Option<u64>,
    #[prost(string, optional, tag = "3")]
    pub fencing_token: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AppendRecord {
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<Header>,
    #[prost(bytes = "vec", tag = "3")]
    pub body: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Header {
    #[prost(bytes = "vec", tag = "1")]
    pub name: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AppendAck {
    #[prost(message, optional, tag = "1")]
    pub start: Option<StreamPosition>,
    #[prost(message, optional, tag = "2")]
    pub end: Option<StreamPosition>,
    #[prost(message, optional, tag = "3")]
    pub tail: Option<StreamPosition>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamPosition {
    #[prost(uint64, tag = "1")]
    pub seq_num: u64,
    #[prost(uint64, tag = "2")]
    pub timestamp: u64,
}

/// A refusal in S2's shape: an HTTP status and `{code, message}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// `Retry-After` seconds of a 429.
    pub retry_after_seconds: Option<u64>,
}

impl WireError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_seconds: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "invalid", message)
    }

    /// The JSON body `{code, message}`.
    pub fn json(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "code": self.code, "message": self.message }))
            .unwrap_or_default()
    }

    /// The terminal frame that ends an append session with this error.
    pub fn terminal_frame(&self) -> Bytes {
        let mut body = Vec::with_capacity(2 + 64);
        body.extend_from_slice(&self.status.to_be_bytes());
        body.extend_from_slice(&self.json());
        frame(TERMINAL_FLAG, &body)
    }

    /// Whether the official client retries after it (S2's retryable statuses).
    pub fn is_retryable(&self) -> bool {
        matches!(self.status, 408 | 429 | 500 | 502 | 503 | 504)
    }
}

/// One frame: length prefix, flag, body.
pub fn frame(flag: u8, body: &[u8]) -> Bytes {
    let length = body.len() + 1;
    let mut out = BytesMut::with_capacity(length + 3);
    // Frames we write are far below 2^24 bytes (an ack, or a short error).
    out.put_uint(length as u64, 3);
    out.put_u8(flag);
    out.put_slice(body);
    out.freeze()
}

/// The frame of an ack.
pub fn ack_frame(ack: &AppendAck) -> Bytes {
    frame(0, &prost::Message::encode_to_vec(ack))
}

/// A frame the server sends in an append session, as a client reads it.
#[derive(Debug, PartialEq)]
pub enum ServerFrame {
    Ack(AppendAck),
    /// A terminal error: its HTTP status and JSON body.
    Terminal(u16, serde_json::Value),
}

/// Takes the next complete server frame off the front of `buffer` (a client's read buffer):
/// `None` until one is complete. For clients (the tests and the benchmark's load generator).
pub fn take_server_frame(buffer: &mut Vec<u8>) -> Result<Option<ServerFrame>, String> {
    if buffer.len() < 3 {
        return Ok(None);
    }
    let length =
        (usize::from(buffer[0]) << 16) | (usize::from(buffer[1]) << 8) | usize::from(buffer[2]);
    if length == 0 {
        return Err("a frame without its flag byte".into());
    }
    if buffer.len() < 3 + length {
        return Ok(None);
    }
    let frame: Vec<u8> = buffer.drain(..3 + length).skip(3).collect();
    let (flag, body) = (frame[0], &frame[1..]);
    if flag & TERMINAL_FLAG != 0 {
        if body.len() < 2 {
            return Err("a terminal frame without its status".into());
        }
        let status = u16::from_be_bytes([body[0], body[1]]);
        let error = serde_json::from_slice(&body[2..]).map_err(|error| error.to_string())?;
        return Ok(Some(ServerFrame::Terminal(status, error)));
    }
    prost::Message::decode(body)
        .map(|ack| Some(ServerFrame::Ack(ack)))
        .map_err(|error| error.to_string())
}

/// Splits the bytes of an append session's request body into frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: BytesMut,
}

impl FrameDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Whether a partial frame is buffered.
    pub fn has_partial_frame(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// The next complete frame's `AppendInput`, `None` until one is complete.
    pub fn next_input(&mut self) -> Result<Option<AppendInput>, WireError> {
        if self.buffer.len() < 3 {
            return Ok(None);
        }
        let length = (usize::from(self.buffer[0]) << 16)
            | (usize::from(self.buffer[1]) << 8)
            | usize::from(self.buffer[2]);
        if length == 0 {
            return Err(WireError::invalid("a frame must carry its flag byte"));
        }
        if length > MAX_FRAME_BYTES {
            return Err(WireError::new(
                413,
                "frame_too_large",
                format!("a frame may carry at most {MAX_FRAME_BYTES} bytes, not {length}"),
            ));
        }
        if self.buffer.len() < 3 + length {
            return Ok(None);
        }
        self.buffer.advance(3);
        let mut frame = self.buffer.split_to(length);
        let flag = frame[0];
        frame.advance(1);
        if flag & COMPRESSION_BITS != 0 {
            return Err(WireError::invalid(
                "compressed frames are not supported: send them uncompressed",
            ));
        }
        if flag & TERMINAL_FLAG != 0 {
            return Err(WireError::invalid("a client may not send a terminal frame"));
        }
        prost::Message::decode(frame.freeze())
            .map(Some)
            .map_err(|error| WireError::invalid(format!("not an AppendInput: {error}")))
    }
}

/// S2's metered size of a record: 8 + 2 per header + header bytes + body bytes.
pub fn metered_bytes(record: &AppendRecord) -> usize {
    8 + record
        .headers
        .iter()
        .map(|header| 2 + header.name.len() + header.value.len())
        .sum::<usize>()
        + record.body.len()
}

/// The records of a batch as the pipeline writes them, after S2's limits and this server's
/// rules: 1–1,000 records and at most 1 MiB metered; no `match_seq_num` or `fencing_token`
/// (the official client sends neither); header names, values and bodies are UTF-8 without NUL
/// (they are stored and served as text); the only command record is `trim` (8-byte big-endian
/// body). Client timestamps are ignored: the server stamps records when it writes them.
pub fn written_records(input: AppendInput) -> Result<Vec<WrittenRecord>, WireError> {
    if input.match_seq_num.is_some() || input.fencing_token.is_some() {
        return Err(WireError::invalid(
            "match_seq_num and fencing_token are not supported by this server",
        ));
    }
    if input.records.is_empty() || input.records.len() > MAX_BATCH_RECORDS {
        return Err(WireError::invalid(format!(
            "a batch carries 1–{MAX_BATCH_RECORDS} records, not {}",
            input.records.len()
        )));
    }
    let metered: usize = input.records.iter().map(metered_bytes).sum();
    if metered > MAX_BATCH_METERED_BYTES {
        return Err(WireError::new(
            413,
            "batch_too_large",
            format!("a batch may meter at most {MAX_BATCH_METERED_BYTES} bytes, not {metered}"),
        ));
    }
    input.records.into_iter().map(written_record).collect()
}

fn text(what: &str, bytes: Vec<u8>) -> Result<String, WireError> {
    let text = String::from_utf8(bytes)
        .map_err(|_| WireError::invalid(format!("{what} must be UTF-8 text on this server")))?;
    if text.contains('\0') {
        return Err(WireError::invalid(format!("{what} may not contain NUL")));
    }
    Ok(text)
}

fn written_record(record: AppendRecord) -> Result<WrittenRecord, WireError> {
    let is_command = record
        .headers
        .first()
        .is_some_and(|header| header.name.is_empty());
    if is_command {
        let command = &record.headers[0].value;
        if command.as_slice() != b"trim" {
            return Err(WireError::new(
                422,
                "unsupported_command",
                format!(
                    "command record {:?} is not supported by this server (only trim is)",
                    String::from_utf8_lossy(command)
                ),
            ));
        }
        let trim_to: [u8; 8] = record.body.as_slice().try_into().map_err(|_| {
            WireError::invalid("a trim record's body is its trim point: 8 bytes, big-endian")
        })?;
        return Ok(WrittenRecord::Trim {
            trim_to: u64::from_be_bytes(trim_to),
        });
    }
    let headers = record
        .headers
        .into_iter()
        .map(|header| {
            Ok((
                text("a header name", header.name)?,
                text("a header value", header.value)?,
            ))
        })
        .collect::<Result<RecordHeaders, WireError>>()?;
    Ok(WrittenRecord::Record {
        headers,
        body: text("a record body", record.body)?,
    })
}

/// A REST append's JSON body (`content-type: application/json`): string bodies and headers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonAppendInput {
    pub records: Vec<JsonAppendRecord>,
    #[serde(default)]
    pub match_seq_num: Option<u64>,
    #[serde(default)]
    pub fencing_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonAppendRecord {
    #[serde(default)]
    pub timestamp: Option<u64>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body: String,
}

impl From<JsonAppendInput> for AppendInput {
    fn from(input: JsonAppendInput) -> Self {
        AppendInput {
            records: input
                .records
                .into_iter()
                .map(|record| AppendRecord {
                    timestamp: record.timestamp,
                    headers: record
                        .headers
                        .into_iter()
                        .map(|(name, value)| Header {
                            name: name.into_bytes(),
                            value: value.into_bytes(),
                        })
                        .collect(),
                    body: record.body.into_bytes(),
                })
                .collect(),
            match_seq_num: input.match_seq_num,
            fencing_token: input.fencing_token,
        }
    }
}

/// An ack: records `start_seq..end_seq` written at `timestamp_ms`; the tail is `end_seq` (the
/// batch's records are the stream's last when it is acknowledged).
pub fn ack(start_seq: i64, end_seq: i64, timestamp_ms: i64) -> AppendAck {
    let position = |seq_num: i64| StreamPosition {
        seq_num: u64::try_from(seq_num).unwrap_or_default(),
        timestamp: u64::try_from(timestamp_ms).unwrap_or_default(),
    };
    AppendAck {
        start: Some(position(start_seq)),
        end: Some(position(end_seq)),
        tail: Some(position(end_seq)),
    }
}

#[derive(Serialize)]
struct JsonPosition {
    seq_num: u64,
    timestamp: u64,
}

/// The JSON form of an ack (REST appends with `content-type: application/json`).
pub fn ack_json(ack: &AppendAck) -> serde_json::Value {
    let position = |position: &Option<StreamPosition>| {
        let position = position.clone().unwrap_or_default();
        JsonPosition {
            seq_num: position.seq_num,
            timestamp: position.timestamp,
        }
    };
    serde_json::json!({
        "start": position(&ack.start),
        "end": position(&ack.end),
        "tail": position(&ack.tail),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn record(headers: &[(&[u8], &[u8])], body: &[u8]) -> AppendRecord {
        AppendRecord {
            timestamp: None,
            headers: headers
                .iter()
                .map(|(name, value)| Header {
                    name: name.to_vec(),
                    value: value.to_vec(),
                })
                .collect(),
            body: body.to_vec(),
        }
    }

    fn input(records: Vec<AppendRecord>) -> AppendInput {
        AppendInput {
            records,
            match_seq_num: None,
            fencing_token: None,
        }
    }

    #[test]
    fn decodes_frames_split_anywhere_and_back_to_back() {
        let first = input(vec![record(&[], b"{\"data\":\"a\",\"id\":\"x\"}")]);
        let second = input(vec![record(&[(b"trigger-control", b"turn-complete")], b"")]);
        let mut bytes = frame(0, &first.encode_to_vec()).to_vec();
        bytes.extend_from_slice(&frame(0, &second.encode_to_vec()));
        let mut decoder = FrameDecoder::default();
        let mut decoded = Vec::new();
        for byte in bytes {
            decoder.push(&[byte]);
            while let Some(input) = decoder.next_input().expect("valid frames") {
                decoded.push(input);
            }
        }
        assert_eq!(decoded, vec![first, second]);
        assert!(!decoder.has_partial_frame());
    }

    #[test]
    fn the_observed_client_frame_decodes() {
        // `00 00 4c 00 | 0a 49 1a 47 <71-byte body>`: one record with a 71-byte body.
        let body = vec![b'x'; 71];
        let mut bytes = vec![0x00, 0x00, 0x4c, 0x00, 0x0a, 0x49, 0x1a, 0x47];
        bytes.extend_from_slice(&body);
        let mut decoder = FrameDecoder::default();
        decoder.push(&bytes);
        let decoded = decoder.next_input().expect("valid").expect("complete");
        assert_eq!(decoded, input(vec![record(&[], &body)]));
    }

    #[test]
    fn refuses_compressed_terminal_and_oversized_frames() {
        for flag in [0x20, 0x40, 0x80] {
            let mut decoder = FrameDecoder::default();
            decoder.push(&frame(
                flag,
                &input(vec![record(&[], b"x")]).encode_to_vec(),
            ));
            assert_eq!(decoder.next_input().expect_err("refused").status, 422);
        }
        let mut decoder = FrameDecoder::default();
        decoder.push(&[0x20, 0x00, 0x01]);
        assert_eq!(decoder.next_input().expect_err("too large").status, 413);
    }

    #[test]
    fn acks_and_terminal_frames_have_the_observed_layout() {
        let encoded = ack_frame(&ack(1, 2, 1_765_000_000_000));
        // length 0x22 = 1 + 33 bytes of AppendAck (three 11-byte positions), flag 0, as observed.
        assert_eq!(&encoded[..6], &[0x00, 0x00, 0x22, 0x00, 0x0a, 0x09]);
        let decoded = AppendAck::decode(&encoded[4..]).expect("ack");
        assert_eq!(decoded.start.map(|p| p.seq_num), Some(1));
        assert_eq!(decoded.end.map(|p| p.seq_num), Some(2));
        assert_eq!(decoded.tail.map(|p| p.timestamp), Some(1_765_000_000_000));
        let terminal = WireError::new(503, "unavailable", "later").terminal_frame();
        assert_eq!(terminal[3], 0x80);
        assert_eq!(&terminal[4..6], &503_u16.to_be_bytes());
        let json: serde_json::Value = serde_json::from_slice(&terminal[6..]).expect("json");
        assert_eq!(json["code"], "unavailable");
        // What a client reads back, frame by frame, with the rest left in its buffer.
        let mut buffer = encoded.to_vec();
        buffer.extend_from_slice(&terminal);
        buffer.push(0);
        assert!(matches!(
            take_server_frame(&mut buffer),
            Ok(Some(ServerFrame::Ack(ack))) if ack.end.as_ref().map(|p| p.seq_num) == Some(2)
        ));
        assert!(matches!(
            take_server_frame(&mut buffer),
            Ok(Some(ServerFrame::Terminal(503, error))) if error["message"] == "later"
        ));
        assert_eq!(take_server_frame(&mut buffer), Ok(None));
        assert_eq!(buffer, vec![0]);
    }

    #[test]
    fn batches_keep_s2_limits_and_this_servers_text_rule() {
        let many = input((0..=MAX_BATCH_RECORDS).map(|_| record(&[], b"x")).collect());
        assert_eq!(written_records(many).expect_err("too many").status, 422);
        assert!(written_records(input(vec![])).is_err());
        let big = input(vec![record(&[], &vec![b'x'; MAX_BATCH_METERED_BYTES])]);
        assert_eq!(written_records(big).expect_err("too big").status, 413);
        assert!(written_records(input(vec![record(&[], &[0xff])])).is_err());
        assert!(written_records(input(vec![record(&[(b"a", b"\0")], b"x")])).is_err());
        let fenced = AppendInput {
            fencing_token: Some("f".into()),
            ..input(vec![record(&[], b"x")])
        };
        assert!(written_records(fenced).is_err());
        let fence = input(vec![record(&[(b"", b"fence")], b"")]);
        assert_eq!(
            written_records(fence).expect_err("unsupported").code,
            "unsupported_command"
        );
    }

    #[test]
    fn trim_records_carry_their_point_and_others_their_text() {
        let batch = input(vec![
            record(&[(b"trigger-control", b"turn-complete")], b""),
            record(&[(b"", b"trim")], &7_u64.to_be_bytes()),
            record(&[], b"{\"data\":1,\"id\":\"a\"}"),
        ]);
        assert_eq!(
            written_records(batch).expect("valid"),
            vec![
                WrittenRecord::Record {
                    headers: vec![("trigger-control".into(), "turn-complete".into())],
                    body: String::new(),
                },
                WrittenRecord::Trim { trim_to: 7 },
                WrittenRecord::Record {
                    headers: vec![],
                    body: "{\"data\":1,\"id\":\"a\"}".into(),
                },
            ]
        );
        let short_trim = input(vec![record(&[(b"", b"trim")], b"\x01")]);
        assert!(written_records(short_trim).is_err());
    }

    #[test]
    fn json_appends_and_acks_match_the_client() {
        let parsed: JsonAppendInput = serde_json::from_str(
            r#"{"records":[{"body":"","headers":[["trigger-control","turn-complete"]]}]}"#,
        )
        .expect("json");
        let records = written_records(parsed.into()).expect("valid");
        assert_eq!(records.len(), 1);
        let json = ack_json(&ack(3, 4, 9));
        assert_eq!(json["start"]["seq_num"], 3);
        assert_eq!(json["end"]["seq_num"], 4);
        assert_eq!(json["tail"]["timestamp"], 9);
    }
}
