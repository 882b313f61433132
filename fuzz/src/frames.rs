//! The `stage_parser` input format: a child's stdout and stderr as the chunks a pipe
//! read would return, with the chunk boundaries (and the stream) chosen by the input.
//!
//! ```text
//! input := frame*
//! frame := ctl len byte{len+1}      (the last frame may be short)
//! ctl   : bit 0   stream (0 stdout, 1 stderr)
//!         bits 4..7 all set: feed the chunk 2^(bits 1..3) times (1..128), to reach lines
//!                 longer than MAX_LINE from a small input (rare on purpose: it is slow)
//! len   : chunk length - 1 (1..=256 bytes)
//! ```
//!
//! `gen_seeds.py` writes seeds in this format from plain log text.

/// Most bytes fed per input (repeats included), so one input stays fast.
pub const MAX_FED: usize = 20 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Stdout,
    Stderr,
}

/// One pipe read.
#[derive(Debug)]
pub struct Chunk<'a> {
    pub stream: Which,
    pub bytes: &'a [u8],
    pub repeat: usize,
}

/// Decodes the frames; stops at [`MAX_FED`] bytes in total.
pub fn decode(data: &[u8]) -> Vec<Chunk<'_>> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut fed = 0usize;
    while i < data.len() {
        let ctl = data[i];
        i += 1;
        let len = match data.get(i) {
            Some(&l) => l as usize + 1,
            None => break,
        };
        i += 1;
        let end = (i + len).min(data.len());
        let bytes = &data[i..end];
        i = end;
        let stream = if ctl & 1 == 0 {
            Which::Stdout
        } else {
            Which::Stderr
        };
        let mut repeat = if ctl >= 0xF0 {
            1usize << ((ctl >> 1) & 7)
        } else {
            1
        };
        if bytes.is_empty() {
            continue;
        }
        let room = MAX_FED.saturating_sub(fed) / bytes.len();
        repeat = repeat.min(room);
        if repeat == 0 {
            break;
        }
        fed += repeat * bytes.len();
        out.push(Chunk {
            stream,
            bytes,
            repeat,
        });
    }
    out
}

/// The inverse of [`decode`] without repeats: frames `bytes` of one stream into
/// chunks of at most `chunk` bytes (used to write seeds).
pub fn encode(stream: Which, bytes: &[u8], chunk: usize) -> Vec<u8> {
    let chunk = chunk.clamp(1, 256);
    let mut out = Vec::new();
    for c in bytes.chunks(chunk) {
        out.push(if stream == Which::Stdout { 0 } else { 1 });
        out.push((c.len() - 1) as u8);
        out.extend_from_slice(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let e = encode(Which::Stderr, b"hello\rworld\n", 5);
        let d = decode(&e);
        assert_eq!(d.len(), 3);
        assert!(d.iter().all(|c| c.stream == Which::Stderr && c.repeat == 1));
        assert_eq!(
            d.iter()
                .flat_map(|c| c.bytes.iter().copied())
                .collect::<Vec<_>>(),
            b"hello\rworld\n"
        );
        let r = decode(&[0xFE, 0, b'x']);
        assert_eq!(
            (r[0].stream, r[0].repeat, r[0].bytes),
            (Which::Stdout, 128, &b"x"[..])
        );
    }
}
