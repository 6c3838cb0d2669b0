//! A minimal SSE reader over a streaming `reqwest` response, for tests.

use std::time::Duration;

use serde_json::Value;

/// One server-sent event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// One record of an `event: batch`, with its body envelope unpacked.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamedRecord {
    pub seq_num: i64,
    pub timestamp: i64,
    pub data: String,
    pub part_id: String,
}

pub struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event; `None` when the stream ended; `Err` after `wait` without one.
    pub async fn next_event(&mut self, wait: Duration) -> Result<Option<SseEvent>, &'static str> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    event: "message".into(),
                    ..SseEvent::default()
                };
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        event.event = value.trim().to_owned();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        if !event.data.is_empty() {
                            event.data.push('\n');
                        }
                        event
                            .data
                            .push_str(value.strip_prefix(' ').unwrap_or(value));
                    } else if let Some(value) = line.strip_prefix("id:") {
                        event.id = Some(value.trim().to_owned());
                    }
                }
                return Ok(Some(event));
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .map_err(|_| "no event in time")?
                .map_err(|_| "stream failed")?;
            match chunk {
                Some(bytes) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                None => return Ok(None),
            }
        }
    }

    /// Collects batch records until `count` arrived (pings are skipped).
    pub async fn records(&mut self, count: usize, wait: Duration) -> Vec<StreamedRecord> {
        let mut records = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while records.len() < count {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Ok(Some(event)) if event.event == "batch" => {
                    records.extend(parse_batch(&event.data))
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        records
    }
}

/// Unpacks `{"records":[{seq_num,timestamp,body}]}` where `body` = `{"data","id"}` as a string.
pub fn parse_batch(data: &str) -> Vec<StreamedRecord> {
    let batch: Value = serde_json::from_str(data).unwrap_or_default();
    batch["records"]
        .as_array()
        .map(|records| {
            records
                .iter()
                .map(|record| {
                    let body: Value = serde_json::from_str(record["body"].as_str().unwrap_or(""))
                        .unwrap_or_default();
                    StreamedRecord {
                        seq_num: record["seq_num"].as_i64().unwrap_or(-1),
                        timestamp: record["timestamp"].as_i64().unwrap_or(0),
                        data: body["data"].as_str().unwrap_or("").to_owned(),
                        part_id: body["id"].as_str().unwrap_or("").to_owned(),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}
