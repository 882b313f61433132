//! Structured multipart uploads: `arbitrary` picks the endpoint, optionally the endpoint's
//! required parts (as media), and a list of parts (name, file name, content type, bytes:
//! raw, a tiny real video, a WAV with arbitrary format fields or a lying header, a mutated
//! or truncated template, a number, text), encoded properly with a boundary that does not
//! occur in the data, so the fuzzer reaches deep into the field handling (duplicates,
//! unknown parts, limits, probing, job start and run).
//!
//! Invariants as `multipart_raw` (see `Harness::exercise`).
#![no_main]

use arbitrary::Arbitrary;
use fuzz_support::http::{SPEAK_AVATAR, TINY_MP4, TINY_WEBM, harness, wav};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Endpoint {
    Inference,
    Avatars,
    Speak,
}

#[derive(Arbitrary, Debug)]
enum Name {
    Video,
    Audio,
    AvatarId,
    BboxShift,
    BatchSize,
    Empty,
    /// No `name` parameter at all.
    Missing,
    Other(String),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Template {
    Mp4,
    Webm,
    Wav,
}

/// A media file: a real tiny one, a WAV with arbitrary format fields, or a broken template.
#[derive(Arbitrary, Debug)]
enum Media {
    Template(Template),
    Wav {
        rate: u16,
        channels: u8,
        bits: u8,
        samples: u16,
        declared: Option<u32>,
    },
    Mutated {
        base: Template,
        at: u16,
        byte: u8,
    },
    Truncated {
        base: Template,
        len: u16,
    },
}

#[derive(Arbitrary, Debug)]
enum Payload {
    Raw(Vec<u8>),
    Media(Media),
    Number(i64),
    Text(String),
}

/// The endpoint's required parts, first (so the fuzzer starts from uploads that get
/// through to probing and job start): `video` + `audio` for inference, `avatar_id` +
/// `video` for avatars, `audio` for speak.
#[derive(Arbitrary, Debug)]
struct Base {
    video: Media,
    audio: Media,
    /// `fz{n % 16}`: a few ids, so both fresh and existing avatars occur.
    avatar: u8,
}

#[derive(Arbitrary, Debug)]
struct Part {
    name: Name,
    filename: Option<String>,
    content_type: Option<String>,
    payload: Payload,
}

#[derive(Arbitrary, Debug)]
enum Ending {
    Proper,
    /// No closing `--boundary--`.
    Unterminated,
    /// Bytes after the closing boundary (the epilogue).
    Epilogue(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Upload {
    endpoint: Endpoint,
    base: Option<Base>,
    parts: Vec<Part>,
    ending: Ending,
}

fn template(t: Template) -> Vec<u8> {
    match t {
        Template::Mp4 => TINY_MP4.to_vec(),
        Template::Webm => TINY_WEBM.to_vec(),
        Template::Wav => wav(8000, 1, 8, 800, None),
    }
}

fn media(m: &Media) -> Vec<u8> {
    match m {
        Media::Template(t) => template(*t),
        Media::Wav {
            rate,
            channels,
            bits,
            samples,
            declared,
        } => wav(
            u32::from(*rate),
            u16::from(*channels % 9),
            u16::from(*bits % 33),
            usize::from(*samples % 2048),
            *declared,
        ),
        Media::Mutated { base, at, byte } => {
            let mut b = template(*base);
            let i = usize::from(*at) % b.len();
            b[i] = *byte;
            b
        }
        Media::Truncated { base, len } => {
            let mut b = template(*base);
            b.truncate(usize::from(*len) % (b.len() + 1));
            b
        }
    }
}

fn bytes(p: &Payload) -> Vec<u8> {
    match p {
        Payload::Raw(b) => b.clone(),
        Payload::Media(m) => media(m),
        Payload::Number(n) => n.to_string().into_bytes(),
        Payload::Text(s) => s.clone().into_bytes(),
    }
}

/// A header parameter value as browsers send it (HTML's multipart/form-data encoding).
fn quote(s: &str) -> String {
    s.replace('"', "%22")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn file_head(name: &str, filename: &str) -> String {
    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n")
}

fn encode(u: &Upload) -> (String, Vec<u8>) {
    let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(b) = &u.base {
        match u.endpoint {
            Endpoint::Inference => {
                parts.push((file_head("video", "face.mp4"), media(&b.video)));
                parts.push((file_head("audio", "speech.wav"), media(&b.audio)));
            }
            Endpoint::Avatars => {
                parts.push((
                    "Content-Disposition: form-data; name=\"avatar_id\"\r\n".into(),
                    format!("fz{}", b.avatar % 16).into_bytes(),
                ));
                parts.push((file_head("video", "face.webm"), media(&b.video)));
            }
            Endpoint::Speak => parts.push((file_head("audio", "clip.wav"), media(&b.audio))),
        }
    }
    parts.extend(u.parts.iter().map(|p| {
        let mut head = String::from("Content-Disposition: form-data");
        let name = match &p.name {
            Name::Video => Some("video"),
            Name::Audio => Some("audio"),
            Name::AvatarId => Some("avatar_id"),
            Name::BboxShift => Some("bbox_shift"),
            Name::BatchSize => Some("batch_size"),
            Name::Empty => Some(""),
            Name::Missing => None,
            Name::Other(s) => Some(s.as_str()),
        };
        if let Some(n) = name {
            head.push_str(&format!("; name=\"{}\"", quote(n)));
        }
        if let Some(f) = &p.filename {
            head.push_str(&format!("; filename=\"{}\"", quote(f)));
        }
        head.push_str("\r\n");
        if let Some(ct) = &p.content_type {
            head.push_str(&format!(
                "Content-Type: {}\r\n",
                ct.replace(['\r', '\n'], " ")
            ));
        }
        (head, bytes(&p.payload))
    }));
    let mut boundary = String::from("X");
    let mut n = 0u32;
    // The delimiter must not occur in any part's data.
    while parts
        .iter()
        .any(|(_, d)| contains(d, format!("--{boundary}").as_bytes()))
    {
        n += 1;
        boundary = format!("fuzz-boundary-{n}-q7Zx");
    }
    let mut body = Vec::new();
    for (head, data) in &parts {
        body.extend_from_slice(format!("--{boundary}\r\n{head}\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    match &u.ending {
        Ending::Proper => body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes()),
        Ending::Unterminated => {}
        Ending::Epilogue(e) => {
            body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
            body.extend_from_slice(e);
        }
    }
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fuzz_target!(|u: Upload| {
    let h = harness();
    let path = match u.endpoint {
        Endpoint::Inference => "/v1/inference".to_string(),
        Endpoint::Avatars => "/v1/avatars".to_string(),
        Endpoint::Speak if h.speak_ready => format!("/v1/avatars/{SPEAK_AVATAR}/speak"),
        Endpoint::Speak => return,
    };
    let (ct, body) = encode(&u);
    h.exercise(&path, &ct, body, &u);
});
