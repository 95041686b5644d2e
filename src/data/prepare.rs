//! `probunet prepare`: an LIDC pickle (or the synthetic generator) into a store.
use super::images::{self, ItemFiles, Missing};
use super::lidc::{parse_lidc_with_progress, LidcError, LidcItem};
use super::pickle::{binary_u8, finite_f32_le, ArrayView, Dtype};
use super::split::{Split, SplitFractions, SplitName};
use super::store::SourceFile;
use super::store::{
    read_manifest, write_arrays, DtypesSeen, IdealReference, Manifest, Source, Stats, StoreBuilder,
    StoreShape, FORMAT,
};
use super::synthetic::{Synthetic, SyntheticConfig};
use super::DataError;
use crate::metrics::EmptyConvention;
use memmap2::{Mmap, UncheckedAdvice};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Samples per item for the ideal-model reference (the validation GED uses as many).
pub const IDEAL_SAMPLES: usize = 16;

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// The store folder to create, e.g. `data/lidc`.
    pub out: PathBuf,
    /// Rebuild even if `out` already holds this input's store.
    pub force: bool,
    pub split: SplitFractions,
    pub split_seed: u64,
}

#[derive(Debug)]
pub enum Outcome {
    Prepared(Summary),
    /// `out` already holds a store of this input with this split; nothing was done.
    AlreadyPrepared(PathBuf),
}

/// What prepare reports at the end.
#[derive(Debug, Clone)]
pub struct Summary {
    pub dir: PathBuf,
    pub items: usize,
    pub patients: usize,
    /// (part, items, patients).
    pub parts: Vec<(SplitName, usize, usize)>,
    pub stats: Stats,
    pub seconds: f64,
    pub input_bytes: u64,
    pub ideal: Option<IdealReference>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "prepared {}", self.dir.display())?;
        writeln!(f, "  items: {}, patients: {}", self.items, self.patients)?;
        for (part, items, patients) in &self.parts {
            writeln!(f, "  {part:>5}: {items} items, {patients} patients")?;
        }
        for (part, _, _) in self.parts.iter().filter(|(_, items, _)| *items == 0) {
            writeln!(
                f,
                "  note: the {part} split is empty: {}; --split gives it a share",
                match part {
                    SplitName::Train => "training on this store has nothing to train on",
                    SplitName::Val => "training on this store cannot validate",
                    SplitName::Test => "eval --split test has nothing to score",
                }
            )?;
        }
        writeln!(
            f,
            "  image values: [{}, {}]",
            self.stats.image_min, self.stats.image_max
        )?;
        let empty: Vec<String> = self
            .stats
            .empty_mask_fraction
            .iter()
            .map(|e| format!("{:.1}%", 100.0 * e))
            .collect();
        writeln!(f, "  empty masks per annotator: {}", empty.join(", "))?;
        if let Some(ideal) = &self.ideal {
            writeln!(
                f,
                "  ideal-model GED ({} samples, {}): val {:.4}, test {:.4}",
                ideal.samples, ideal.convention, ideal.ged_val, ideal.ged_test
            )?;
        }
        let mb = self.input_bytes as f64 / 1e6;
        write!(f, "  time: {:.2} s", self.seconds)?;
        if self.input_bytes > 0 {
            write!(
                f,
                " ({mb:.1} MB read, {:.1} MB/s)",
                mb / self.seconds.max(1e-9)
            )?;
        }
        Ok(())
    }
}

/// Whether `dir` already holds the store that this source and split would make. A folder
/// holding something else is an error unless `force`: prepare never silently replaces it.
fn already_prepared(
    dir: &Path,
    source: &Source,
    options: &PrepareOptions,
) -> Result<bool, DataError> {
    super::store::check_replaceable(dir)?;
    if !dir.exists() || options.force {
        return Ok(false);
    }
    // The same content is the same input, wherever the file now lies.
    let content = |s: &Source| match s {
        Source::Pickle { files } => Source::Pickle {
            files: files
                .iter()
                .map(|f| SourceFile {
                    path: String::new(),
                    ..f.clone()
                })
                .collect(),
        },
        other => other.clone(),
    };
    let same = match read_manifest(dir) {
        Ok(m) => {
            content(&m.source) == content(source)
                && m.split.seed == options.split_seed
                && m.split.fractions == options.split
        }
        Err(_) => false,
    };
    if same {
        Ok(true)
    } else {
        Err(DataError::Store {
            path: dir.to_path_buf(),
            why: "already exists and holds another store (or another split); pass --force to replace it, or --out"
                .into(),
        })
    }
}

/// Everything about a store except its arrays, gathered before they are written.
struct Plan {
    source: Source,
    shape: StoreShape,
    dtypes_seen: DtypesSeen,
    keys: Vec<String>,
    patients: Vec<String>,
    series_uids: Vec<Option<String>>,
}

fn summarise(dir: PathBuf, manifest: &Manifest, seconds: f64, input_bytes: u64) -> Summary {
    let patients_in = |idx: &[usize]| {
        idx.iter()
            .map(|&i| &manifest.patients[i])
            .collect::<BTreeSet<_>>()
            .len()
    };
    Summary {
        dir,
        items: manifest.shape.items,
        patients: manifest.patients.iter().collect::<BTreeSet<_>>().len(),
        parts: SplitName::ALL
            .iter()
            .map(|&p| {
                let idx = manifest.split.indices(p);
                (p, idx.len(), patients_in(idx))
            })
            .collect(),
        stats: manifest.stats.clone(),
        seconds,
        input_bytes,
        ideal: manifest.ideal.clone(),
    }
}

fn manifest(options: &PrepareOptions, plan: Plan, split: Split, stats: Stats) -> Manifest {
    let scaling = plan.source.image_scaling().to_string();
    Manifest {
        format: FORMAT.to_string(),
        name: options
            .out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        created_at: chrono::Utc::now(),
        probunet_version: env!("CARGO_PKG_VERSION").to_string(),
        source: plan.source,
        shape: plan.shape,
        dtypes_seen: plan.dtypes_seen,
        keys: plan.keys,
        patients: plan.patients,
        series_uids: plan.series_uids,
        split,
        stats,
        ideal: None,
        image_scaling: Some(scaling),
    }
}

/// What the generator needs: an image size it can halve three times, and positive counts.
fn check_synthetic(config: &SyntheticConfig) -> Result<(), String> {
    if config.size < 8 || !config.size.is_multiple_of(8) {
        return Err(format!(
            "synthetic size {} must be a positive multiple of 8",
            config.size
        ));
    }
    if config.items == 0 || config.annotators == 0 {
        return Err("synthetic items and annotators must be positive".into());
    }
    Ok(())
}

/// Generates the synthetic dataset into a store, with the ideal-model GED of its val and
/// test parts in the manifest.
pub fn prepare_synthetic(
    config: SyntheticConfig,
    options: &PrepareOptions,
) -> Result<Outcome, DataError> {
    check_synthetic(&config).map_err(|why| DataError::Store {
        path: options.out.clone(),
        why,
    })?;
    let source = Source::Synthetic {
        config: config.clone(),
    };
    if already_prepared(&options.out, &source, options)? {
        return Ok(Outcome::AlreadyPrepared(options.out.clone()));
    }
    let shape = StoreShape {
        items: config.items,
        annotators: config.annotators,
        height: config.size,
        width: config.size,
    };
    shape.check_room(&options.out)?;
    let start = Instant::now();
    let data = Synthetic::new(config.clone());
    let n = data.len();
    let plan = Plan {
        source,
        shape,
        dtypes_seen: DtypesSeen {
            image: vec!["float32".into()],
            masks: vec!["uint8".into()],
        },
        keys: (0..n).map(|i| data.key(i)).collect(),
        patients: (0..n).map(|i| data.patient(i)).collect(),
        series_uids: vec![None; n],
    };
    let split = Split::by_patient(&plan.patients, options.split, options.split_seed);
    let builder = StoreBuilder::new(&options.out)?;
    let stats = write_arrays(
        &builder.arrays_path(),
        plan.shape,
        |i, bytes| {
            for (b, v) in bytes.chunks_exact_mut(4).zip(&data.item(i).image) {
                b.copy_from_slice(&v.to_le_bytes());
            }
            Ok(())
        },
        |i, buf| {
            buf.copy_from_slice(&data.item(i).masks);
            Ok(())
        },
    )?;
    let convention = EmptyConvention::default();
    let ideal = IdealReference {
        samples: IDEAL_SAMPLES,
        convention: convention.as_str().to_string(),
        ged_val: data.ideal_ged(&split.val, IDEAL_SAMPLES, convention),
        ged_test: data.ideal_ged(&split.test, IDEAL_SAMPLES, convention),
    };
    let manifest = Manifest {
        ideal: Some(ideal),
        ..manifest(options, plan, split, stats)
    };
    let dir = builder.commit(&manifest)?;
    Ok(Outcome::Prepared(summarise(
        dir,
        &manifest,
        start.elapsed().as_secs_f64(),
        0,
    )))
}

/// The pickle files behind `input`: the file itself, or a folder's `*.pickle` files in
/// name order (merged as the seed merges them).
fn pickle_files(input: &Path) -> Result<Vec<PathBuf>, DataError> {
    let meta = fs::metadata(input).map_err(|e| DataError::io(input, e))?;
    if !meta.is_dir() {
        return Ok(vec![input.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = fs::read_dir(input)
        .map_err(|e| DataError::io(input, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "pickle") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::Store {
            path: input.to_path_buf(),
            why: "holds no *.pickle files".into(),
        });
    }
    Ok(files)
}

/// Size and CRC-32C of a file, read through a small buffer (not the map, so the pass does
/// not count towards the process's resident memory).
fn fingerprint(path: &Path) -> Result<SourceFile, DataError> {
    let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut buf = vec![0u8; 8 << 20];
    let (mut crc, mut size) = (0u32, 0u64);
    loop {
        let n = file.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        size += n as u64;
    }
    Ok(SourceFile {
        path: path.display().to_string(),
        size,
        crc32c: format!("{crc:08x}"),
    })
}

/// Gives back the pages of a read-only file map that `data` (a slice of it) occupies,
/// once it has been copied out, so reading a file of any size keeps the resident set
/// small. Only whole pages inside `data` are released; they read back from the page cache
/// if touched again. Protocol 2 payloads are decoded copies outside the map and are left.
fn release(map: &Mmap, data: &[u8]) {
    let (base, at) = (map.as_ptr() as usize, data.as_ptr() as usize);
    if at < base || at + data.len() > base + map.len() {
        return;
    }
    let page = 4096;
    let from = (at - base).next_multiple_of(page);
    let to = (at - base + data.len()) / page * page;
    if to > from {
        // SAFETY: a read-only file mapping; after MADV_DONTNEED its pages read back the
        // file's contents, which no one modifies meanwhile.
        let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, from, to - from) };
    }
}

/// An array's payload as a view over `scratch`, read with pread: copying through a buffer
/// costs less than faulting in the mapping's pages and keeps them out of the resident set.
/// Payloads outside the map (protocol 2's decoded copies) are used where they are.
fn fetch<'x>(
    source: &Parsed,
    view: &'x ArrayView<'_>,
    scratch: &'x mut Vec<u8>,
) -> Result<ArrayView<'x>, DataError> {
    let lost = || DataError::Store {
        path: source.path.clone(),
        why: "an array's payload changed length while it was read".into(),
    };
    let Some(offset) = source.offset_of(view) else {
        return view.with_data(view.data()).ok_or_else(lost);
    };
    scratch.resize(view.data().len(), 0);
    source.read_at(offset, scratch)?;
    view.with_data(scratch).ok_or_else(lost)
}

/// Copies an array's payload, whose bytes are already the store's, into `out`: with pread
/// from the file (no copy through the map or a scratch buffer), or from protocol 2's
/// decoded copy.
fn read_verbatim(source: &Parsed, view: &ArrayView<'_>, out: &mut [u8]) -> Result<(), DataError> {
    match source.offset_of(view) {
        Some(offset) => source.read_at(offset, out),
        None => {
            out.copy_from_slice(view.data());
            Ok(())
        }
    }
}

/// One parsed input file.
struct Parsed<'m> {
    path: PathBuf,
    map: &'m Mmap,
    file: File,
    items: Vec<LidcItem<'m>>,
}

impl Parsed<'_> {
    /// Where in the file `view`'s payload lies; `None` for protocol 2's decoded copies,
    /// which live outside the map.
    fn offset_of(&self, view: &ArrayView<'_>) -> Option<u64> {
        let (base, at) = (self.map.as_ptr() as usize, view.data().as_ptr() as usize);
        (base..base + self.map.len())
            .contains(&at)
            .then(|| (at - base) as u64)
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<(), DataError> {
        self.file
            .read_exact_at(out, offset)
            .map_err(|e| DataError::io(&self.path, e))
    }
}

/// Reads an LIDC pickle (or a folder of them) into a store. Nothing is written unless the
/// whole input is valid: every error names the file and, where there is one, the item.
pub fn prepare_pickle(
    input: &Path,
    annotators: usize,
    options: &PrepareOptions,
) -> Result<Outcome, DataError> {
    if annotators == 0 {
        return Err(DataError::Store {
            path: input.to_path_buf(),
            why: "the mask count must be at least 1".into(),
        });
    }
    let start = Instant::now();
    let paths = pickle_files(input)?;
    // The checksums read the files through a buffer on another core while they are parsed.
    let fingerprints = std::thread::spawn({
        let paths = paths.clone();
        move || {
            paths
                .iter()
                .map(|p| fingerprint(p))
                .collect::<Result<Vec<_>, _>>()
        }
    });
    let maps = map_files(&paths)?;
    let parsed = parse_files(&paths, &maps, annotators)?;
    let files = fingerprints
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    let source = Source::Pickle {
        files: files.clone(),
    };
    if already_prepared(&options.out, &source, options)? {
        return Ok(Outcome::AlreadyPrepared(options.out.clone()));
    }
    let plan = plan_pickle(&parsed, source, annotators)?;
    // The items own their keys and UIDs, and the arrays are read with pread, so the maps'
    // pages (fault-around brings in 64 KiB around every opcode read) can go.
    for p in &parsed {
        release(p.map, p.map);
    }
    let split = Split::by_patient(&plan.patients, options.split, options.split_seed);
    plan.shape.check_room(&options.out)?;
    let builder = StoreBuilder::new(&options.out)?;
    let stats = write_pickle_arrays(&builder.arrays_path(), plan.shape, &parsed)?;
    let manifest = manifest(options, plan, split, stats);
    let dir = builder.commit(&manifest)?;
    let input_bytes = files.iter().map(|f| f.size).sum();
    Ok(Outcome::Prepared(summarise(
        dir,
        &manifest,
        start.elapsed().as_secs_f64(),
        input_bytes,
    )))
}

/// Read-only maps of the input files, one per path.
fn map_files(paths: &[PathBuf]) -> Result<Vec<Mmap>, DataError> {
    paths
        .iter()
        .map(|p| {
            let file = File::open(p).map_err(|e| DataError::io(p, e))?;
            // SAFETY: read-only map of an input the user hands us; we only read it.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(p, e))?;
            Ok(map)
        })
        .collect()
}

/// Parses each mapped file, giving back the pages the parser has passed so the resident
/// set stays small, and keeps a handle on the file for reading the arrays with pread.
fn parse_files<'m>(
    paths: &[PathBuf],
    maps: &'m [Mmap],
    annotators: usize,
) -> Result<Vec<Parsed<'m>>, DataError> {
    let mut parsed = Vec::with_capacity(maps.len());
    for (path, map) in paths.iter().zip(maps) {
        let mut give_back = |pos: usize| release(map, &map[..pos.min(map.len())]);
        let items =
            parse_lidc_with_progress(map, annotators, &mut give_back).map_err(|source| {
                DataError::Lidc {
                    path: path.clone(),
                    source,
                }
            })?;
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        parsed.push(Parsed {
            path: path.clone(),
            map,
            file,
            items,
        });
    }
    Ok(parsed)
}

/// Writes the parsed items' images and masks, in store order, into the store's arrays.
fn write_pickle_arrays(
    path: &Path,
    shape: StoreShape,
    parsed: &[Parsed],
) -> Result<Stats, DataError> {
    // Items in store order, with the file each came from.
    let items: Vec<(&Parsed, &LidcItem)> = parsed
        .iter()
        .flat_map(|p| p.items.iter().map(move |i| (p, i)))
        .collect();
    let mut images = ImageWriter::new(shape.pixels());
    let mut masks = MaskWriter::new(shape.pixels());
    write_arrays(
        path,
        shape,
        |i, bytes| {
            let (file, item) = items[i];
            images.write(file, item, bytes)
        },
        |i, bytes| {
            let (file, item) = items[i];
            masks.write(file, item, bytes)
        },
    )
}

/// An item's error, named with the file the item is in.
fn lidc_error(file: &Parsed, source: LidcError) -> DataError {
    DataError::Lidc {
        path: file.path.clone(),
        source,
    }
}

/// Puts an item's image into the store's little-endian f32 bytes. The buffers are kept
/// across items so that images in another layout are converted without allocating.
struct ImageWriter {
    scratch: Vec<u8>,
    values: Vec<f32>,
}

impl ImageWriter {
    fn new(pixels: usize) -> Self {
        Self {
            scratch: Vec::new(),
            values: vec![0f32; pixels],
        }
    }

    fn write(&mut self, file: &Parsed, item: &LidcItem, bytes: &mut [u8]) -> Result<(), DataError> {
        if item.image.is_verbatim_f32() {
            read_verbatim(file, &item.image, bytes)?;
            if finite_f32_le(bytes) {
                return Ok(());
            }
        }
        // Another layout, or a value to name: convert element-wise.
        fetch(file, &item.image, &mut self.scratch)?
            .write_f32(&mut self.values)
            .map_err(|source| {
                lidc_error(
                    file,
                    LidcError::Image {
                        key: item.key.to_owned(),
                        source,
                    },
                )
            })?;
        for (b, v) in bytes.chunks_exact_mut(4).zip(&self.values) {
            b.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }
}

/// Puts an item's masks, one after another, into the store's 0/1 bytes; the scratch
/// buffer is kept across items for masks in another layout.
struct MaskWriter {
    pixels: usize,
    scratch: Vec<u8>,
}

impl MaskWriter {
    fn new(pixels: usize) -> Self {
        Self {
            pixels,
            scratch: Vec::new(),
        }
    }

    fn write(&mut self, file: &Parsed, item: &LidcItem, bytes: &mut [u8]) -> Result<(), DataError> {
        for (index, (mask, out)) in item
            .masks
            .iter()
            .zip(bytes.chunks_exact_mut(self.pixels))
            .enumerate()
        {
            if mask.is_verbatim_u8_mask() {
                read_verbatim(file, mask, out)?;
                if binary_u8(out) {
                    continue;
                }
            }
            fetch(file, mask, &mut self.scratch)?
                .write_u8_mask(out)
                .map_err(|source| {
                    lidc_error(
                        file,
                        LidcError::Mask {
                            key: item.key.to_owned(),
                            index,
                            source,
                        },
                    )
                })?;
        }
        Ok(())
    }
}

/// Keys, patients, shapes and dtypes of the merged files; a key in two files, or files of
/// different image shapes, is an error naming both.
fn plan_pickle(parsed: &[Parsed], source: Source, annotators: usize) -> Result<Plan, DataError> {
    let first = &parsed[0];
    let shape = first.items[0].image.shape().to_vec();
    let mut seen: HashMap<&str, &Path> =
        HashMap::with_capacity(parsed.iter().map(|p| p.items.len()).sum());
    let mut plan = Plan {
        source,
        shape: StoreShape {
            items: 0,
            annotators,
            height: shape[0],
            width: shape[1],
        },
        dtypes_seen: DtypesSeen::default(),
        keys: Vec::new(),
        patients: Vec::new(),
        series_uids: Vec::new(),
    };
    let (mut image_dtypes, mut mask_dtypes) = (HashSet::new(), HashSet::new());
    for p in parsed {
        for item in &p.items {
            if let Some(other) = seen.insert(&item.key, &p.path) {
                return Err(DataError::Store {
                    path: p.path.clone(),
                    why: format!("item {:?} is also in {}", item.key, other.display()),
                });
            }
            if item.image.shape() != shape.as_slice() {
                return Err(DataError::Store {
                    path: p.path.clone(),
                    why: format!(
                        "item {:?} has shape {:?} but {} has {:?}",
                        item.key,
                        item.image.shape(),
                        first.path.display(),
                        shape
                    ),
                });
            }
            image_dtypes.insert(item.image.dtype());
            mask_dtypes.extend(item.masks.iter().map(|m| m.dtype()));
            plan.keys.push(item.key.clone());
            plan.patients.push(item.patient.clone());
            plan.series_uids.push(item.series_uid.clone());
        }
    }
    plan.shape.items = plan.keys.len();
    let names = |dtypes: HashSet<Dtype>| {
        let names: BTreeSet<String> = dtypes.iter().map(Dtype::to_string).collect();
        names.into_iter().collect()
    };
    plan.dtypes_seen = DtypesSeen {
        image: names(image_dtypes),
        masks: names(mask_dtypes),
    };
    Ok(plan)
}

/// Your own data for [`prepare_images`]: a folder with `images/` and `masks/<annotator>/`,
/// or a CSV manifest.
#[derive(Debug, Clone)]
pub struct ImagesInput {
    pub path: PathBuf,
    /// The patient of each image from its id: the first capture group, or the whole match.
    pub patient_regex: Option<String>,
    pub missing: Missing,
}

/// Whether `path` is your own data rather than a pickle: a CSV, or a folder with `images/`.
pub fn is_images_input(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
        || path.join("images").is_dir()
}

/// Builds a store from PNG images and masks, with the same split, manifest and atomic
/// build as a pickle's.
pub fn prepare_images(input: &ImagesInput, options: &PrepareOptions) -> Result<Outcome, DataError> {
    let at = |why: String| DataError::Store {
        path: input.path.clone(),
        why,
    };
    let regex = match &input.patient_regex {
        Some(r) => Some(regex::Regex::new(r).map_err(|e| at(format!("--patient-regex {r}: {e}")))?),
        None => None,
    };
    let (items, annotators) = match input.path.is_file() {
        true => images::from_csv(&input.path, regex.as_ref(), input.missing),
        false => images::from_folder(&input.path, regex.as_ref(), input.missing),
    }
    .map_err(at)?;
    check_unique_ids(&items).map_err(at)?;
    let (source, bytes) = images_source(&input.path, &items, annotators)?;
    if already_prepared(&options.out, &source, options)? {
        return Ok(Outcome::AlreadyPrepared(options.out.clone()));
    }
    let start = Instant::now();
    let (height, width) = common_size(&items)?;
    let shape = StoreShape {
        items: items.len(),
        annotators: items[0].masks.len(),
        height,
        width,
    };
    shape.check_room(&options.out)?;
    let plan = Plan {
        source,
        shape,
        dtypes_seen: DtypesSeen {
            image: vec!["png".into()],
            masks: vec!["png".into()],
        },
        keys: items.iter().map(|i| i.id.clone()).collect(),
        patients: items.iter().map(|i| i.patient.clone()).collect(),
        series_uids: vec![None; items.len()],
    };
    let split = Split::by_patient(&plan.patients, options.split, options.split_seed);
    let builder = StoreBuilder::new(&options.out)?;
    let stats = write_arrays(
        &builder.arrays_path(),
        shape,
        |i, out| write_png_image(&items[i], shape, out),
        |i, out| write_png_masks(&items[i], shape, out),
    )?;
    let manifest = manifest(options, plan, split, stats);
    let dir = builder.commit(&manifest)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(Outcome::Prepared(summarise(dir, &manifest, seconds, bytes)))
}

fn check_unique_ids(items: &[ItemFiles]) -> Result<(), String> {
    let mut seen = HashMap::new();
    for item in items {
        if let Some(first) = seen.insert(item.id.as_str(), &item.image) {
            return Err(format!(
                "image id {} is both {} and {}; ids (file stems) must be unique",
                item.id,
                first.display(),
                item.image.display()
            ));
        }
    }
    Ok(())
}

/// The record of the input: every file's contents in order, hashed.
fn images_source(
    path: &Path,
    items: &[ItemFiles],
    annotators: Vec<String>,
) -> Result<(Source, u64), DataError> {
    let (mut crc, mut bytes, mut files) = (0u32, 0u64, 0usize);
    for item in items {
        for file in std::iter::once(&item.image).chain(item.masks.iter().flatten()) {
            let data = fs::read(file).map_err(|e| DataError::io(file, e))?;
            crc = crc32c::crc32c_append(crc, &data);
            bytes += data.len() as u64;
            files += 1;
        }
    }
    let source = Source::Images {
        path: path.display().to_string(),
        annotators,
        files,
        bytes,
        crc32c: format!("{crc:08x}"),
    };
    Ok((source, bytes))
}

fn png_error(path: &Path, why: String) -> DataError {
    DataError::Store {
        path: path.to_path_buf(),
        why,
    }
}

/// The one size every image and mask has; the first that differs is named.
fn common_size(items: &[ItemFiles]) -> Result<(usize, usize), DataError> {
    let size_of = |path: &Path| {
        let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
        images::png_size(&bytes).map_err(|why| png_error(path, why))
    };
    let first = size_of(&items[0].image)?;
    for item in items {
        for file in std::iter::once(&item.image).chain(item.masks.iter().flatten()) {
            let size = size_of(file)?;
            if size != first {
                return Err(png_error(
                    file,
                    format!(
                        "is {}x{} (height x width) but {} is {}x{}: every image and mask of a store has one size",
                        size.0, size.1, items[0].image.display(), first.0, first.1
                    ),
                ));
            }
        }
    }
    Ok(first)
}

/// Refuses a file whose size changed since the store's size was read from the headers.
fn check_decoded(path: &Path, got: (usize, usize), shape: StoreShape) -> Result<(), DataError> {
    if got == (shape.height, shape.width) {
        return Ok(());
    }
    Err(png_error(
        path,
        format!(
            "is now {}x{} (height x width), not the {}x{} it was when prepare began: was it \
             changed during prepare?",
            got.0, got.1, shape.height, shape.width
        ),
    ))
}

fn write_png_image(item: &ItemFiles, shape: StoreShape, out: &mut [u8]) -> Result<(), DataError> {
    let bytes = fs::read(&item.image).map_err(|e| DataError::io(&item.image, e))?;
    let (h, w, pixels) = images::decode_grey(&bytes).map_err(|why| png_error(&item.image, why))?;
    check_decoded(&item.image, (h, w), shape)?;
    for (b, v) in out.chunks_exact_mut(4).zip(&pixels) {
        b.copy_from_slice(&v.to_le_bytes());
    }
    Ok(())
}

fn write_png_masks(item: &ItemFiles, shape: StoreShape, out: &mut [u8]) -> Result<(), DataError> {
    let pixels = shape.height * shape.width;
    for (mask, slot) in item.masks.iter().zip(out.chunks_exact_mut(pixels)) {
        match mask {
            Some(path) => {
                let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
                let (h, w, values) =
                    images::decode_mask(&bytes).map_err(|why| png_error(path, why))?;
                check_decoded(path, (h, w), shape)?;
                slot.copy_from_slice(&values);
            }
            None => slot.fill(0),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG rewritten at another size between the header pass and the write (the store's
    /// shape comes from the first) is refused by name instead of panicking or leaving
    /// another item's bytes in the buffer.
    #[test]
    fn a_png_that_changed_size_during_prepare_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let mut bytes = Vec::new();
        let mut e = png::Encoder::new(&mut bytes, 4, 2);
        e.set_color(png::ColorType::Grayscale);
        let mut w = e.write_header().unwrap();
        w.write_image_data(&[0; 8]).unwrap();
        w.finish().unwrap();
        fs::write(&path, bytes).unwrap();
        let item = ItemFiles {
            id: "x".into(),
            image: path.clone(),
            masks: vec![Some(path.clone())],
            patient: "x".into(),
        };
        let shape = StoreShape {
            items: 1,
            annotators: 1,
            height: 4,
            width: 4,
        };
        let mut out = vec![0u8; 16 * 4];
        let image = write_png_image(&item, shape, &mut out)
            .unwrap_err()
            .to_string();
        let mask = write_png_masks(&item, shape, &mut out[..16])
            .unwrap_err()
            .to_string();
        for err in [image, mask] {
            assert!(err.contains("x.png"), "{err}");
            assert!(
                err.contains("is now 2x4 (height x width), not the 4x4"),
                "{err}"
            );
        }
    }
}
