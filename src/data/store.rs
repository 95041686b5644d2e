//! The prepared dataset store, `data/<name>/`: one safetensors file with `images` (f32
//! `[N, 1, H, W]`) and `masks` (u8 `[N, A, H, W]`), and `manifest.json` describing where it
//! came from and how it is split.
//!
//! A store is built in a hidden sibling folder and renamed into place, so an interrupted
//! prepare never leaves half a store. The array file is streamed item by item and never
//! held in memory whole.
use super::split::{Split, SplitName};
use super::synthetic::SyntheticConfig;
use super::DataError;
use crate::memory::budget::{self, Need};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub const ARRAYS_FILE: &str = "data.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: &str = "probunet-store/1";

/// The array shapes of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreShape {
    pub items: usize,
    pub annotators: usize,
    pub height: usize,
    pub width: usize,
}

impl StoreShape {
    pub fn pixels(&self) -> usize {
        self.height * self.width
    }

    fn image_bytes(&self) -> usize {
        self.items * self.pixels() * 4
    }

    fn mask_bytes(&self) -> usize {
        self.items * self.annotators * self.pixels()
    }

    /// Images (float32) and masks (one byte per annotator) together, without overflow
    /// whatever a manifest or a flag says.
    pub fn bytes(&self) -> u128 {
        let pixels = [self.items, self.height, self.width].map(|v| v as u64);
        budget::product(&pixels).saturating_mul(4 + self.annotators as u128)
    }

    fn describe(&self) -> String {
        format!(
            "{} items of {}x{} pixels with {} annotators",
            self.items, self.height, self.width, self.annotators
        )
    }

    /// What scoring one item holds: its arrays, and the annotator-by-annotator distances
    /// (float64) that GED's reference terms need.
    fn item_work_bytes(&self) -> u128 {
        let one = StoreShape { items: 1, ..*self };
        let a = self.annotators as u64;
        one.bytes().saturating_add(budget::product(&[a, a, 8]))
    }

    /// Refuses a store that the disk under `out` cannot hold, or whose items (generated,
    /// converted and scored one by one in memory) do not fit in memory.
    pub fn check_room(&self, out: &Path) -> Result<(), budget::TooLarge> {
        let item = format!(
            "one item of {}x{} pixels with {} annotators",
            self.height, self.width, self.annotators
        );
        Need::new(item, self.item_work_bytes()).fits_memory()?;
        Need::new(format!("a store of {}", self.describe()), self.bytes()).fits_disk(out)
    }
}

/// One input file, so a second prepare of the same input can be recognised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    pub path: String,
    pub size: u64,
    /// CRC-32C of the whole file, hex.
    pub crc32c: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Source {
    Pickle {
        files: Vec<SourceFile>,
    },
    Synthetic {
        config: SyntheticConfig,
    },
    /// PNG images and masks, from a folder layout or a CSV manifest.
    Images {
        path: String,
        annotators: Vec<String>,
        files: usize,
        bytes: u64,
        /// CRC-32C of every file's contents in order, hex.
        crc32c: String,
    },
}

impl Source {
    /// How this source's image values are brought to the store's scale, in words.
    pub fn image_scaling(&self) -> &'static str {
        match self {
            Source::Pickle { .. } => "the pickle's float values as they are (LIDC: [0, 1])",
            Source::Synthetic { .. } => "generated in [0, 1]",
            Source::Images { .. } => "PNG value / (2^bit depth - 1): 8-bit / 255, 16-bit / 65535",
        }
    }
}

/// Element types met in the input, for the record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DtypesSeen {
    pub image: Vec<String>,
    pub masks: Vec<String>,
}

/// Figures gathered while the arrays are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    pub image_min: f32,
    pub image_max: f32,
    /// Per annotator, the fraction of items whose mask is all zero.
    pub empty_mask_fraction: Vec<f64>,
}

/// What an ideal model would score: the GED of fresh draws from the true annotator
/// distribution against the given annotations (only the synthetic generator knows it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdealReference {
    pub samples: usize,
    pub convention: String,
    /// NaN for an empty split, which JSON writes as null.
    #[serde(deserialize_with = "nan_if_null")]
    pub ged_val: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub ged_test: f64,
}

/// Reads back the null that serde_json writes for NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub probunet_version: String,
    pub source: Source,
    pub shape: StoreShape,
    pub dtypes_seen: DtypesSeen,
    pub keys: Vec<String>,
    pub patients: Vec<String>,
    pub series_uids: Vec<Option<String>>,
    pub split: Split,
    pub stats: Stats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ideal: Option<IdealReference>,
    /// How image values came to the store's scale; `probunet predict` scales new PNGs the
    /// same way. Stores made before it was recorded lack it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_scaling: Option<String>,
}

/// Where the array data starts: the safetensors header is padded with spaces to a block
/// boundary so the data can be written with `O_DIRECT`.
const BLOCK: usize = 4096;
/// Bytes per write; a multiple of `BLOCK`.
const CHUNK: usize = 32 << 20;

/// A buffer whose start is `BLOCK`-aligned, as `O_DIRECT` writes require.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(capacity: usize) -> Self {
        let raw = vec![0u8; capacity + BLOCK];
        let start = raw.as_ptr().align_offset(BLOCK);
        Self { raw, start, len: 0 }
    }

    fn capacity(&self) -> usize {
        self.raw.len() - BLOCK
    }

    fn filled(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

/// Chunks each region's I/O thread may hold (one being written, the rest queued) while the
/// next is filled.
const CHUNKS_IN_FLIGHT: usize = 2;

/// Appends one region of the file (images or masks) in `CHUNK`-sized positioned writes. An
/// I/O thread of its own issues them, so filling the next chunk overlaps writing the last,
/// and the two regions are written at once.
struct RegionWriter<'f> {
    path: &'f Path,
    /// File offset of `buf`'s first byte.
    offset: u64,
    direct: bool,
    buf: AlignedBuf,
    to_io: std::sync::mpsc::SyncSender<(AlignedBuf, u64, usize)>,
    written: std::sync::mpsc::Receiver<AlignedBuf>,
    io: std::thread::ScopedJoinHandle<'f, Result<(), DataError>>,
}

impl<'f> RegionWriter<'f> {
    fn new<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        file: &'scope File,
        path: &'scope Path,
        offset: usize,
        direct: bool,
        chunk: usize,
    ) -> Self
    where
        'scope: 'f,
    {
        let (to_io, queued) =
            std::sync::mpsc::sync_channel::<(AlignedBuf, u64, usize)>(CHUNKS_IN_FLIGHT);
        let (give_back, written) = std::sync::mpsc::channel();
        for _ in 0..CHUNKS_IN_FLIGHT {
            // `written` is alive here, so the send cannot fail.
            let _ = give_back.send(AlignedBuf::new(chunk));
        }
        let io = scope.spawn(move || {
            let mut result = Ok(());
            for (buf, at, len) in queued {
                if result.is_ok() {
                    result = file
                        .write_all_at(&buf.raw[buf.start..buf.start + len], at)
                        .map_err(|e| DataError::io(path, e));
                }
                // The filler may have stopped (on an error of its own): nothing to return to.
                let _ = give_back.send(buf);
            }
            result
        });
        Self {
            path,
            offset: offset as u64,
            direct,
            buf: AlignedBuf::new(chunk),
            to_io,
            written,
            io,
        }
    }

    /// Lets `fill` write the next `len` bytes of the region in place when they fit the
    /// chunk being filled (always, when `len` divides the chunk size); otherwise through a
    /// scratch buffer.
    fn fill<T>(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<T, DataError>,
    ) -> Result<T, DataError> {
        if len > self.buf.capacity() - self.buf.len {
            let mut scratch = vec![0u8; len];
            let value = fill(&mut scratch)?;
            self.append(&scratch)?;
            return Ok(value);
        }
        let at = self.buf.start + self.buf.len;
        let value = fill(&mut self.buf.raw[at..at + len])?;
        self.buf.len += len;
        if self.buf.len == self.buf.capacity() {
            self.send(self.buf.len)?;
        }
        Ok(value)
    }

    fn append(&mut self, mut bytes: &[u8]) -> Result<(), DataError> {
        while !bytes.is_empty() {
            let take = bytes.len().min(self.buf.capacity() - self.buf.len);
            let at = self.buf.start + self.buf.len;
            self.buf.raw[at..at + take].copy_from_slice(&bytes[..take]);
            self.buf.len += take;
            bytes = &bytes[take..];
            if self.buf.len == self.buf.capacity() {
                self.send(self.buf.len)?;
            }
        }
        Ok(())
    }

    /// Queues what is buffered, zero-padded to `padded_len` (a block multiple for the last
    /// write of a direct file; the caller truncates the file to its true length), and takes
    /// a written buffer back to fill next.
    fn send(&mut self, padded_len: usize) -> Result<(), DataError> {
        let end = self.buf.start + padded_len;
        self.buf.raw[self.buf.start + self.buf.len..end].fill(0);
        let next = self.written.recv().map_err(|_| self.io_stopped())?;
        let full = std::mem::replace(&mut self.buf, next);
        let (offset, len) = (self.offset, full.len);
        self.to_io
            .send((full, offset, padded_len))
            .map_err(|_| self.io_stopped())?;
        self.offset += len as u64;
        self.buf.len = 0;
        Ok(())
    }

    fn io_stopped(&self) -> DataError {
        DataError::Store {
            path: self.path.to_path_buf(),
            why: "the writer thread stopped".into(),
        }
    }

    /// Writes the rest and waits for every write; the first I/O error, if any.
    fn finish(mut self) -> Result<(), DataError> {
        let len = self.buf.len;
        let queued = if len > 0 {
            self.send(if self.direct {
                len.next_multiple_of(BLOCK)
            } else {
                len
            })
        } else {
            Ok(())
        };
        drop(self.to_io);
        let written = (self.io.join()).unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        written.and(queued)
    }
}

/// Opens the output for direct I/O where the file system allows it: written once and not
/// read back soon, the data need not pass through (and first allocate) the page cache,
/// which costs more than the disk write on the machines measured. Falls back to a plain
/// file (tmpfs, say, refuses `O_DIRECT`).
fn create_output(path: &Path, aligned: bool) -> Result<(File, bool), DataError> {
    if aligned {
        let direct = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        if let Ok(file) = direct {
            return Ok((file, true));
        }
    }
    File::create(path)
        .map(|f| (f, false))
        .map_err(|e| DataError::io(path, e))
}

/// Writes the two arrays into `path` as safetensors: `image(i, bytes)` fills item i's
/// `H*W` pixels as little-endian f32 bytes, `masks(i, bytes)` its `A*H*W` mask values (0 or
/// 1), both in place in the write buffers. The image and mask regions are filled by two
/// threads at once, each with an I/O thread behind it. Returns the value range and the
/// empty-mask fractions.
pub fn write_arrays(
    path: &Path,
    shape: StoreShape,
    mut image: impl FnMut(usize, &mut [u8]) -> Result<(), DataError> + Send,
    mut masks: impl FnMut(usize, &mut [u8]) -> Result<(), DataError>,
) -> Result<Stats, DataError> {
    let (image_bytes, mask_bytes) = (shape.image_bytes(), shape.mask_bytes());
    let json = serde_json::json!({
        "__metadata__": { "format": FORMAT },
        "images": {
            "dtype": "F32",
            "shape": [shape.items, 1, shape.height, shape.width],
            "data_offsets": [0, image_bytes],
        },
        "masks": {
            "dtype": "U8",
            "shape": [shape.items, shape.annotators, shape.height, shape.width],
            "data_offsets": [image_bytes, image_bytes + mask_bytes],
        },
    });
    #[expect(clippy::expect_used, reason = "a JSON value of strings and numbers")]
    let mut header = serde_json::to_vec(&json).expect("a JSON value serialises");
    // safetensors allows trailing spaces in the header; they align the data to a block.
    header.resize((8 + header.len()).next_multiple_of(BLOCK) - 8, b' ');
    let data_start = 8 + header.len();
    let (file, direct) = create_output(path, (data_start + image_bytes).is_multiple_of(BLOCK))?;
    let mut first = AlignedBuf::new(data_start);
    first.raw[first.start..first.start + 8].copy_from_slice(&(header.len() as u64).to_le_bytes());
    first.raw[first.start + 8..first.start + data_start].copy_from_slice(&header);
    first.len = data_start;
    file.write_all_at(first.filled(), 0)
        .map_err(|e| DataError::io(path, e))?;

    let pixels = shape.pixels();
    let file = &file;
    let (image_stats, empty) = std::thread::scope(|scope| {
        let images = scope.spawn(move || {
            let mut out = RegionWriter::new(scope, file, path, data_start, direct, CHUNK);
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            for i in 0..shape.items {
                let (l, h) = out.fill(pixels * 4, |bytes| {
                    image(i, bytes)?;
                    Ok(value_range(bytes))
                })?;
                (lo, hi) = (lo.min(l), hi.max(h));
            }
            out.finish()?;
            Ok::<_, DataError>((lo, hi))
        });
        let mut out = RegionWriter::new(scope, file, path, data_start + image_bytes, direct, CHUNK);
        let mut empty = vec![0usize; shape.annotators];
        let masks_done = (|| {
            for i in 0..shape.items {
                out.fill(shape.annotators * pixels, |values| {
                    masks(i, values)?;
                    for (a, mask) in values.chunks_exact(pixels).enumerate() {
                        if mask.iter().fold(0u8, |acc, &v| acc | v) == 0 {
                            empty[a] += 1;
                        }
                    }
                    Ok(())
                })?;
            }
            out.finish()
        })();
        let image_stats = (images.join()).unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        masks_done?;
        Ok::<_, DataError>((image_stats?, empty))
    })?;
    file.set_len((data_start + image_bytes + mask_bytes) as u64)
        .map_err(|e| DataError::io(path, e))?;
    file.sync_all().map_err(|e| DataError::io(path, e))?;
    let n = shape.items.max(1) as f64;
    Ok(Stats {
        image_min: image_stats.0,
        image_max: image_stats.1,
        empty_mask_fraction: empty.iter().map(|&e| e as f64 / n).collect(),
    })
}

/// Smallest and largest of little-endian f32 `bytes` (finite, as the fillers check), in
/// eight lanes the compiler vectorises (`f32::min` would keep it scalar for NaN's sake).
fn value_range(bytes: &[u8]) -> (f32, f32) {
    let (mut lo, mut hi) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8]);
    // SAFETY: every bit pattern is a valid f32; align_to only yields whole, aligned ones.
    let (head, values, tail) = unsafe { bytes.align_to::<f32>() };
    if !head.is_empty() || cfg!(target_endian = "big") {
        let scalar = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        return scalar.fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
    }
    debug_assert!(tail.is_empty(), "whole f32s");
    let lanes = values.chunks_exact(8);
    for &v in lanes.remainder() {
        lo[0] = lo[0].min(v);
        hi[0] = hi[0].max(v);
    }
    for chunk in lanes {
        for k in 0..8 {
            lo[k] = if chunk[k] < lo[k] { chunk[k] } else { lo[k] };
            hi[k] = if chunk[k] > hi[k] { chunk[k] } else { hi[k] };
        }
    }
    (
        lo.into_iter().fold(f32::INFINITY, f32::min),
        hi.into_iter().fold(f32::NEG_INFINITY, f32::max),
    )
}

/// A store opened for training or evaluation: the arrays as CPU tensors.
#[derive(Debug)]
pub struct Store {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// f32 `[N, 1, H, W]`.
    pub images: Tensor,
    /// u8 `[N, A, H, W]`, values 0 or 1.
    pub masks: Tensor,
}

impl Manifest {
    /// What in the manifest contradicts itself: per-item lists of another length than
    /// the items, split indices past the end or in two splits (or twice in one), which
    /// would leak training items into validation. A store whose manifest was edited by
    /// hand is refused here rather than indexed out of bounds or scored wrongly later.
    pub fn check(&self) -> Result<(), String> {
        let items = self.shape.items;
        for (name, len) in [
            ("keys", self.keys.len()),
            ("patients", self.patients.len()),
            ("series_uids", self.series_uids.len()),
        ] {
            if len != items {
                return Err(format!("{name} lists {len} entries for {items} items"));
            }
        }
        // Sized by the indices listed, not by `items`, which the file size bounds later.
        let mut owner: HashMap<usize, SplitName> = HashMap::new();
        for part in SplitName::ALL {
            for &i in self.split.indices(part) {
                if i >= items {
                    return Err(format!(
                        "split.{part} names item {i}, but the store has {items} items"
                    ));
                }
                if let Some(first) = owner.insert(i, part) {
                    return Err(format!(
                        "item {i} is in split.{first} and in split.{part}: the splits must \
                         not share items"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The safetensors header of a store's arrays must be the one prepare writes for the
/// manifest's shape: names, dtypes, shapes and offsets.
fn check_header(header: &[u8], shape: StoreShape) -> Result<(), String> {
    #[derive(Deserialize, PartialEq, Debug)]
    struct Entry {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: [usize; 2],
    }
    let entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| format!("unreadable safetensors header: {e}"))?;
    let entry = |name: &str| -> Result<Entry, String> {
        let value = entries
            .get(name)
            .ok_or_else(|| format!("the safetensors header has no {name:?} tensor"))?;
        serde_json::from_value(value.clone()).map_err(|e| format!("tensor {name:?}: {e}"))
    };
    let (images, masks) = (shape.image_bytes(), shape.mask_bytes());
    let expected = [
        (
            "images",
            "F32",
            vec![shape.items, 1, shape.height, shape.width],
            [0, images],
        ),
        (
            "masks",
            "U8",
            vec![shape.items, shape.annotators, shape.height, shape.width],
            [images, images + masks],
        ),
    ];
    for (name, dtype, dims, offsets) in expected {
        let found = entry(name)?;
        if found.dtype != dtype || found.shape != dims || found.data_offsets != offsets {
            return Err(format!(
                "tensor {name:?} is {} {:?} at {:?}, but the manifest's shape needs {dtype} \
                 {dims:?} at {offsets:?}",
                found.dtype, found.shape, found.data_offsets
            ));
        }
    }
    Ok(())
}

impl Store {
    /// Opens `dir`, checking that the arrays agree with the manifest.
    pub fn open(dir: &Path) -> Result<Store, DataError> {
        let manifest = read_manifest(dir)?;
        manifest.check().map_err(|why| DataError::Store {
            path: dir.join(MANIFEST_FILE),
            why,
        })?;
        let path = dir.join(ARRAYS_FILE);
        let bad = |why: String| DataError::Store {
            path: path.clone(),
            why,
        };
        let mut file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
        let len = file.metadata().map_err(|e| DataError::io(&path, e))?.len();
        let mut prefix = [0u8; 8];
        file.read_exact(&mut prefix)
            .map_err(|_| bad("shorter than a safetensors header".into()))?;
        let header_len = u64::from_le_bytes(prefix);
        let shape = manifest.shape;
        let expected = 8 + u128::from(header_len) + shape.bytes();
        if header_len > 1 << 20 || u128::from(len) != expected {
            return Err(bad(format!(
                "{len} bytes, but the manifest's shape {shape:?} needs {expected}: truncated or not this store's file"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|_| bad("truncated safetensors header".into()))?;
        check_header(&header, shape).map_err(bad)?;
        let what = format!("loading the store {} ({})", dir.display(), shape.describe());
        let bytes = shape.bytes().saturating_add(shape.item_work_bytes());
        Need::new(what, bytes).fits_memory()?;
        // SAFETY: the map is read-only and lives only for the copies below; a store is
        // written once and renamed into place, never modified in place.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DataError::io(&path, e))?;
        let data = &map[8 + header_len as usize..];
        let (h, w) = (shape.height as i64, shape.width as i64);
        let images = Tensor::f_from_data_size(
            &data[..shape.image_bytes()],
            &[shape.items as i64, 1, h, w],
            Kind::Float,
        )?;
        let masks = Tensor::f_from_data_size(
            &data[shape.image_bytes()..],
            &[shape.items as i64, shape.annotators as i64, h, w],
            Kind::Uint8,
        )?;
        Ok(Store {
            dir: dir.to_path_buf(),
            manifest,
            images,
            masks,
        })
    }

    pub fn split(&self, part: SplitName) -> &[usize] {
        self.manifest.split.indices(part)
    }
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, DataError> {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| DataError::Store {
        path: path.clone(),
        why: e.to_string(),
    })?;
    if manifest.format != FORMAT {
        return Err(DataError::Store {
            path,
            why: format!(
                "format {:?}, this probunet reads {FORMAT:?}",
                manifest.format
            ),
        });
    }
    Ok(manifest)
}

/// Refuses to let prepare replace `dir` unless it is missing, empty, or recognisably a
/// store that prepare made (a manifest of this format and the arrays, nothing else):
/// `--force` must never delete a user's folder or file.
pub fn check_replaceable(dir: &Path) -> Result<(), DataError> {
    let refuse = |why: String| DataError::Store {
        path: dir.to_path_buf(),
        why,
    };
    let metadata = match fs::symlink_metadata(dir) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DataError::io(dir, e)),
    };
    if !metadata.is_dir() {
        return Err(refuse(
            "is not a folder; prepare writes a store folder there only where none is: \
             choose another --out"
                .into(),
        ));
    }
    let mut foreign = Vec::new();
    let mut count = 0;
    for entry in fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let name = entry.map_err(|e| DataError::io(dir, e))?.file_name();
        count += 1;
        if name != MANIFEST_FILE && name != ARRAYS_FILE {
            foreign.push(name.to_string_lossy().into_owned());
        }
    }
    if count == 0 {
        return Ok(());
    }
    let not_a_store = |what: String| {
        refuse(format!(
            "is not a probunet store ({what}); prepare replaces only a store it made, \
             even with --force: choose another --out"
        ))
    };
    if let Some(first) = foreign.first() {
        let more = match foreign.len() {
            1 => String::new(),
            n => format!(" and {} more", n - 1),
        };
        return Err(not_a_store(format!("it holds {first}{more}")));
    }
    match read_manifest(dir) {
        Ok(_) => Ok(()),
        Err(e) => Err(not_a_store(format!("its {MANIFEST_FILE} is not one: {e}"))),
    }
}

/// A store under construction in a hidden sibling of its final folder; `commit` renames it
/// into place and dropping it without commit removes it.
#[derive(Debug)]
pub struct StoreBuilder {
    partial: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StoreBuilder {
    pub fn new(target: &Path) -> Result<Self, DataError> {
        let name = target.file_name().ok_or_else(|| DataError::Store {
            path: target.into(),
            why: "not a folder name".into(),
        })?;
        let parent = crate::sys::parent_dir(target);
        fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        remove_stale_partials(parent)?;
        check_replaceable(target)?;
        let partial = parent.join(format!(
            ".{}{PARTIAL_MARK}{}",
            name.to_string_lossy(),
            partial_owner(std::process::id())
        ));
        fs::create_dir(&partial).map_err(|e| DataError::io(&partial, e))?;
        Ok(Self {
            partial,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Where the array file goes while the store is built.
    pub fn arrays_path(&self) -> PathBuf {
        self.partial.join(ARRAYS_FILE)
    }

    /// Writes the manifest and moves the store into place, replacing an existing store
    /// only after the new one is complete.
    pub fn commit(mut self, manifest: &Manifest) -> Result<PathBuf, DataError> {
        let path = self.partial.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(manifest).map_err(|e| DataError::Store {
            path: path.clone(),
            why: e.to_string(),
        })?;
        crate::sys::write_synced(&path, &json).map_err(|e| DataError::io(&path, e))?;
        sync_dir(&self.partial)?;
        let mut old = self.partial.clone().into_os_string();
        old.push(OLD_SUFFIX);
        let old = PathBuf::from(old);
        let replacing = self.target.exists();
        if replacing {
            fs::rename(&self.target, &old).map_err(|e| DataError::io(&self.target, e))?;
        }
        fs::rename(&self.partial, &self.target).map_err(|e| DataError::io(&self.target, e))?;
        self.committed = true;
        sync_dir(crate::sys::parent_dir(&self.target))?;
        if replacing {
            fs::remove_dir_all(&old).map_err(|e| DataError::io(&old, e))?;
        }
        Ok(self.target.clone())
    }
}

/// Makes renames into `dir` and the files written in it durable.
fn sync_dir(dir: &Path) -> Result<(), DataError> {
    crate::sys::sync_dir(dir).map_err(|e| DataError::io(dir, e))
}

/// After a store being built's name: the store it replaces, between `commit`'s two
/// renames.
const OLD_SUFFIX: &str = ".old";

/// Between a store's name and its builder's host and pid in a store being built.
const PARTIAL_MARK: &str = ".partial-";

/// `<host>-<pid>`: a pid alone cannot tell a dead builder from one on another machine
/// sharing the folder.
fn partial_owner(pid: u32) -> String {
    format!("{}-{pid}", crate::sys::hostname())
}

/// Puts back what killed prepares on this host left behind, whatever store they were
/// building: a `.<name>.partial-<host>-<pid>.old` whose `<name>` is missing is the store
/// a commit was replacing when it died (between its two renames) and is renamed back;
/// other hidden `.<name>.partial-<host>-<pid>[.old]` folders whose process is gone and
/// that hold nothing but store files are removed.
fn remove_stale_partials(parent: &Path) -> Result<(), DataError> {
    let entries = fs::read_dir(parent).map_err(|e| DataError::io(parent, e))?;
    let host_prefix = format!("{}-", crate::sys::hostname());
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some((name, owner)) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix('.'))
            .and_then(|n| n.rsplit_once(PARTIAL_MARK))
        else {
            continue;
        };
        let (owner, replaced) = match owner.strip_suffix(OLD_SUFFIX) {
            Some(owner) => (owner, true),
            None => (owner, false),
        };
        let Some(pid) = owner
            .strip_prefix(&host_prefix)
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists();
        let (path, target) = (entry.path(), parent.join(name));
        if alive || !only_store_files(&path) {
            continue;
        }
        if replaced && !target.exists() {
            fs::rename(&path, &target).map_err(|e| DataError::io(&target, e))?;
        } else {
            fs::remove_dir_all(&path).map_err(|e| DataError::io(&path, e))?;
        }
    }
    Ok(())
}

/// Whether `dir` is a folder holding nothing but the files a store is made of.
fn only_store_files(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().all(|e| {
            let name = e.file_name();
            (name == MANIFEST_FILE || name == ARRAYS_FILE)
                && e.file_type().is_ok_and(|t| t.is_file())
        })
    })
}

impl Drop for StoreBuilder {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_store(dir: &Path) -> PathBuf {
        let out = dir.join("store");
        let options = crate::data::prepare::PrepareOptions {
            out: out.clone(),
            force: false,
            split: Default::default(),
            split_seed: 0,
        };
        let config = SyntheticConfig {
            items: 12,
            size: 16,
            ..SyntheticConfig::default()
        };
        crate::data::prepare::prepare_synthetic(config, &options).unwrap();
        out
    }

    /// A prepare killed between `commit`'s two renames left the store it was replacing
    /// as `.<name>.partial-<host>-<pid>.old` and no `<name>`: the next builder in that
    /// folder renames it back, and removes such a folder beside a live `<name>`.
    #[test]
    fn a_store_a_killed_commit_was_replacing_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = small_store(dir.path());
        let dead = format!("{}-999999999", crate::sys::hostname());
        let replaced = dir
            .path()
            .join(format!(".store{PARTIAL_MARK}{dead}{OLD_SUFFIX}"));
        fs::rename(&store, &replaced).unwrap();
        let builder = StoreBuilder::new(&dir.path().join("other")).unwrap();
        drop(builder);
        assert!(!replaced.exists());
        assert!(
            Store::open(&store).is_ok(),
            "the replaced store is not back"
        );

        let copy = dir.path().join("copy");
        fs::create_dir(&copy).unwrap();
        for file in [MANIFEST_FILE, ARRAYS_FILE] {
            fs::copy(store.join(file), copy.join(file)).unwrap();
        }
        fs::rename(&copy, &replaced).unwrap();
        drop(StoreBuilder::new(&dir.path().join("other")).unwrap());
        assert!(!replaced.exists(), "a stale copy beside its store stays");
        assert!(Store::open(&store).is_ok());
    }

    /// F7: a manifest edited by hand, or arrays whose header disagrees with it, are
    /// refused when the store opens, naming the file and what is wrong.
    #[test]
    fn a_store_whose_manifest_or_header_lies_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = small_store(dir.path());
        assert!(Store::open(&store).is_ok());
        let manifest_path = store.join(MANIFEST_FILE);
        let good = fs::read_to_string(&manifest_path).unwrap();
        let mut manifest: serde_json::Value = serde_json::from_str(&good).unwrap();
        manifest["keys"].as_array_mut().unwrap().pop();
        fs::write(&manifest_path, manifest.to_string()).unwrap();
        let err = Store::open(&store).unwrap_err().to_string();
        assert!(
            err.contains("manifest.json: keys lists 11 entries for 12 items"),
            "{err}"
        );
        let mut manifest: serde_json::Value = serde_json::from_str(&good).unwrap();
        manifest["split"]["val"][0] = serde_json::json!(1_000_000_000u64);
        fs::write(&manifest_path, manifest.to_string()).unwrap();
        let err = Store::open(&store).unwrap_err().to_string();
        assert!(err.contains("split.val names item 1000000000"), "{err}");
        let mut manifest: serde_json::Value = serde_json::from_str(&good).unwrap();
        let train_item = manifest["split"]["train"][0].clone();
        manifest["split"]["val"][0] = train_item.clone();
        fs::write(&manifest_path, manifest.to_string()).unwrap();
        let err = Store::open(&store).unwrap_err().to_string();
        let shared = format!("item {train_item} is in split.train and in split.val");
        assert!(err.contains(&shared), "{err}");
        fs::write(&manifest_path, &good).unwrap();
        let arrays = store.join(ARRAYS_FILE);
        let bytes = fs::read(&arrays).unwrap();
        let at = bytes.windows(4).position(|w| w == b"\"U8\"").unwrap();
        let mut tampered = bytes.clone();
        tampered[at + 1] = b'I';
        fs::write(&arrays, tampered).unwrap();
        let err = Store::open(&store).unwrap_err().to_string();
        assert!(
            err.contains("data.safetensors") && err.contains("tensor \"masks\" is I8"),
            "{err}"
        );
    }

    /// F5: `prepare --force --out` a project folder once deleted it, and a file was
    /// moved aside; only an empty folder or a store prepare made may be replaced.
    #[test]
    fn only_a_missing_or_empty_folder_or_a_store_may_be_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert!(check_replaceable(&missing).is_ok());
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        assert!(check_replaceable(&empty).is_ok());
        let file = dir.path().join("notes.txt");
        fs::write(&file, "mine").unwrap();
        let err = check_replaceable(&file).unwrap_err().to_string();
        assert!(
            err.contains("notes.txt") && err.contains("is not a folder"),
            "{err}"
        );
        let project = dir.path().join("project");
        fs::create_dir(&project).unwrap();
        fs::write(project.join("main.rs"), "fn main() {}").unwrap();
        fs::write(project.join(MANIFEST_FILE), "{}").unwrap();
        let err = check_replaceable(&project).unwrap_err().to_string();
        assert!(
            err.contains("is not a probunet store (it holds main.rs)"),
            "{err}"
        );
        fs::remove_file(project.join("main.rs")).unwrap();
        let err = check_replaceable(&project).unwrap_err().to_string();
        assert!(err.contains("manifest.json is not one"), "{err}");
        assert!(StoreBuilder::new(&file).is_err());
        assert_eq!(fs::read_to_string(&file).unwrap(), "mine");
        assert!(project.join(MANIFEST_FILE).exists());
    }

    #[test]
    fn region_writes_straddle_chunks_and_land_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region.bin");
        let file = File::create(&path).unwrap();
        // Items of 3,000 bytes through 8 KiB chunks: most fit in place, some straddle.
        let items: Vec<Vec<u8>> = (0..23u8).map(|i| vec![i; 3000]).collect();
        let offset = 100;
        std::thread::scope(|scope| {
            let mut out = RegionWriter::new(scope, &file, &path, offset, false, 8 << 10);
            for item in &items {
                out.fill(item.len(), |bytes| {
                    bytes.copy_from_slice(item);
                    Ok(())
                })
                .unwrap();
            }
            out.append(b"tail").unwrap();
            out.finish().unwrap();
        });
        let written = fs::read(&path).unwrap();
        let mut expected = vec![0u8; offset];
        expected.extend(items.concat());
        expected.extend(b"tail");
        assert_eq!(written, expected);
    }

    #[test]
    fn a_failed_write_is_reported_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("read-only.bin");
        fs::write(&path, b"").unwrap();
        let file = File::open(&path).unwrap();
        let err = std::thread::scope(|scope| {
            let mut out = RegionWriter::new(scope, &file, &path, 0, false, 4096);
            for _ in 0..3 {
                out.append(&[1u8; 4096]).unwrap();
            }
            out.finish().unwrap_err()
        });
        assert!(err.to_string().contains("read-only.bin"), "{err}");
    }

    #[test]
    fn value_range_matches_a_plain_fold() {
        let values: Vec<f32> = (0..1003).map(|i| ((i * 37) % 101) as f32 - 50.5).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let expected = values
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        assert_eq!(value_range(&bytes), expected);
        // Misaligned bytes take the scalar path to the same answer.
        let mut shifted = vec![0u8];
        shifted.extend(&bytes);
        assert_eq!(value_range(&shifted[1..]), expected);
    }

    #[test]
    fn an_empty_split_has_a_nan_ideal_reference_that_reads_back() {
        let ideal = IdealReference {
            samples: 16,
            convention: "phiseg".into(),
            ged_val: 0.25,
            ged_test: f64::NAN,
        };
        let json = serde_json::to_string(&ideal).unwrap();
        assert!(json.contains("\"ged_test\":null"), "{json}");
        let back: IdealReference = serde_json::from_str(&json).unwrap();
        assert_eq!(back.ged_val, 0.25);
        assert!(back.ged_test.is_nan());
    }
}
