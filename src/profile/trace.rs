//! py-spy's Chrome-trace output read back as stack intervals, and what is made of them:
//! speedscope JSON, collapsed stacks, a flamegraph SVG, and the top functions of a window.
//!
//! py-spy is run with `--format chrometrace --idle`: every thread is sampled at every tick
//! and consecutive identical stacks are merged into `B`/`E` events with timestamps (µs
//! since py-spy started). That is the one py-spy format that keeps *when* a stack ran,
//! which slicing by stage needs; the other formats are derived from it here.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Event {
    ph: String,
    ts: f64,
    name: String,
    pid: u64,
    tid: u64,
    #[serde(default)]
    args: Option<Args>,
}

#[derive(Deserialize)]
struct Args {
    filename: Option<String>,
    line: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    pub name: String,
    /// Python source file; `None` for py-spy's `process N:"cmdline"` root frames.
    pub file: Option<String>,
    pub line: Option<u32>,
}

impl Frame {
    /// A Python function (not a process root frame).
    fn is_python(&self) -> bool {
        self.file.is_some()
    }

    /// `name (file:line)`, as py-spy's own collapsed output writes a frame.
    fn collapsed(&self) -> String {
        match (&self.file, self.line) {
            (Some(f), Some(l)) => format!("{} ({f}:{l})", self.name),
            (Some(f), None) => format!("{} ({f})", self.name),
            _ => self.name.clone(),
        }
    }
}

/// One stack held by one thread from `start_us` to `end_us`.
#[derive(Clone, Debug, PartialEq)]
pub struct Interval {
    pub thread: usize,
    pub start_us: f64,
    pub end_us: f64,
    /// Frame indexes, outermost first.
    pub stack: Vec<usize>,
}

/// A parsed profile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    pub frames: Vec<Frame>,
    /// `(pid, tid)` of each thread.
    pub threads: Vec<(u64, u64)>,
    /// In time order per thread.
    pub intervals: Vec<Interval>,
}

/// A function's share of a window: its time and its percent of the window's sampled time.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FunctionShare {
    pub function: String,
    /// The Python file, as py-spy shortens it (package-relative).
    pub file: String,
    pub seconds: f64,
    pub percent: f64,
}

/// What the profile says about one window (a stage).
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct WindowProfile {
    /// Thread-seconds sampled inside the window (every Python thread counts).
    pub sampled_seconds: f64,
    /// Python threads seen on average (sampled seconds / window seconds).
    pub threads: f64,
    /// Where the time was spent in the function itself (the innermost frame).
    pub top_self: Vec<FunctionShare>,
    /// Where the time was spent in the function or anything it called.
    pub top_total: Vec<FunctionShare>,
}

impl Trace {
    /// Parses py-spy's `--format chrometrace` file.
    pub fn parse(json: &[u8]) -> Result<Trace, String> {
        let events: Vec<Event> = serde_json::from_slice(json).map_err(|e| format!("py-spy's trace is not readable: {e}"))?;
        let mut t = Trace::default();
        let mut frame_ids: HashMap<Frame, usize> = HashMap::new();
        let mut thread_ids: HashMap<(u64, u64), usize> = HashMap::new();
        // Per thread: the open stack and when it took its current shape.
        let mut open: Vec<(Vec<usize>, f64)> = Vec::new();
        for e in events {
            let key = (e.pid, e.tid);
            let thread = *thread_ids.entry(key).or_insert_with(|| {
                t.threads.push(key);
                open.push((Vec::new(), e.ts));
                t.threads.len() - 1
            });
            let (stack, since) = &mut open[thread];
            if !stack.is_empty() && e.ts > *since {
                t.intervals.push(Interval { thread, start_us: *since, end_us: e.ts, stack: stack.clone() });
            }
            *since = e.ts;
            // py-spy's `process N:"cmdline"` root frames carry an empty file name and line 0.
            let frame = Frame {
                name: e.name,
                file: e.args.as_ref().and_then(|a| a.filename.clone()).filter(|f| !f.is_empty()),
                line: e.args.as_ref().and_then(|a| a.line).filter(|l| *l > 0),
            };
            match e.ph.as_str() {
                "B" => {
                    let next = frame_ids.len();
                    let id = *frame_ids.entry(frame.clone()).or_insert(next);
                    if id == t.frames.len() {
                        t.frames.push(frame);
                    }
                    stack.push(id);
                }
                "E" => {
                    // Ends the innermost frame of that name (and anything left open inside it).
                    if let Some(pos) = stack.iter().rposition(|&i| t.frames[i].name == frame.name) {
                        stack.truncate(pos);
                    }
                }
                _ => {}
            }
        }
        t.intervals.sort_by(|a, b| (a.thread, a.start_us).partial_cmp(&(b.thread, b.start_us)).unwrap_or(std::cmp::Ordering::Equal));
        Ok(t)
    }

    /// Thread-seconds sampled in all.
    pub fn sampled_seconds(&self) -> f64 {
        self.intervals.iter().map(|i| i.end_us - i.start_us).sum::<f64>() / 1e6
    }

    /// Samples taken at `rate_hz` (thread-samples), as py-spy counts them.
    pub fn samples(&self, rate_hz: u32) -> u64 {
        (self.sampled_seconds() * rate_hz as f64).round() as u64
    }

    /// Collapsed stacks (`frame;frame;frame count`), counts in samples at `rate_hz`:
    /// what `inferno` and most flamegraph tools read.
    pub fn collapsed(&self, rate_hz: u32) -> String {
        let mut weights: HashMap<String, f64> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        for i in &self.intervals {
            let key = i.stack.iter().map(|&f| self.frames[f].collapsed()).collect::<Vec<_>>().join(";");
            let w = weights.entry(key.clone()).or_insert_with(|| {
                order.push(key);
                0.0
            });
            *w += (i.end_us - i.start_us) / 1e6 * rate_hz as f64;
        }
        order.sort();
        let mut out = String::new();
        for k in order {
            let n = weights[&k].round().max(1.0) as u64;
            out.push_str(&format!("{k} {n}\n"));
        }
        out
    }

    /// A flamegraph (SVG) of the whole profile, from its [`collapsed`](Self::collapsed)
    /// stacks (made once for both files).
    pub fn flamegraph_svg(collapsed: &str, title: &str) -> Result<Vec<u8>, String> {
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = title.to_string();
        opts.count_name = "samples".into();
        let mut svg = Vec::new();
        inferno::flamegraph::from_lines(&mut opts, collapsed.lines(), &mut svg).map_err(|e| format!("flamegraph: {e}"))?;
        Ok(svg)
    }

    /// The profile in speedscope's file format: one evented profile per thread, with
    /// the frames' open and close times (speedscope.app opens it; so does its CLI).
    pub fn speedscope(&self, name: &str) -> serde_json::Value {
        let frames: Vec<serde_json::Value> = self
            .frames
            .iter()
            .map(|f| {
                let mut v = serde_json::json!({ "name": f.name });
                if let Some(file) = &f.file {
                    v["file"] = file.clone().into();
                }
                if let Some(line) = f.line {
                    v["line"] = line.into();
                }
                v
            })
            .collect();
        let mut profiles = Vec::new();
        // Intervals are sorted by thread: one pass over each thread's own run.
        for run in self.intervals.chunk_by(|a, b| a.thread == b.thread) {
            let (pid, tid) = self.threads[run[0].thread];
            let mut events = Vec::new();
            let mut held: Vec<usize> = Vec::new();
            let (mut first, mut last) = (None::<f64>, 0.0f64);
            let close_to = |held: &mut Vec<usize>, keep: usize, at: f64, events: &mut Vec<serde_json::Value>| {
                while held.len() > keep {
                    let f = held.pop().unwrap_or_default();
                    events.push(serde_json::json!({ "type": "C", "frame": f, "at": at }));
                }
            };
            for i in run {
                first.get_or_insert(i.start_us);
                // A gap (no samples) closes everything; otherwise keep the common prefix.
                let common = if i.start_us > last { 0 } else { held.iter().zip(&i.stack).take_while(|(a, b)| a == b).count() };
                close_to(&mut held, common, if i.start_us > last { last } else { i.start_us }, &mut events);
                for &f in &i.stack[common..] {
                    events.push(serde_json::json!({ "type": "O", "frame": f, "at": i.start_us }));
                    held.push(f);
                }
                last = i.end_us;
            }
            close_to(&mut held, 0, last, &mut events);
            let Some(start) = first else { continue };
            profiles.push(serde_json::json!({
                "type": "evented",
                "name": format!("pid {pid} thread {tid}"),
                "unit": "microseconds",
                "startValue": start,
                "endValue": last,
                "events": events,
            }));
        }
        serde_json::json!({
            "$schema": "https://www.speedscope.app/file-format-schema.json",
            "name": name,
            "exporter": concat!("musetalk-sidecar ", env!("CARGO_PKG_VERSION"), " (from py-spy)"),
            "activeProfileIndex": 0,
            "shared": { "frames": frames },
            "profiles": profiles,
        })
    }

    /// The `top` functions by own and by total time within `[from_us, to_us]`, in
    /// percent of the Python time sampled there. A stack interval counts for the part of
    /// it inside the window (py-spy merges equal samples, so the error at each edge is
    /// at most one sample interval).
    pub fn window(&self, from_us: f64, to_us: f64, top: usize) -> WindowProfile {
        // Functions are keyed by (name, file): every line of a function is one function.
        let mut index: HashMap<(&str, &str), usize> = HashMap::new();
        let mut names: Vec<(&str, &str)> = Vec::new();
        let func: Vec<usize> = self
            .frames
            .iter()
            .map(|fr| {
                let pair = (fr.name.as_str(), fr.file.as_deref().unwrap_or(""));
                *index.entry(pair).or_insert_with(|| {
                    names.push(pair);
                    names.len() - 1
                })
            })
            .collect();
        let mut own: HashMap<usize, f64> = HashMap::new();
        let mut total: HashMap<usize, f64> = HashMap::new();
        let mut sampled = 0.0;
        for i in &self.intervals {
            let overlap = (i.end_us.min(to_us) - i.start_us.max(from_us)).max(0.0);
            if overlap <= 0.0 {
                continue;
            }
            sampled += overlap;
            let python: Vec<usize> = i.stack.iter().copied().filter(|&f| self.frames[f].is_python()).map(|f| func[f]).collect();
            if let Some(&leaf) = python.last() {
                *own.entry(leaf).or_default() += overlap;
            }
            // Recursion counts a function once per stack.
            let mut seen: Vec<usize> = Vec::with_capacity(python.len());
            for k in python {
                if !seen.contains(&k) {
                    seen.push(k);
                    *total.entry(k).or_default() += overlap;
                }
            }
        }
        let rank = |m: HashMap<usize, f64>| -> Vec<FunctionShare> {
            let mut v: Vec<(usize, f64)> = m.into_iter().collect();
            // Equal times: by name, so the order is stable.
            v.sort_by(|a, b| b.1.total_cmp(&a.1).then(names[a.0].cmp(&names[b.0])));
            v.into_iter()
                .take(top)
                .map(|(ix, us)| FunctionShare {
                    function: names[ix].0.to_string(),
                    file: names[ix].1.to_string(),
                    seconds: us / 1e6,
                    percent: if sampled > 0.0 { us / sampled * 100.0 } else { 0.0 },
                })
                .collect()
        };
        let window = (to_us - from_us).max(0.0);
        WindowProfile {
            sampled_seconds: sampled / 1e6,
            threads: if window > 0.0 { sampled / window } else { 0.0 },
            top_self: rank(own),
            top_total: rank(total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What py-spy writes for: a process root, `<module>` → `main` → `stage_a` for 300 ms,
    /// then `main` → `stage_b` → `helper` for 200 ms, on one thread; and a second thread
    /// in `worker_loop` from 100 to 400 ms.
    fn sample() -> Vec<u8> {
        let ev = |ph: &str, ts: u64, name: &str, tid: u64, file: Option<(&str, u32)>| {
            let mut e = serde_json::json!({"ph": ph, "ts": ts, "name": name, "pid": 7, "tid": tid, "cat": "py-spy"});
            if let Some((f, l)) = file {
                e["args"] = serde_json::json!({"filename": f, "line": l});
            }
            e
        };
        serde_json::to_vec(&serde_json::json!([
            ev("B", 0, "process 7:\"python x.py\"", 1, None),
            ev("B", 0, "<module>", 1, Some(("x.py", 10))),
            ev("B", 0, "main", 1, Some(("x.py", 8))),
            ev("B", 0, "stage_a", 1, Some(("x.py", 4))),
            ev("B", 100_000, "worker_loop", 2, Some(("w.py", 3))),
            ev("E", 300_000, "stage_a", 1, Some(("x.py", 4))),
            ev("B", 300_000, "stage_b", 1, Some(("x.py", 6))),
            ev("B", 300_000, "helper", 1, Some(("y.py", 2))),
            ev("E", 400_000, "worker_loop", 2, Some(("w.py", 3))),
            ev("E", 500_000, "helper", 1, Some(("y.py", 2))),
            ev("E", 500_000, "stage_b", 1, Some(("x.py", 6))),
            ev("E", 500_000, "main", 1, Some(("x.py", 8))),
            ev("E", 500_000, "<module>", 1, Some(("x.py", 10))),
            ev("E", 500_000, "process 7:\"python x.py\"", 1, None),
        ]))
        .unwrap()
    }

    #[test]
    fn intervals_follow_the_stacks() {
        let t = Trace::parse(&sample()).unwrap();
        assert_eq!(t.threads, vec![(7, 1), (7, 2)]);
        let spans: Vec<(usize, f64, f64, usize)> = t.intervals.iter().map(|i| (i.thread, i.start_us, i.end_us, i.stack.len())).collect();
        assert_eq!(spans, vec![(0, 0.0, 300_000.0, 4), (0, 300_000.0, 500_000.0, 5), (1, 100_000.0, 400_000.0, 1)]);
        assert!((t.sampled_seconds() - 0.8).abs() < 1e-9);
        assert_eq!(t.samples(100), 80);
    }

    #[test]
    fn a_window_ranks_functions_by_own_and_total_time() {
        let t = Trace::parse(&sample()).unwrap();
        // 200–500 ms: thread 1 spends 100 ms in stage_a, 200 ms in helper (under stage_b);
        // thread 2 spends 200 ms in worker_loop. 500 ms of Python in a 300 ms window.
        let w = t.window(200_000.0, 500_000.0, 3);
        assert!((w.sampled_seconds - 0.5).abs() < 1e-9);
        assert!((w.threads - 5.0 / 3.0).abs() < 1e-9);
        let own: Vec<(&str, f64)> = w.top_self.iter().map(|f| (f.function.as_str(), f.percent.round())).collect();
        assert_eq!(own, vec![("helper", 40.0), ("worker_loop", 40.0), ("stage_a", 20.0)]);
        let total: Vec<(&str, f64)> = w.top_total.iter().map(|f| (f.function.as_str(), f.percent.round())).collect();
        // <module> and main hold thread 1's 300 ms; the process root frame is not a function.
        assert_eq!(total, vec![("<module>", 60.0), ("main", 60.0), ("helper", 40.0)]);
        assert_eq!(w.top_self[0].file, "y.py");
        // A window with nothing in it.
        assert_eq!(t.window(600_000.0, 700_000.0, 3).top_self, vec![]);
    }

    #[test]
    fn collapsed_stacks_count_samples() {
        let t = Trace::parse(&sample()).unwrap();
        let c = t.collapsed(100);
        assert!(c.contains("process 7:\"python x.py\";<module> (x.py:10);main (x.py:8);stage_a (x.py:4) 30\n"), "{c}");
        assert!(c.contains(";stage_b (x.py:6);helper (y.py:2) 20\n"), "{c}");
        assert!(c.contains("worker_loop (w.py:3) 30\n"), "{c}");
        let svg = String::from_utf8(Trace::flamegraph_svg(&t.collapsed(100), "job").unwrap()).unwrap();
        assert!(svg.starts_with("<?xml") && svg.contains("stage_a") && svg.contains("</svg>"), "{svg}");
    }

    #[test]
    fn speedscope_events_open_and_close_in_order() {
        let t = Trace::parse(&sample()).unwrap();
        let s = t.speedscope("job");
        assert_eq!(s["$schema"], "https://www.speedscope.app/file-format-schema.json");
        let p = &s["profiles"][0];
        assert_eq!(p["type"], "evented");
        let ev: Vec<(String, u64, f64)> = p["events"].as_array().unwrap().iter().map(|e| (e["type"].as_str().unwrap().to_string(), e["frame"].as_u64().unwrap(), e["at"].as_f64().unwrap())).collect();
        let frames = s["shared"]["frames"].as_array().unwrap();
        let name = |i: u64| frames[i as usize]["name"].as_str().unwrap().to_string();
        let named: Vec<(String, String, f64)> = ev.iter().map(|(t, f, at)| (t.clone(), name(*f), *at)).collect();
        assert_eq!(named[3], ("O".into(), "stage_a".into(), 0.0));
        assert_eq!(named[4], ("C".into(), "stage_a".into(), 300_000.0));
        assert_eq!(named[5], ("O".into(), "stage_b".into(), 300_000.0));
        assert_eq!(named.last().unwrap(), &("C".into(), "process 7:\"python x.py\"".into(), 500_000.0));
        // Every open is closed.
        assert_eq!(ev.iter().filter(|e| e.0 == "O").count(), ev.iter().filter(|e| e.0 == "C").count());
        assert_eq!(s["profiles"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Trace::parse(b"{not json").is_err());
        assert!(Trace::parse(b"[]").unwrap().intervals.is_empty());
        // An end without a begin, a begin never ended: tolerated.
        let odd = br#"[{"ph":"E","ts":5,"name":"x","pid":1,"tid":1},{"ph":"B","ts":6,"name":"y","pid":1,"tid":1}]"#;
        let t = Trace::parse(odd).unwrap();
        assert!(t.intervals.is_empty());
        assert_eq!(t.speedscope("x")["profiles"].as_array().unwrap().len(), 0);
    }
}
