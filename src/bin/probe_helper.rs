//! `musetalk-probe-helper`: the persistent media probe. Reads one JSON request a line on
//! stdin, answers one JSON line on stdout, with FFmpeg's libraries in-process, so the
//! service pays no process start per file (docs/probe-helper.md).
//!
//! It does what the ffprobe invocations it replaces do, step for step (FFmpeg 5.1's
//! fftools/ffprobe.c): open with `scan_all_pmts`, find the stream info, bind a decoder to
//! every stream (one that does not open fails the file, as ffprobe exits 1), select with
//! the same stream specifier, read the same interval, decode and flush the same way, and
//! report FFmpeg's error-level log lines as ffprobe's `-v error` stderr. The service reads
//! its answers with the rules it applies to ffprobe's (src/pipeline/media.rs).
//!
//! A separate binary, not a role of the service's: the service itself links no FFmpeg
//! library, so it runs (with ffprobe) where they are missing, and a crash in a decoder
//! takes down only this process, which the service replaces.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io::{BufRead, Write};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Mutex;

use ffmpeg_next as ff;
use ff::ffi;
use ff::util::mathematics::rescale::Rescale;
use musetalk_sidecar::pipeline::media::{Probe, ProbeFormat, ProbeStream, SideData, span_of};
use musetalk_sidecar::pipeline::prober::{PROTOCOL, Query, Ready, Reply, Request};

/// FFmpeg's error-level messages since the request began, as ffprobe would print them.
struct Log {
    text: String,
    /// av_log_format_line2's "start of a line" state, kept across calls as FFmpeg's own
    /// callback keeps it (one message may come in several calls).
    print_prefix: c_int,
}

static LOG: Mutex<Log> = Mutex::new(Log { text: String::new(), print_prefix: 1 });
/// A hostile file can log without end; what is kept of it is bounded.
const MAX_LOG: usize = 64 * 1024;

/// How bindgen spells a `va_list` parameter here (an array type decays to a pointer on x86_64).
#[cfg(target_arch = "x86_64")]
type VaList = *mut ffi::__va_list_tag;
#[cfg(not(target_arch = "x86_64"))]
type VaList = ffi::va_list;

/// Decoder threads log too, hence the lock.
unsafe extern "C" fn capture(avcl: *mut c_void, level: c_int, fmt: *const c_char, vl: VaList) {
    if level > ffi::AV_LOG_ERROR {
        return;
    }
    let mut log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    let mut line = [0 as c_char; 1024];
    let mut prefix = log.print_prefix;
    // SAFETY: `line` is writable for its length, `vl` is the caller's argument list, used once.
    unsafe { ffi::av_log_format_line2(avcl, level, fmt, vl, line.as_mut_ptr(), line.len() as c_int, &mut prefix) };
    log.print_prefix = prefix;
    // SAFETY: av_log_format_line2 NUL-terminates within the buffer.
    let text = unsafe { CStr::from_ptr(line.as_ptr()) }.to_string_lossy();
    if log.text.len() + text.len() <= MAX_LOG {
        log.text.push_str(&text);
    }
}

fn take_log() -> String {
    let mut log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    log.print_prefix = 1;
    std::mem::take(&mut log.text)
}

/// av_strerror's words for an FFmpeg error code, as ffprobe prints them.
fn strerror(e: ff::Error) -> String {
    let mut buf = [0 as c_char; 128];
    // SAFETY: the buffer is writable for its length and NUL-terminated by av_strerror.
    unsafe {
        if ffi::av_strerror(c_int::from(e), buf.as_mut_ptr(), buf.len()) < 0 {
            return e.to_string();
        }
        CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
    }
}

fn main() {
    if std::env::args().nth(1).is_some_and(|a| a == "--version" || a == "-V") {
        println!("{} {}", env!("CARGO_BIN_NAME"), env!("CARGO_PKG_VERSION"));
        return;
    }
    if ff::init().is_err() {
        std::process::exit(1);
    }
    // SAFETY: set once, before any other thread uses FFmpeg.
    unsafe {
        ffi::av_log_set_level(ffi::AV_LOG_ERROR);
        ffi::av_log_set_callback(Some(capture));
    }
    // The protocol gets its own descriptor and fd 1 becomes stderr: whatever a library
    // prints can never be read as an answer.
    // SAFETY: dup/dup2 on the process's own standard descriptors, before any other thread.
    let proto = unsafe {
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            std::process::exit(1);
        }
        std::fs::File::from_raw_fd(fd)
    };
    let mut out = std::io::BufWriter::new(proto);
    let v = ff::format::version();
    let ready = Ready { protocol: PROTOCOL, ffmpeg: format!("libavformat {}.{}.{}", v >> 16, (v >> 8) & 0xff, v & 0xff) };
    if writeln!(out, "{}", serde_json::to_string(&ready).expect("serializes")).and_then(|_| out.flush()).is_err() {
        return;
    }
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { return };
        take_log();
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let r = std::panic::catch_unwind(|| answer(&req.path, req.query)).unwrap_or_else(|_| Reply { ok: false, errors: "the probe helper failed on this file (a panic)\n".into(), ..Reply::default() });
                Reply { id: req.id, ..r }
            }
            Err(e) => Reply { ok: false, errors: format!("not a request: {e}\n"), ..Reply::default() },
        };
        if writeln!(out, "{}", serde_json::to_string(&reply).expect("serializes")).and_then(|_| out.flush()).is_err() {
            return;
        }
    }
}

/// How far [`read`] goes: ffprobe's `-read_intervals`.
#[derive(Clone, Copy)]
enum Interval {
    /// To the end.
    All,
    /// `%+#N`: N packets of the selected streams.
    Packets(u64),
    /// `%+S`: S seconds (in AV_TIME_BASE units) from the first timestamp.
    Span(i64),
}

fn failed(extra: String) -> Reply {
    Reply { ok: false, errors: take_log() + &extra, ..Reply::default() }
}

/// One request, as ffprobe's probe_file would run it.
fn answer(path: &Path, query: Query) -> Reply {
    let mut opts = ff::Dictionary::new();
    opts.set("scan_all_pmts", "1");
    // Local files only: a playlist or concat list in an upload must not fetch anything.
    opts.set("protocol_whitelist", "file");
    let url = format!("file:{}", path.display());
    let mut ictx = match ff::format::input_with_dictionary(&url, opts) {
        Ok(c) => c,
        Err(e) => return failed(format!("{}: {}\n", path.display(), strerror(e))),
    };
    let n = ictx.nb_streams() as usize;
    // A decoder bound to each stream, as ffprobe binds them.
    let mut decoders: Vec<Option<ff::decoder::Opened>> = Vec::with_capacity(n);
    let mut time_bases = Vec::with_capacity(n);
    for st in ictx.streams() {
        time_bases.push(st.time_base());
        let par = st.parameters();
        if par.id() == ff::codec::Id::PROBE {
            decoders.push(None);
            continue;
        }
        let Some(codec) = ff::decoder::find(par.id()) else {
            decoders.push(None);
            continue;
        };
        let opened = ff::codec::Context::from_parameters(par).and_then(|ctx| {
            let mut dec = ctx.decoder();
            dec.set_packet_time_base(st.time_base());
            dec.open_as(codec)
        });
        match opened {
            Ok(d) => decoders.push(Some(d)),
            Err(e) => return failed(format!("Could not open codec for input stream {}: {}\n", st.index(), strerror(e))),
        }
    }
    let selected: Vec<bool> = match query.stream() {
        None => vec![true; n],
        Some(spec) => {
            let spec = CString::new(spec).expect("no NUL");
            (0..n)
                .map(|i| {
                    // SAFETY: `i` < nb_streams; the context and stream outlive the call.
                    unsafe {
                        let st = *(*ictx.as_ptr()).streams.add(i);
                        let m = ffi::avformat_match_stream_specifier(ictx.as_mut_ptr(), st, spec.as_ptr()) > 0;
                        if !m {
                            (*st).discard = ffi::AVDiscard::AVDISCARD_ALL;
                        }
                        m
                    }
                })
                .collect()
        }
    };
    let (mut decoded, mut span) = (0, None);
    match query {
        Query::Headers => {}
        Query::Decode { video } => {
            let interval = if video { Interval::Packets(10) } else { Interval::Span(2 * i64::from(ffi::AV_TIME_BASE)) };
            decoded = read(&mut ictx, &selected, &time_bases, interval, Some(&mut decoders), None);
        }
        Query::Packets { .. } => {
            let mut packets = Vec::new();
            read(&mut ictx, &selected, &time_bases, Interval::All, None, Some(&mut packets));
            span = span_of(packets);
        }
    }
    // Streams that appeared while reading were not selected (ffprobe's sizes them in unselected).
    let streams = ictx.streams().filter(|st| selected.get(st.index()).copied().unwrap_or(false)).map(|st| stream_facts(&st)).collect();
    let format = ProbeFormat {
        format_name: Some(ictx.format().name().to_string()),
        // SAFETY: a field read of the open context.
        duration: Some(unsafe { (*ictx.as_ptr()).duration }).filter(|d| *d != ffi::AV_NOPTS_VALUE).map(|d| format!("{:.6}", secs(d, ff::rescale::TIME_BASE))),
    };
    drop(decoders);
    drop(ictx);
    Reply { id: 0, ok: true, probe: Probe { streams, format: Some(format), frames: Vec::new() }, decoded, span, errors: take_log() }
}

/// ffprobe's read_interval_packets: the selected streams' packets over `interval`, each
/// decoded (`decoders`) or its timing kept (`packets`), then the decoders drained.
/// Returns the frames decoded.
fn read(ictx: &mut ff::format::context::Input, selected: &[bool], time_bases: &[ff::Rational], interval: Interval, mut decoders: Option<&mut Vec<Option<ff::decoder::Opened>>>, mut packets: Option<&mut Vec<(f64, f64)>>) -> usize {
    // SAFETY: a field read of the open context.
    let mut cur_ts = unsafe { (*ictx.as_ptr()).start_time };
    let (mut start, mut end, mut count, mut decoded) = (None, None, 0u64, 0usize);
    // SAFETY: an empty frame is what receive_frame fills.
    let mut frame = unsafe { ff::frame::Frame::empty() };
    loop {
        let mut pkt = ff::Packet::empty();
        if pkt.read(ictx).is_err() {
            break;
        }
        let idx = pkt.stream();
        // Streams that appear mid-file were not selected.
        if !selected.get(idx).copied().unwrap_or(false) {
            continue;
        }
        let tb = time_bases[idx];
        if let Some(pts) = pkt.pts() {
            cur_ts = pts.rescale(tb, ff::rescale::TIME_BASE);
        }
        if start.is_none() && cur_ts != ffi::AV_NOPTS_VALUE {
            start = Some(cur_ts);
        }
        match interval {
            Interval::All => {}
            Interval::Packets(n) if count >= n => break,
            Interval::Packets(_) => {}
            Interval::Span(s) => {
                if let (Some(st), None) = (start, end) {
                    end = Some(st.saturating_add(s));
                }
                if end.is_some_and(|e| cur_ts != ffi::AV_NOPTS_VALUE && cur_ts >= e) {
                    break;
                }
            }
        }
        count += 1;
        if let Some(out) = packets.as_deref_mut()
            && let Some(pts) = pkt.pts()
        {
            out.push((secs(pts, tb), secs(pkt.duration(), tb)));
        }
        if let Some(Some(dec)) = decoders.as_deref_mut().and_then(|d| d.get_mut(idx)) {
            decoded += decode(dec, &pkt, &mut frame);
        }
    }
    // The frames still held in the decoders (frame threads, B-frame delay).
    if let Some(decs) = decoders {
        for (i, dec) in decs.iter_mut().enumerate() {
            if let Some(dec) = dec
                && selected.get(i).copied().unwrap_or(false)
                && dec.send_eof().is_ok()
            {
                while dec.receive_frame(&mut frame).is_ok() {
                    decoded += 1;
                }
            }
        }
    }
    decoded
}

/// ffprobe's process_frame loop for one packet: send it (again while the decoder is full),
/// take every frame it gives; an error ends the packet, not the file.
fn decode(dec: &mut ff::decoder::Opened, pkt: &ff::Packet, frame: &mut ff::frame::Frame) -> usize {
    let again = |e: &ff::Error| matches!(e, ff::Error::Other { errno } if *errno == libc::EAGAIN);
    let (mut frames, mut pending) = (0, true);
    loop {
        if pending {
            match dec.send_packet(pkt) {
                Ok(()) | Err(ff::Error::Eof) => pending = false,
                Err(e) if again(&e) => {}
                Err(_) => return frames,
            }
        }
        let got = match dec.receive_frame(frame) {
            Ok(()) => true,
            Err(e) if again(&e) || e == ff::Error::Eof => false,
            Err(_) => return frames,
        };
        if got {
            frames += 1;
        }
        if !(got || pending) {
            return frames;
        }
    }
}

/// One stream's entries, as ffprobe's show_stream prints them.
fn stream_facts(st: &ff::format::stream::Stream) -> ProbeStream {
    let par = st.parameters();
    // SAFETY: reads of the stream's codec parameters, which live as long as the context.
    let (kind, id, width, height) = unsafe {
        let p = &*par.as_ptr();
        (p.codec_type, p.codec_id, p.width, p.height)
    };
    // SAFETY: both return static strings or NULL.
    let name = |s: *const c_char| (!s.is_null()).then(|| unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned());
    let codec_type = name(unsafe { ffi::av_get_media_type_string(kind) }).unwrap_or_else(|| "unknown".into());
    let desc = unsafe { ffi::avcodec_descriptor_get(id) };
    let codec_name = if desc.is_null() { None } else { name(unsafe { (*desc).name }) }.unwrap_or_else(|| "unknown".into());
    let video = kind == ffi::AVMediaType::AVMEDIA_TYPE_VIDEO;
    let q = |r: ff::Rational| format!("{}/{}", r.numerator(), r.denominator());
    let tb = st.time_base();
    let side_data_list = st
        .side_data()
        .filter(|sd| sd.kind() == ff::codec::packet::side_data::Type::DisplayMatrix && sd.data().len() >= 36)
        .filter_map(|sd| {
            // SAFETY: 9 int32s checked above; av_display_rotation_get reads exactly those.
            let r = unsafe { ffi::av_display_rotation_get(sd.data().as_ptr().cast()) };
            // ffprobe prints it with print_int: truncated toward zero.
            r.is_finite().then(|| SideData { rotation: Some(r.trunc()) })
        })
        .collect();
    ProbeStream {
        codec_type: Some(codec_type),
        codec_name: Some(codec_name),
        width: video.then_some(width.max(0) as u32),
        height: video.then_some(height.max(0) as u32),
        avg_frame_rate: Some(q(st.avg_frame_rate())),
        r_frame_rate: Some(q(st.rate())),
        nb_frames: (st.frames() != 0).then(|| st.frames().to_string()),
        duration: (st.duration() != ffi::AV_NOPTS_VALUE).then(|| format!("{:.6}", secs(st.duration(), tb))),
        side_data_list,
    }
}

/// A timestamp in `tb` units, in seconds (ffprobe's print_time).
fn secs(v: i64, tb: ff::Rational) -> f64 {
    v as f64 * f64::from(tb.numerator()) / f64::from(tb.denominator())
}
