//! A short mutation fuzz of the LIDC pickle reader on the stable toolchain, so that every
//! CI run keeps checking what `fuzz/fuzz_targets/lidc_pickle.rs` checks under libFuzzer:
//! no input makes the reader panic, ask for more than 256 MiB at once, or take over 2 s.
//!
//! It has no coverage feedback: it mutates the committed seeds in `fuzz/seeds/lidc_pickle`,
//! and an input joins the pool when the readers make something new of it (see
//! [`Outcome::signature`]), so mutations stack on new structure rather than new data.
//! Runs are deterministic for a seed. Environment: `PROBUNET_FUZZ_SECONDS` (default 60),
//! `PROBUNET_FUZZ_SEED` (default 0x5eed, decimal or 0x-hex), `PROBUNET_FUZZ_EXECS` (a cap
//! on executions) and `PROBUNET_FUZZ_KEEP_CURRENT` (see [`fuzz_lidc_pickle`]).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use probunet::data::lidc::{parse_lidc, DEFAULT_MASK_COUNT};
use probunet::data::pickle::{self, Pickle, Value};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

/// The largest single allocation an input may cause, as `-malloc_limit_mb=256` in fuzz/README.
const MAX_ALLOC: usize = 256 << 20;
/// Requests above this are refused (the process aborts) rather than risking the machine.
const REFUSED_ALLOC: usize = 1 << 30;
/// Slower than this is a finding; inputs are at most [`MAX_INPUT`] bytes.
const SLOW: Duration = Duration::from_secs(2);
/// An input still running after this never returns to the loop: the watchdog reports it.
const HANG: Duration = Duration::from_secs(10);
const MAX_INPUT: usize = 64 << 10;
/// Most inputs in the pool, seeds included; beyond it, new ones replace earlier finds.
const POOL_CAP: usize = 2048;
/// Most outcome signatures remembered (8 bytes each); past it the pool stops growing.
const MAX_SIGNATURES: usize = 1 << 20;

thread_local! {
    /// Largest single request on this thread since the last reset: per thread, because the
    /// tests of this binary run in parallel and only the thread running an input matters.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// `System`, recording the largest request (an allocator must not panic, so the check is
/// made after each input) and refusing any above [`REFUSED_ALLOC`].
struct Tracking;

fn admit(size: usize) -> bool {
    LARGEST.set(LARGEST.get().max(size));
    size <= REFUSED_ALLOC
}

// SAFETY: every call is forwarded unchanged to `System`, or refused with null as allowed.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if admit(layout.size()) {
            unsafe { System.alloc(layout) }
        } else {
            std::ptr::null_mut()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if admit(layout.size()) {
            unsafe { System.alloc_zeroed(layout) }
        } else {
            std::ptr::null_mut()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if admit(new_size) {
            unsafe { System.realloc(ptr, layout, new_size) }
        } else {
            std::ptr::null_mut()
        }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Which readers accepted an input, and a summary of what they made of it.
struct Outcome {
    parsed: bool,
    lidc: bool,
    /// [`fnv1a`] of the features of what `parse` built ([`summarize`]) or of its error
    /// variant, and of `parse_lidc`'s item count or error variant: inputs that change only
    /// values share it, so the pool keeps those that reach something new.
    signature: u64,
}

/// What `fuzz/fuzz_targets/lidc_pickle.rs` does with one input, converting what is accepted.
fn exercise(data: &[u8]) -> Outcome {
    let mut features = BTreeSet::new();
    let parsed = pickle::parse(data).map(|p| {
        convert_reachable(&p);
        summarize(&p, &mut features);
    });
    let lidc = parse_lidc(data, DEFAULT_MASK_COUNT).map(|items| {
        for item in &items {
            let _ = item.write_image(&mut vec![0.0; item.image.len()]);
            for (index, mask) in item.masks.iter().enumerate() {
                let _ = item.write_mask(index, &mut vec![0; mask.len()]);
            }
        }
        items.len()
    });
    if let Err(e) = &parsed {
        features.insert(variant(e));
    }
    features.insert(match &lidc {
        Ok(items) => format!("lidc{}", bucket(*items)),
        Err(e) => format!("lidc{}", variant(e)),
    });
    Outcome {
        parsed: parsed.is_ok(),
        lidc: lidc.is_ok(),
        signature: fnv1a(
            features
                .into_iter()
                .collect::<Vec<_>>()
                .join(" ")
                .as_bytes(),
        ),
    }
}

/// An error's variant name, without the details (offsets, names) that make it unique.
fn variant(error: &impl std::fmt::Debug) -> String {
    let debug = format!("{error:?}");
    let end = debug
        .find(|c: char| !c.is_alphanumeric())
        .unwrap_or(debug.len());
    debug[..end].to_owned()
}

/// The bit length of `n`: sizes by order of magnitude.
fn bucket(n: usize) -> u32 {
    usize::BITS - n.leading_zeros()
}

/// Adds what `parse` built as a set of features, as coverage counts edges rather than
/// paths: kinds, container sizes by [`bucket`], arrays' rank, dtype and order. Neither
/// values nor order nor depth, so that signatures stay few.
fn summarize(pickle: &Pickle<'_>, features: &mut BTreeSet<String>) {
    let (mut stack, mut seen) = (vec![pickle.root()], HashSet::new());
    while let Some(value) = stack.pop() {
        if let Value::Object(id) = value {
            if !seen.insert(id) {
                continue;
            }
        }
        let kind = pickle.kind(value);
        let feature = if let Some(entries) = pickle.as_dict(value) {
            stack.extend(entries.iter().flat_map(|&(key, value)| [key, value]));
            format!("{kind}{}", bucket(entries.len()))
        } else if let Some(items) = pickle.as_sequence(value) {
            stack.extend_from_slice(items);
            format!("{kind}{}", bucket(items.len()))
        } else if let Some(array) = pickle.as_array(value) {
            let (rank, dtype, order) = (array.shape().len(), array.dtype(), array.memory_order());
            format!("{kind}{rank}{dtype}{order:?}")
        } else {
            kind.to_owned()
        };
        features.insert(feature);
    }
}

/// As in the cargo-fuzz target: each distinct array at the root or one level below it.
fn convert_reachable(pickle: &Pickle<'_>) {
    let root = pickle.root();
    let children: Vec<Value> = match (pickle.as_dict(root), pickle.as_sequence(root)) {
        (Some(entries), _) => entries.iter().map(|&(_, value)| value).collect(),
        (_, Some(items)) => items.to_vec(),
        _ => Vec::new(),
    };
    let mut seen = HashSet::new();
    for value in std::iter::once(root).chain(children) {
        let (Value::Object(id), Some(array)) = (value, pickle.as_array(value)) else {
            continue;
        };
        if seen.insert(id) {
            let _ = array.write_f32(&mut vec![0.0; array.len()]);
            let _ = array.write_u8_mask(&mut vec![0; array.len()]);
        }
    }
}

/// Runs one input; a panic, an allocation over [`MAX_ALLOC`] or slowness is the `Err`.
fn check(data: &[u8]) -> Result<Outcome, String> {
    LARGEST.set(0);
    let start = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| exercise(data)));
    let (elapsed, largest) = (start.elapsed(), LARGEST.get());
    let outcome = result.map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
        format!("panicked: {}", message.unwrap_or("(not a string)"))
    })?;
    if largest > MAX_ALLOC {
        return Err(format!(
            "allocated {largest} bytes at once (limit {MAX_ALLOC})"
        ));
    }
    if elapsed > SLOW {
        return Err(format!("took {elapsed:?} (limit {SLOW:?})"));
    }
    Ok(outcome)
}

/// Where findings go, so that a CI failure leaves the input to replay.
fn failure_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures")
}

/// Writes `data` as `<fnv1a>.pickle` under `dir` and says where, or why it could not.
fn save(dir: &Path, data: &[u8]) -> String {
    let path = dir.join(format!("{:016x}.pickle", fnv1a(data)));
    match std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, data)) {
        Ok(()) => path.display().to_string(),
        Err(e) => format!("(not saved to {}: {e})", path.display()),
    }
}

/// A hash that stays the same across Rust versions, for stable file names.
fn fnv1a(data: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for &byte in data {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The committed seeds, by file name, in name order (the run's determinism needs one).
fn read_seeds() -> Vec<(String, Arc<Vec<u8>>)> {
    let dir = common::repo().join("fuzz/seeds/lidc_pickle");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut seeds: Vec<_> = entries
        .map(|entry| {
            entry
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path()
        })
        .filter(|path| path.extension().is_some_and(|ext| ext == "pickle"))
        .map(|path| {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            (name.into_owned(), Arc::new(data))
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 20, "seeds missing in {}", dir.display());
    seeds
}

/// The tokens of a libFuzzer dictionary: each line's `"..."`, with `\xNN`, `\\`, `\"`.
fn read_dict(path: &Path) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let token = |line: &str| -> Option<Vec<u8>> {
        let quoted = &line[line.find('"')? + 1..line.rfind('"')?];
        let (bytes, mut out, mut i) = (quoted.as_bytes(), Vec::new(), 0);
        while i < bytes.len() {
            let (byte, width) = match bytes.get(i..i + 2) {
                Some(br"\x") => {
                    let hex = bytes
                        .get(i + 2..i + 4)
                        .and_then(|h| std::str::from_utf8(h).ok());
                    let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
                    (byte.unwrap_or_else(|| panic!("bad \\x escape: {line}")), 4)
                }
                Some([b'\\', escaped]) => (*escaped, 2),
                _ => (bytes[i], 1),
            };
            out.push(byte);
            i += width;
        }
        Some(out)
    };
    let tokens: Vec<Vec<u8>> = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(token)
        .collect();
    assert!(tokens.len() >= 10, "{}: too few tokens", path.display());
    tokens
}

const INTERESTING_BYTES: [u8; 4] = [0x00, 0xff, 0x7f, 0x80];
const INTERESTING_INTS: [u64; 14] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];
/// Opcodes followed by a length or an index (FRAME, the string, bytes and int opcodes,
/// LONG1, memo get/put): integers written right after them reach the size checks.
const SIZED_OPCODES: &[u8] = b"\x95X\x8c\x8dBC\x8e\x96JKM\x8ahjqr";

/// A position in `data` where a `width`-byte write fits, half the time right after a
/// byte that looks like a sized opcode; `None` if it does not fit.
fn position(rng: &mut Pcg64, data: &[u8], width: usize) -> Option<usize> {
    let last = data.len().checked_sub(width)?;
    if rng.gen_bool(0.5) {
        for _ in 0..16 {
            let at = rng.gen_range(0..data.len());
            if SIZED_OPCODES.contains(&data[at]) && at < last {
                return Some(at + 1);
            }
        }
    }
    Some(rng.gen_range(0..=last))
}

/// A random `start..end` of 1-64 bytes inside `data`, which must not be empty.
fn range(rng: &mut Pcg64, data: &[u8]) -> std::ops::Range<usize> {
    let start = rng.gen_range(0..data.len());
    start..start + rng.gen_range(1..=64.min(data.len() - start))
}

/// One mutation of `data`; `pool` gives splice partners, `dict` tokens.
fn mutate_once(rng: &mut Pcg64, data: &mut Vec<u8>, pool: &[Arc<Vec<u8>>], dict: &[Vec<u8>]) {
    let len = data.len();
    match rng.gen_range(0..10) {
        0 if len > 0 => data[rng.gen_range(0..len)] ^= 1 << rng.gen_range(0..8),
        1 if len > 0 => {
            data[rng.gen_range(0..len)] = INTERESTING_BYTES[rng.gen_range(0..4)];
        }
        2 if len > 0 => drop(data.drain(range(rng, data))),
        3 if len > 0 => {
            let chunk = data[range(rng, data)].to_vec();
            let at = rng.gen_range(0..=len);
            data.splice(at..at, chunk);
        }
        4 if len > 0 => data.truncate(rng.gen_range(0..len)),
        5 => {
            let other = &pool[rng.gen_range(0..pool.len())];
            data.truncate(rng.gen_range(0..=len));
            data.extend_from_slice(&other[rng.gen_range(0..=other.len())..]);
        }
        6 => {
            let token = &dict[rng.gen_range(0..dict.len())];
            let at = rng.gen_range(0..=len);
            let end = if rng.gen_bool(0.5) {
                at
            } else {
                len.min(at + token.len())
            };
            data.splice(at..end, token.iter().copied());
        }
        n @ (7 | 8) => {
            let width = if n == 7 { 4 } else { 8 };
            if let Some(at) = position(rng, data, width) {
                let value = match rng.gen_range(0..4) {
                    0 => (len as u64)
                        .wrapping_add(rng.gen_range(0..3))
                        .wrapping_sub(1),
                    _ => INTERESTING_INTS[rng.gen_range(0..INTERESTING_INTS.len())],
                };
                data[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            }
        }
        _ => {
            let at = rng.gen_range(0..=len);
            let count = rng.gen_range(1..=16);
            data.splice(at..at, (0..count).map(|_| rng.gen::<u8>()));
        }
    }
}

/// Counts distinct inputs in bounded memory: exactly up to [`KMV`] of them, then
/// estimated from the [`KMV`] smallest hashes (k minimum values, about 2% error), since a
/// long run accepts more inputs than a set of all their hashes could hold.
#[derive(Default)]
struct Distinct(BTreeSet<u64>);

const KMV: usize = 4096;

impl Distinct {
    fn insert(&mut self, hash: u64) {
        // splitmix64's finalizer: the estimate needs hashes spread evenly over all of u64.
        let mut x = hash;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let x = x ^ (x >> 31);
        if self.0.len() < KMV {
            self.0.insert(x);
        } else if self.0.last().is_some_and(|&max| x < max) && self.0.insert(x) {
            self.0.pop_last();
        }
    }

    fn estimate(&self) -> String {
        match self.0.last() {
            Some(&max) if self.0.len() == KMV => {
                format!("~{:.0}", (KMV - 1) as f64 * 2f64.powi(64) / max as f64)
            }
            _ => self.0.len().to_string(),
        }
    }
}

/// The input being run, and since when.
type Running = Arc<Mutex<Option<(Instant, Arc<Vec<u8>>)>>>;

/// Reports an input that runs past [`HANG`] and ends the process, since the fuzzing
/// thread is stuck in it; stops when dropped.
struct Watchdog {
    running: Running,
    _stop: Sender<()>,
}

impl Watchdog {
    fn start(dir: PathBuf) -> Watchdog {
        let running = Running::default();
        let (stop, stopped) = mpsc::channel::<()>();
        let watched = running.clone();
        std::thread::spawn(move || {
            while let Err(RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_millis(250))
            {
                let current = watched.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some((since, data)) = current.as_ref().filter(|(s, _)| s.elapsed() > HANG) {
                    // Straight to stderr: the test harness's capture dies with the process.
                    let _ = writeln!(
                        std::io::stderr(),
                        "fuzz_pickle: an input has run for {:?}, saved at {}; exiting",
                        since.elapsed(),
                        save(&dir, data)
                    );
                    std::process::exit(1);
                }
            }
        });
        Watchdog {
            running,
            _stop: stop,
        }
    }

    fn set(&self, data: Option<&Arc<Vec<u8>>>) {
        *self.running.lock().unwrap_or_else(PoisonError::into_inner) =
            data.map(|data| (Instant::now(), data.clone()));
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text} is not a valid value")),
        Err(_) => default,
    }
}

/// Mutates seeds for `PROBUNET_FUZZ_SECONDS` and fails on the first finding, saving its
/// input under `target/tmp/fuzz-failures`. An allocation over 1 GiB aborts the process
/// before anything can be saved: rerun with the same seed and `PROBUNET_FUZZ_KEEP_CURRENT`
/// set, which writes each input to `current.pickle` there before running it.
#[test]
fn fuzz_lidc_pickle() {
    let seconds: f64 = env_or("PROBUNET_FUZZ_SECONDS", 60.0);
    let max_execs: u64 = env_or("PROBUNET_FUZZ_EXECS", u64::MAX);
    let seed = match std::env::var("PROBUNET_FUZZ_SEED") {
        Ok(text) => match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => text.parse().ok(),
        }
        .unwrap_or_else(|| panic!("PROBUNET_FUZZ_SEED={text} is not a number")),
        Err(_) => 0x5eed,
    };
    let keep_current = std::env::var_os("PROBUNET_FUZZ_KEEP_CURRENT").is_some();
    let dir = failure_dir();
    let current = dir.join("current.pickle");
    if keep_current {
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    // Printed past the capture, so that it shows even if the process aborts.
    let _ = writeln!(
        std::io::stderr(),
        "fuzz_pickle: seed {seed:#x}, {seconds} s; if this aborts, rerun with \
         PROBUNET_FUZZ_KEEP_CURRENT=1 to keep the input in {}",
        current.display()
    );
    let dict = read_dict(&common::repo().join("fuzz/lidc_pickle.dict"));
    let mut pool: Vec<Arc<Vec<u8>>> = read_seeds().into_iter().map(|(_, data)| data).collect();
    let seed_count = pool.len();
    let mut signatures: HashSet<u64> = pool
        .iter()
        .filter_map(|data| check(data).ok().map(|outcome| outcome.signature))
        .collect();
    let mut rng = Pcg64::seed_from_u64(seed);
    let watchdog = Watchdog::start(dir.clone());
    let (mut parsed, mut lidc) = (Distinct::default(), Distinct::default());
    let (start, budget) = (Instant::now(), Duration::from_secs_f64(seconds));
    let mut execs = 0_u64;
    while execs < max_execs && start.elapsed() < budget {
        // Half of the time a committed seed, so finds never crowd out the valid LIDC files.
        let from = if rng.gen_bool(0.5) {
            seed_count
        } else {
            pool.len()
        };
        let mut data = pool[rng.gen_range(0..from)].to_vec();
        for _ in 0..rng.gen_range(1..=8) {
            mutate_once(&mut rng, &mut data, &pool, &dict);
        }
        data.truncate(MAX_INPUT);
        if keep_current {
            std::fs::write(&current, &data)
                .unwrap_or_else(|e| panic!("{}: {e}", current.display()));
        }
        let data = Arc::new(data);
        watchdog.set(Some(&data));
        let outcome = check(&data);
        watchdog.set(None);
        execs += 1;
        let outcome = outcome.unwrap_or_else(|why| {
            panic!(
                "fuzz input {} {why} (execution {execs}, seed {seed:#x}); replay it by \
                 copying it into fuzz/seeds/lidc_pickle and running the seed_corpus test",
                save(&dir, &data)
            )
        });
        let hash = fnv1a(&data);
        if outcome.parsed {
            parsed.insert(hash);
        }
        if outcome.lidc {
            lidc.insert(hash);
        }
        if signatures.len() < MAX_SIGNATURES && signatures.insert(outcome.signature) {
            if pool.len() < POOL_CAP {
                pool.push(data);
            } else {
                pool[rng.gen_range(seed_count..POOL_CAP)] = data;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!(
        "fuzz_pickle: seed {seed:#x}: {execs} executions in {elapsed:.1} s ({:.0}/s); \
         distinct inputs accepted: {} by parse, {} by parse_lidc; {} distinct outcomes",
        execs as f64 / elapsed,
        parsed.estimate(),
        lidc.estimate(),
        signatures.len()
    );
}

/// Replays each committed seed once: none may fail, and the good fixtures (`lidc_*`,
/// `arrays_*`) must still be accepted, or the fuzzer would only mutate rejects.
#[test]
fn seed_corpus() {
    for (name, data) in read_seeds() {
        let outcome = check(&data).unwrap_or_else(|why| panic!("seed {name} {why}"));
        if name.starts_with("lidc_") || name.starts_with("arrays_") {
            assert!(outcome.parsed, "{name}: {:?}", pickle::parse(&data).err());
        }
        if name.starts_with("lidc_") {
            let error = parse_lidc(&data, DEFAULT_MASK_COUNT).err();
            assert!(outcome.lidc, "{name}: {error:?}");
        }
    }
}
