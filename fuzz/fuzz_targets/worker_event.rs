//! The realtime worker protocol decoder, `parse_event`, on arbitrary lines.
//!
//! Invariants: no panic; `Some` only for a JSON object whose `event` names the variant;
//! every field of the event is the JSON's (id, name, counts, message, output, times,
//! worker info); the JSON re-serialized (compact) decodes to the same event; the
//! decision does not change with surrounding whitespace.
#![no_main]

use libfuzzer_sys::fuzz_target;
use musetalk_sidecar::pipeline::worker::{Event, parse_event};
use serde_json::Value;

fn str_field(v: &Value, key: &str, got: Option<&str>, line: &str) {
    match got {
        Some(s) => assert_eq!(
            v.get(key).and_then(Value::as_str),
            Some(s),
            "`{key}` differs from the JSON: {line:?}"
        ),
        None => assert!(
            v.get(key).is_none_or(Value::is_null),
            "`{key}` dropped: {line:?}"
        ),
    }
}

fn u64_field(v: &Value, key: &str, got: Option<u64>, line: &str) {
    match got {
        Some(n) => assert_eq!(
            v.get(key).and_then(Value::as_u64),
            Some(n),
            "`{key}` differs from the JSON: {line:?}"
        ),
        None => assert!(
            v.get(key).is_none_or(Value::is_null),
            "`{key}` dropped: {line:?}"
        ),
    }
}

fn f64_field(v: &Value, key: &str, got: Option<f64>, line: &str) {
    match got {
        Some(x) => {
            assert!(x.is_finite(), "`{key}` is not finite: {line:?}");
            assert_eq!(
                v.get(key).and_then(Value::as_f64),
                Some(x),
                "`{key}` differs from the JSON: {line:?}"
            );
        }
        None => assert!(
            v.get(key).is_none_or(Value::is_null),
            "`{key}` dropped: {line:?}"
        ),
    }
}

fn check(line: &str) {
    let Some(ev) = parse_event(line) else {
        return;
    };
    let trimmed = line.trim();
    assert!(
        trimmed.starts_with('{'),
        "an event from a line that is not an object: {line:?}"
    );
    let v: Value = serde_json::from_str(trimmed)
        .unwrap_or_else(|e| panic!("parse_event accepted {line:?}, which is not JSON: {e}"));
    assert!(v.is_object(), "not an object: {line:?}");
    let tag = v
        .get("event")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("an event without a string `event`: {line:?}"));
    let expected = match &ev {
        Event::Ready {
            worker,
            load_seconds,
            protocol,
            capabilities,
        } => {
            assert_eq!(
                v.get("worker").unwrap_or(&Value::Null),
                worker,
                "`worker` differs: {line:?}"
            );
            f64_field(&v, "load_seconds", *load_seconds, line);
            u64_field(&v, "protocol", protocol.map(u64::from), line);
            let listed: Vec<&str> = v.get("capabilities").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            assert_eq!(listed, capabilities.iter().map(String::as_str).collect::<Vec<_>>(), "`capabilities` differ: {line:?}");
            "ready"
        }
        Event::FirstFrame { id, t } => {
            str_field(&v, "id", id.as_deref(), line);
            f64_field(&v, "t", *t, line);
            "first_frame"
        }
        Event::Batch { id, index, frames, seconds } => {
            str_field(&v, "id", id.as_deref(), line);
            u64_field(&v, "index", *index, line);
            u64_field(&v, "frames", *frames, line);
            f64_field(&v, "seconds", Some(*seconds), line);
            "batch"
        }
        Event::StageStart { id, name, t } | Event::StageEnd { id, name, t } => {
            str_field(&v, "id", id.as_deref(), line);
            str_field(&v, "name", Some(name), line);
            f64_field(&v, "t", *t, line);
            if matches!(ev, Event::StageStart { .. }) {
                "stage_start"
            } else {
                "stage_end"
            }
        }
        Event::Progress { id, done, total } => {
            str_field(&v, "id", id.as_deref(), line);
            u64_field(&v, "done", Some(*done), line);
            u64_field(&v, "total", *total, line);
            "progress"
        }
        Event::Result {
            id,
            output,
            frames,
            seconds,
        } => {
            str_field(&v, "id", id.as_deref(), line);
            str_field(&v, "output", output.as_deref(), line);
            u64_field(&v, "frames", *frames, line);
            f64_field(&v, "seconds", *seconds, line);
            "result"
        }
        Event::Error { id, message } => {
            str_field(&v, "id", id.as_deref(), line);
            str_field(&v, "message", Some(message), line);
            "error"
        }
    };
    assert_eq!(
        tag, expected,
        "`event` is {tag:?} but decoded as {ev:?}: {line:?}"
    );

    // Re-serialized, it is the same event.
    let again = serde_json::to_string(&v).expect("a Value serializes");
    assert_eq!(
        parse_event(&again).as_ref(),
        Some(&ev),
        "re-serialized {again:?} decodes differently (from {line:?})"
    );
    // Whitespace around a line does not matter.
    assert_eq!(
        parse_event(&format!(" \t{trimmed}\r\n")).as_ref(),
        Some(&ev),
        "surrounding whitespace changes the event: {line:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    match std::str::from_utf8(data) {
        Ok(s) => {
            check(s);
            // A worker's stdout is read line by line: each line alone as well.
            if s.contains('\n') {
                for l in s.lines() {
                    check(l);
                }
            }
        }
        Err(_) => check(&String::from_utf8_lossy(data)),
    }
});
