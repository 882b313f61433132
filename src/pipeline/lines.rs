//! Splits a child's byte stream into lines on `\n` *and* `\r` (tqdm redraws its bar with `\r`).
//!
//! Lines are bounded: a child that prints megabytes without a newline costs at most
//! [`MAX_LINE`] bytes of memory; the rest of such a line is dropped.

/// Longest line kept, in bytes.
pub const MAX_LINE: usize = 8 * 1024;

#[derive(Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// Set while discarding the tail of an over-long line.
    overflow: bool,
}

impl LineSplitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the complete lines (lossy UTF-8, empty lines skipped).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' || b == b'\r' {
                self.flush_into(&mut out);
                self.overflow = false;
            } else if self.overflow {
                // Dropping the rest of an over-long line.
            } else if self.buf.len() < MAX_LINE {
                self.buf.push(b);
            } else {
                // Emit what we have now; drop the rest of this line.
                self.flush_into(&mut out);
                self.overflow = true;
            }
        }
        out
    }

    /// The last unterminated line, at end of stream.
    pub fn finish(&mut self) -> Option<String> {
        let mut out = Vec::new();
        self.flush_into(&mut out);
        out.pop()
    }

    fn flush_into(&mut self, out: &mut Vec<String>) {
        if !self.buf.is_empty() {
            let mut line = String::from_utf8_lossy(&self.buf).trim_end().to_string();
            // Lossy decoding turns each invalid byte into a 3-byte U+FFFD: re-bound the
            // line (at a char boundary) so MAX_LINE holds for what callers see (found by fuzzing).
            if line.len() > MAX_LINE {
                let mut end = MAX_LINE;
                while !line.is_char_boundary(end) {
                    end -= 1;
                }
                line.truncate(end);
                // The cut may land after a space: keep "no trailing whitespace" true.
                line.truncate(line.trim_end().len());
            }
            if !line.is_empty() {
                out.push(line);
            }
            self.buf.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_newline_and_carriage_return_across_chunks() {
        let mut s = LineSplitter::new();
        assert_eq!(s.push(b"Starting infer"), Vec::<String>::new());
        assert_eq!(s.push(b"ence\n 10%|#  | 1/10\r 20%|## | 2/10\r\n"), vec!["Starting inference", " 10%|#  | 1/10", " 20%|## | 2/10"]);
        assert_eq!(s.push(b"tail"), Vec::<String>::new());
        assert_eq!(s.finish().as_deref(), Some("tail"));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn bounds_long_lines_and_survives_invalid_utf8() {
        let mut s = LineSplitter::new();
        let long = vec![b'x'; MAX_LINE * 3];
        let lines = s.push(&long);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(s.push(b"\nnext\n"), vec!["next"]);
        assert_eq!(s.push(b"\xff\xfe ok\n"), vec!["\u{fffd}\u{fffd} ok"]);
        // A line of invalid bytes grows 3× when decoded; it is still bounded.
        let invalid = vec![0xffu8; MAX_LINE];
        let lines = s.push(&[&invalid[..], b"\n"].concat());
        assert!(lines[0].len() <= MAX_LINE, "{}", lines[0].len());
        // A cut that lands after a space leaves no trailing whitespace (fuzz regression).
        let mut cut = vec![0xffu8; 2730];
        cut.extend_from_slice(b"x yyy\n");
        let lines = s.push(&cut);
        assert!(lines[0].len() <= MAX_LINE && !lines[0].ends_with(' '), "{:?}", &lines[0][lines[0].len() - 4..]);
    }
}
