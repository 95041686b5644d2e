//! A small TensorBoard event-file writer: scalars, PNG images and the HParams
//! dashboard's records, in the format TensorBoard 2.x reads
//! (`shared/spec/tensorboard.md`). Written in-house because `tensorboard-rs`
//! lost buffered data on exit, let two writers truncate each other's file,
//! panicked on I/O errors and cannot write HParams.

mod proto;
mod record;

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use proto::hparams_plugin_data::Data as HParamsData;
use proto::summary_value::Kind as ValueKind;

const FILE_VERSION: &str = "brain.Event:2";
const HPARAMS_PLUGIN_NAME: &str = "hparams";
/// The only version TensorBoard's HParams plugin accepts.
const HPARAMS_PLUGIN_DATA_VERSION: i32 = 0;
const EXPERIMENT_TAG: &str = "_hparams_/experiment";
const SESSION_START_INFO_TAG: &str = "_hparams_/session_start_info";
const SESSION_END_INFO_TAG: &str = "_hparams_/session_end_info";
const TEXT_PLUGIN_NAME: &str = "text";
const CUSTOM_SCALARS_PLUGIN_NAME: &str = "custom_scalars";
/// The tag the custom-scalars plugin reads its layout from.
const CUSTOM_SCALARS_TAG: &str = "custom_scalars__config__";
/// Bounds the search for a free file name so a misbehaving file system that
/// reports every name as taken cannot hang the caller.
const MAX_NAME_ATTEMPTS: u32 = 1000;

/// Everything that can go wrong while writing events; I/O failures name the
/// file or folder involved so that a full disk or a bad log path is obvious.
#[derive(Debug, thiserror::Error)]
pub enum TensorboardError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid image: {0}")]
    InvalidImage(String),
    #[error("cannot encode PNG")]
    Png(#[from] png::EncodingError),
}

/// How every event file's name starts, the mark TensorBoard finds them by.
const EVENT_FILE_PREFIX: &str = "events.out.tfevents.";

/// Whether `dir` itself (not its subfolders) holds an event file.
pub fn holds_event_file(dir: &Path) -> io::Result<bool> {
    for entry in fs::read_dir(dir)? {
        if entry?
            .file_name()
            .to_string_lossy()
            .starts_with(EVENT_FILE_PREFIX)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> TensorboardError {
    TensorboardError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Appends events to one new `events.out.tfevents.*` file.
///
/// Writes are buffered; [`EventWriter::flush`] (or [`EventWriter::close`], or
/// dropping the writer) pushes them to disk and fsyncs, so a training loop can
/// log every step cheaply and flush at checkpoints.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
    /// Whether records were written since the last successful flush, so that
    /// repeated flushes and the one on drop skip needless fsyncs.
    dirty: bool,
    /// Whether an event besides the header was written: a writer dropped without one (a
    /// resume or eval that failed before logging) removes its file rather than leave an
    /// empty event file beside the run's real ones.
    logged: bool,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, named
    /// `events.out.tfevents.<unix_secs>.<hostname>.<pid>.<n>` with the smallest
    /// `n` not taken; the file is opened create-new so that another writer in
    /// the same folder and second never truncates it. The `brain.Event:2`
    /// header is written and flushed at once so TensorBoard sees the run.
    pub fn create(dir: impl AsRef<Path>) -> Result<Self, TensorboardError> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|source| io_error("create folder", dir, source))?;
        let prefix = format!(
            "{EVENT_FILE_PREFIX}{}.{}.{}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            hostname(),
            std::process::id()
        );
        let (file, path) = create_event_file(dir, &prefix)?;
        let mut writer = Self {
            path,
            out: BufWriter::new(file),
            dirty: false,
            logged: false,
        };
        let header = writer
            .write_event(0, proto::event::What::FileVersion(FILE_VERSION.into()))
            .and_then(|()| writer.flush());
        if let Err(e) = header {
            // A file without its header (a full disk) is not an event file: leave none.
            writer.dirty = false;
            let _ = fs::remove_file(&writer.path);
            return Err(e);
        }
        Ok(writer)
    }

    /// The event file this writer appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs one scalar; TensorBoard stores scalars as `f32`.
    pub fn add_scalar(
        &mut self,
        tag: &str,
        value: impl Into<f64>,
        step: i64,
    ) -> Result<(), TensorboardError> {
        self.add_scalars(step, &[(tag, value.into())])
    }

    /// Logs several scalars of the same step as one event, which is smaller
    /// and faster than one event each.
    pub fn add_scalars<S, V>(
        &mut self,
        step: i64,
        values: &[(S, V)],
    ) -> Result<(), TensorboardError>
    where
        S: AsRef<str>,
        V: Copy + Into<f64>,
    {
        let values = values
            .iter()
            .map(|(tag, value)| proto::SummaryValue {
                tag: tag.as_ref().to_owned(),
                metadata: None,
                value: Some(ValueKind::SimpleValue((*value).into() as f32)),
            })
            .collect();
        self.write_summary(step, values)
    }

    /// Logs an image, PNG-encoded.
    pub fn add_image(
        &mut self,
        tag: &str,
        step: i64,
        image: &Image,
    ) -> Result<(), TensorboardError> {
        let value = proto::SummaryValue {
            tag: tag.to_owned(),
            metadata: None,
            value: Some(ValueKind::Image(proto::SummaryImage {
                height: image.height as i32,
                width: image.width as i32,
                colorspace: i32::from(image.channels),
                encoded_image_string: image.to_png()?,
            })),
        };
        self.write_summary(step, vec![value])
    }

    /// Logs markdown text (tables included) for the Text dashboard.
    pub fn add_text(
        &mut self,
        tag: &str,
        step: i64,
        markdown: &str,
    ) -> Result<(), TensorboardError> {
        let value = plugin_value(
            tag,
            TEXT_PLUGIN_NAME,
            string_tensor(markdown.as_bytes().to_vec()),
        );
        self.write_summary(step, vec![value])
    }

    /// Lays out the custom-scalars dashboard: categories of charts, each combining
    /// several tags. TensorBoard merges the layouts of all runs by category title, so
    /// every run can write the same one.
    pub fn add_custom_scalars_layout(
        &mut self,
        categories: &[(&str, Vec<LayoutChart>)],
    ) -> Result<(), TensorboardError> {
        let layout = proto::Layout {
            version: 0,
            category: categories
                .iter()
                .map(|(title, charts)| proto::Category {
                    title: (*title).to_owned(),
                    chart: charts
                        .iter()
                        .map(|c| proto::Chart {
                            title: c.title.clone(),
                            multiline: Some(proto::MultilineChartContent {
                                tag: c.tags.clone(),
                            }),
                        })
                        .collect(),
                    closed: false,
                })
                .collect(),
        };
        let tensor = string_tensor(layout.encode_to_vec());
        let value = plugin_value(CUSTOM_SCALARS_TAG, CUSTOM_SCALARS_PLUGIN_NAME, tensor);
        self.write_summary(0, vec![value])
    }

    /// Declares the sweep's hyperparameters and metrics for the HParams
    /// dashboard; written once, in the sweep's root folder, so that the
    /// dashboard shows the domains and which scalar tags are metrics.
    pub fn add_hparams_experiment<S: AsRef<str>>(
        &mut self,
        hparams: &[HParamSpec],
        metric_tags: &[S],
    ) -> Result<(), TensorboardError> {
        let experiment = proto::Experiment {
            time_created_secs: unix_secs_f64(SystemTime::now()),
            hparam_infos: hparams.iter().map(HParamSpec::to_proto).collect(),
            metric_infos: metric_tags
                .iter()
                .map(|tag| proto::MetricInfo {
                    name: Some(proto::MetricName {
                        group: String::new(),
                        tag: tag.as_ref().to_owned(),
                    }),
                })
                .collect(),
        };
        self.write_hparams(EXPERIMENT_TAG, HParamsData::Experiment(experiment))
    }

    /// Records this trial's hyperparameters, which makes its run folder a
    /// session in the HParams dashboard. Trials sharing `group_name` are
    /// aggregated; an empty name makes the session its own group.
    pub fn add_hparams_session_start(
        &mut self,
        hparams: &[(String, HParamValue)],
        group_name: &str,
        start_time: SystemTime,
    ) -> Result<(), TensorboardError> {
        let info = proto::SessionStartInfo {
            hparams: hparams
                .iter()
                .map(|(name, value)| (name.clone(), value.to_proto()))
                .collect(),
            group_name: group_name.to_owned(),
            start_time_secs: unix_secs_f64(start_time),
        };
        self.write_hparams(SESSION_START_INFO_TAG, HParamsData::SessionStartInfo(info))
    }

    /// Records how and when the trial ended.
    pub fn add_hparams_session_end(
        &mut self,
        status: SessionStatus,
        end_time: SystemTime,
    ) -> Result<(), TensorboardError> {
        let info = proto::SessionEndInfo {
            status: status as i32,
            end_time_secs: unix_secs_f64(end_time),
        };
        self.write_hparams(SESSION_END_INFO_TAG, HParamsData::SessionEndInfo(info))
    }

    /// Marks a restart after `step`, the step of the checkpoint a run resumes from:
    /// TensorBoard then discards what the interrupted process logged after it (a START
    /// at s drops every event at steps >= s, so the marker is at `step + 1` and the
    /// checkpoint's own step stays), so no step is shown twice.
    pub fn add_restart(&mut self, step: i64, checkpoint: &str) -> Result<(), TensorboardError> {
        let step = step + 1;
        let log = proto::SessionLog {
            status: 1,
            checkpoint_path: checkpoint.to_owned(),
            msg: String::new(),
        };
        self.write_event(step, proto::event::What::SessionLog(log))
    }

    /// Writes buffered events to the file and fsyncs it, so they survive a
    /// crash or power loss after this returns.
    pub fn flush(&mut self) -> Result<(), TensorboardError> {
        if !self.dirty {
            return Ok(());
        }
        self.out
            .flush()
            .map_err(|source| io_error("write", &self.path, source))?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|source| io_error("sync", &self.path, source))?;
        self.dirty = false;
        Ok(())
    }

    /// Flushes and closes the file, reporting the errors that dropping the
    /// writer would have to ignore.
    pub fn close(mut self) -> Result<(), TensorboardError> {
        self.flush()
    }

    /// HParams records carry their payload in the summary metadata; the value
    /// itself is the empty float tensor of shape `[0]` that TensorBoard's own
    /// writer uses.
    fn write_hparams(&mut self, tag: &str, data: HParamsData) -> Result<(), TensorboardError> {
        let content = proto::HParamsPluginData {
            version: HPARAMS_PLUGIN_DATA_VERSION,
            data: Some(data),
        }
        .encode_to_vec();
        let value = proto::SummaryValue {
            tag: tag.to_owned(),
            metadata: Some(proto::SummaryMetadata {
                plugin_data: Some(proto::PluginData {
                    plugin_name: HPARAMS_PLUGIN_NAME.to_owned(),
                    content,
                }),
            }),
            value: Some(ValueKind::Tensor(null_tensor())),
        };
        self.write_summary(0, vec![value])
    }

    fn write_summary(
        &mut self,
        step: i64,
        value: Vec<proto::SummaryValue>,
    ) -> Result<(), TensorboardError> {
        self.write_event(step, proto::event::What::Summary(proto::Summary { value }))
    }

    fn write_event(&mut self, step: i64, what: proto::event::What) -> Result<(), TensorboardError> {
        let event = proto::Event {
            wall_time: unix_secs_f64(SystemTime::now()),
            step,
            what: Some(what),
        };
        self.logged |= !matches!(event.what, Some(proto::event::What::FileVersion(_)));
        self.dirty = true;
        record::write_record(&mut self.out, &event.encode_to_vec())
            .map_err(|source| io_error("write", &self.path, source))
    }
}

impl Drop for EventWriter {
    /// Flushes so that events logged just before exit are not lost (errors cannot be
    /// reported here, call [`EventWriter::close`] to see them); a file that holds only
    /// its header is removed.
    fn drop(&mut self) {
        match self.logged {
            true => drop(self.flush()),
            false => drop(fs::remove_file(&self.path)),
        }
    }
}

/// Opens `<prefix>.<n>` for the smallest free `n`, never truncating a file.
fn create_event_file(dir: &Path, prefix: &str) -> Result<(File, PathBuf), TensorboardError> {
    let mut suffix = 0;
    loop {
        let path = dir.join(format!("{prefix}.{suffix}"));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((file, path)),
            Err(e)
                if e.kind() == io::ErrorKind::AlreadyExists && suffix + 1 < MAX_NAME_ATTEMPTS =>
            {
                suffix += 1;
            }
            Err(source) => return Err(io_error("create", &path, source)),
        }
    }
}

/// The machine's name for the file name, as TensorFlow's writer puts it there;
/// characters that could break the path are replaced.
fn hostname() -> String {
    crate::sys::hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn unix_secs_f64(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A tensor value that `plugin` reads.
fn plugin_value(tag: &str, plugin: &str, tensor: proto::TensorProto) -> proto::SummaryValue {
    proto::SummaryValue {
        tag: tag.to_owned(),
        metadata: Some(proto::SummaryMetadata {
            plugin_data: Some(proto::PluginData {
                plugin_name: plugin.to_owned(),
                content: Vec::new(),
            }),
        }),
        value: Some(ValueKind::Tensor(tensor)),
    }
}

fn null_tensor() -> proto::TensorProto {
    proto::TensorProto {
        dtype: proto::DT_FLOAT,
        tensor_shape: Some(proto::TensorShapeProto {
            dim: vec![proto::TensorShapeDim { size: 0 }],
        }),
        string_val: Vec::new(),
    }
}

/// A scalar string tensor: how the text and custom-scalars plugins store their data.
fn string_tensor(bytes: Vec<u8>) -> proto::TensorProto {
    proto::TensorProto {
        dtype: proto::DT_STRING,
        tensor_shape: Some(proto::TensorShapeProto { dim: Vec::new() }),
        string_val: vec![bytes],
    }
}

/// A chart of TensorBoard's custom-scalars dashboard: the lines of every tag matching one
/// of `tags` (regular expressions), of every run, in one chart.
#[derive(Clone, Debug, PartialEq)]
pub struct LayoutChart {
    pub title: String,
    pub tags: Vec<String>,
}

/// A hyperparameter value as the HParams dashboard stores it
/// (`google.protobuf.Value`): numbers are `f64`.
#[derive(Clone, Debug, PartialEq)]
pub enum HParamValue {
    Number(f64),
    String(String),
    Bool(bool),
}

impl HParamValue {
    fn to_proto(&self) -> proto::Value {
        use proto::value::Kind;
        let kind = match self {
            Self::Number(x) => Kind::Number(*x),
            Self::String(s) => Kind::String(s.clone()),
            Self::Bool(b) => Kind::Bool(*b),
        };
        proto::Value { kind: Some(kind) }
    }
}

impl From<f64> for HParamValue {
    fn from(x: f64) -> Self {
        Self::Number(x)
    }
}

impl From<f32> for HParamValue {
    fn from(x: f32) -> Self {
        Self::Number(x.into())
    }
}

impl From<i64> for HParamValue {
    fn from(x: i64) -> Self {
        Self::Number(x as f64)
    }
}

impl From<usize> for HParamValue {
    fn from(x: usize) -> Self {
        Self::Number(x as f64)
    }
}

impl From<bool> for HParamValue {
    fn from(b: bool) -> Self {
        Self::Bool(b)
    }
}

impl From<&str> for HParamValue {
    fn from(s: &str) -> Self {
        Self::String(s.to_owned())
    }
}

impl From<String> for HParamValue {
    fn from(s: String) -> Self {
        Self::String(s)
    }
}

/// `tensorboard.hparams.Status` of a finished (or still running) trial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionStatus {
    Success = 1,
    Failure = 2,
    Running = 3,
}

/// One hyperparameter of a sweep, for [`EventWriter::add_hparams_experiment`].
#[derive(Clone, Debug, PartialEq)]
pub struct HParamSpec {
    pub name: String,
    pub domain: HParamDomain,
}

/// The type and the values a hyperparameter may take; the dashboard uses the
/// domain to build its filters.
#[derive(Clone, Debug, PartialEq)]
pub enum HParamDomain {
    /// Any real number.
    Float64,
    /// A real number in `[min, max]`.
    Float64Interval {
        min: f64,
        max: f64,
    },
    /// One of these numbers.
    Float64Values(Vec<f64>),
    /// Any string.
    String,
    /// One of these strings.
    StringValues(Vec<String>),
    Bool,
}

impl HParamSpec {
    fn to_proto(&self) -> proto::HParamInfo {
        use proto::h_param_info::Domain;
        let list = |values: Vec<HParamValue>| {
            Some(Domain::Discrete(proto::ListValue {
                values: values.iter().map(HParamValue::to_proto).collect(),
            }))
        };
        let (data_type, domain) = match &self.domain {
            HParamDomain::Float64 => (proto::DATA_TYPE_FLOAT64, None),
            HParamDomain::Float64Interval { min, max } => (
                proto::DATA_TYPE_FLOAT64,
                Some(Domain::Interval(proto::Interval {
                    min_value: *min,
                    max_value: *max,
                })),
            ),
            HParamDomain::Float64Values(values) => (
                proto::DATA_TYPE_FLOAT64,
                list(values.iter().copied().map(HParamValue::from).collect()),
            ),
            HParamDomain::String => (proto::DATA_TYPE_STRING, None),
            HParamDomain::StringValues(values) => (
                proto::DATA_TYPE_STRING,
                list(
                    values
                        .iter()
                        .map(|s| HParamValue::from(s.as_str()))
                        .collect(),
                ),
            ),
            HParamDomain::Bool => (
                proto::DATA_TYPE_BOOL,
                list(vec![HParamValue::Bool(false), HParamValue::Bool(true)]),
            ),
        };
        proto::HParamInfo {
            name: self.name.clone(),
            r#type: data_type,
            domain,
        }
    }
}

/// An 8-bit image, row-major: `height x width` grey or `height x width x 3` RGB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    height: u32,
    width: u32,
    /// 1 (grey) or 3 (RGB); equals the summary's `colorspace`.
    channels: u8,
    pixels: Vec<u8>,
}

impl Image {
    /// A grey image from `height * width` pixels.
    pub fn grey(height: usize, width: usize, pixels: Vec<u8>) -> Result<Self, TensorboardError> {
        Self::new(height, width, 1, pixels)
    }

    /// An RGB image from `height * width * 3` interleaved bytes.
    pub fn rgb(height: usize, width: usize, pixels: Vec<u8>) -> Result<Self, TensorboardError> {
        Self::new(height, width, 3, pixels)
    }

    /// Checks the sizes here so that encoding and the summary's `i32` fields
    /// cannot fail or wrap later.
    fn new(
        height: usize,
        width: usize,
        channels: u8,
        pixels: Vec<u8>,
    ) -> Result<Self, TensorboardError> {
        let (h, w) = image_dims(height, width)?;
        let expected = height * width * usize::from(channels);
        if pixels.len() != expected {
            return Err(TensorboardError::InvalidImage(format!(
                "{height}x{width}x{channels} needs {expected} bytes, got {}",
                pixels.len()
            )));
        }
        Ok(Self {
            height: h,
            width: w,
            channels,
            pixels,
        })
    }

    pub fn height(&self) -> usize {
        self.height as usize
    }

    pub fn width(&self) -> usize {
        self.width as usize
    }

    /// 1 for grey, 3 for RGB.
    pub fn channels(&self) -> usize {
        usize::from(self.channels)
    }

    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// Encodes as PNG with balanced compression: figures are mostly flat colour, a few
    /// tens of KB each, and encoding one takes milliseconds.
    pub fn to_png(&self) -> Result<Vec<u8>, TensorboardError> {
        let mut png_bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut png_bytes, self.width, self.height);
        encoder.set_color(if self.channels == 3 {
            png::ColorType::Rgb
        } else {
            png::ColorType::Grayscale
        });
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Balanced);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&self.pixels)?;
        writer.finish()?;
        Ok(png_bytes)
    }
}

/// Validates image sizes: non-zero (PNG forbids empty images), at most
/// `i32::MAX` (the summary's field type) and small enough to allocate.
fn image_dims(height: usize, width: usize) -> Result<(u32, u32), TensorboardError> {
    let fits = |n: usize| n > 0 && i32::try_from(n).is_ok();
    if !fits(height)
        || !fits(width)
        || width
            .checked_mul(3)
            .and_then(|n| n.checked_mul(height))
            .is_none()
    {
        return Err(TensorboardError::InvalidImage(format!(
            "size {height}x{width} must be positive and at most {} per side",
            i32::MAX
        )));
    }
    Ok((height as u32, width as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("probunet-tb-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    /// Splits a file into record payloads, checking both CRCs of each.
    fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let (len_bytes, tail) = rest.split_at(8);
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(tail[..4], record::masked_crc32c(len_bytes).to_le_bytes());
            let (payload, tail) = tail[4..].split_at(len);
            assert_eq!(tail[..4], record::masked_crc32c(payload).to_le_bytes());
            out.push(payload.to_vec());
            rest = &tail[4..];
        }
        out
    }

    fn events(path: &Path) -> Vec<proto::Event> {
        records(&fs::read(path).unwrap())
            .iter()
            .map(|r| proto::Event::decode(r.as_slice()).unwrap())
            .collect()
    }

    fn summary(event: &proto::Event) -> &[proto::SummaryValue] {
        match &event.what {
            Some(proto::event::What::Summary(s)) => &s.value,
            other => panic!("expected a summary, got {other:?}"),
        }
    }

    #[test]
    fn file_name_follows_scheme() {
        let dir = temp_dir("name");
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let writer = EventWriter::create(&dir).unwrap();
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let name = writer
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(writer.path().parent().unwrap(), dir);
        let rest = name.strip_prefix("events.out.tfevents.").unwrap();
        let (secs, rest) = rest.split_once('.').unwrap();
        let secs: u64 = secs.parse().unwrap();
        assert!((before..=after).contains(&secs), "{name}");
        let host_pid_suffix = format!("{}.{}.0", hostname(), std::process::id());
        assert_eq!(rest, host_pid_suffix);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn taken_names_are_skipped_not_truncated() {
        let dir = temp_dir("taken");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("p.0"), "keep").unwrap();
        fs::write(dir.join("p.1"), "keep").unwrap();
        let (_, path) = create_event_file(&dir, "p").unwrap();
        assert_eq!(path, dir.join("p.2"));
        assert_eq!(fs::read_to_string(dir.join("p.0")).unwrap(), "keep");
        assert_eq!(fs::read_to_string(dir.join("p.1")).unwrap(), "keep");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// TensorFlow's `Event.session_log` is field 7 (6 is the deprecated `log_message`,
    /// which TensorBoard ignores); the marker sits one past the checkpoint's step.
    #[test]
    fn a_restart_is_a_session_log_start_in_field_7_after_the_checkpoint_step() {
        let dir = temp_dir("restart");
        let mut writer = EventWriter::create(&dir).unwrap();
        writer.add_restart(200, "ckpt").unwrap();
        let path = writer.path().to_owned();
        writer.close().unwrap();
        let payloads = records(&fs::read(&path).unwrap());
        let marker = &payloads[1];
        // wall_time (key 0x09, 8 bytes), step (key 0x10, varint 201 = c9 01), then the
        // key of field 7, length-delimited: 7 << 3 | 2 = 0x3a.
        assert_eq!((marker[0], marker[9]), (0x09, 0x10), "{marker:?}");
        assert_eq!(marker[10..13], [0xc9, 0x01, 0x3a], "{marker:?}");
        let event = proto::Event::decode(marker.as_slice()).unwrap();
        assert_eq!(event.step, 201);
        match event.what {
            Some(proto::event::What::SessionLog(log)) => assert_eq!(log.status, 1),
            other => panic!("expected a session log, got {other:?}"),
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn header_then_scalars() {
        let dir = temp_dir("scalars");
        let mut writer = EventWriter::create(&dir).unwrap();
        writer.add_scalar("train_loss", 0.25f32, 3).unwrap();
        writer
            .add_scalars(4, &[("beta", 1.5), ("val_kl", 2.0)])
            .unwrap();
        let path = writer.path().to_owned();
        writer.close().unwrap();
        let events = events(&path);
        assert_eq!(events.len(), 3);
        assert_eq!(
            events[0].what,
            Some(proto::event::What::FileVersion(FILE_VERSION.into()))
        );
        assert_eq!(events[1].step, 3);
        let scalars: Vec<_> = events[1..]
            .iter()
            .flat_map(|e| {
                summary(e)
                    .iter()
                    .map(move |v| (e.step, v.tag.as_str(), v.value.clone()))
            })
            .collect();
        assert_eq!(
            scalars,
            [
                (3, "train_loss", Some(ValueKind::SimpleValue(0.25))),
                (4, "beta", Some(ValueKind::SimpleValue(1.5))),
                (4, "val_kl", Some(ValueKind::SimpleValue(2.0))),
            ]
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn drop_flushes_buffered_events() {
        let dir = temp_dir("drop");
        let mut writer = EventWriter::create(&dir).unwrap();
        writer.add_scalar("rec_loss", 1.0, 0).unwrap();
        let path = writer.path().to_owned();
        drop(writer);
        assert_eq!(events(&path).len(), 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn io_error_names_the_path() {
        let dir = temp_dir("blocked");
        fs::write(&dir, "a file, not a folder").unwrap();
        let err = EventWriter::create(dir.join("run")).unwrap_err();
        assert!(err.to_string().contains(&*dir.to_string_lossy()), "{err}");
        fs::remove_file(&dir).unwrap();
    }

    /// Bytes of `tensorboard.plugins.hparams.metadata.NULL_TENSOR.SerializeToString()`.
    #[test]
    fn null_tensor_matches_tensorboard() {
        assert_eq!(
            null_tensor().encode_to_vec(),
            [0x08, 0x01, 0x12, 0x02, 0x12, 0x00]
        );
    }

    #[test]
    fn hparams_session_start_layout() {
        let dir = temp_dir("hparams");
        let mut writer = EventWriter::create(&dir).unwrap();
        let hparams = [
            ("lr".to_owned(), HParamValue::from(1e-4)),
            ("kl".to_owned(), HParamValue::from("analytic")),
            ("bn".to_owned(), HParamValue::from(true)),
        ];
        let start = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        writer
            .add_hparams_session_start(&hparams, "g", start)
            .unwrap();
        let path = writer.path().to_owned();
        writer.close().unwrap();
        let events = events(&path);
        let value = &summary(&events[1])[0];
        assert_eq!(value.tag, SESSION_START_INFO_TAG);
        assert_eq!(value.value, Some(ValueKind::Tensor(null_tensor())));
        let plugin = value
            .metadata
            .as_ref()
            .unwrap()
            .plugin_data
            .as_ref()
            .unwrap();
        assert_eq!(plugin.plugin_name, "hparams");
        let data = proto::HParamsPluginData::decode(plugin.content.as_slice()).unwrap();
        assert_eq!(data.version, 0);
        let Some(HParamsData::SessionStartInfo(info)) = data.data else {
            panic!("expected session_start_info, got {:?}", data.data);
        };
        assert_eq!(info.group_name, "g");
        assert_eq!(info.start_time_secs, 1_700_000_000.0);
        assert_eq!(info.hparams.len(), 3);
        assert_eq!(info.hparams["kl"], HParamValue::from("analytic").to_proto());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn png_round_trips() {
        let pixels: Vec<u8> = (0..2 * 3 * 3).map(|i| i as u8 * 10).collect();
        let image = Image::rgb(2, 3, pixels.clone()).unwrap();
        let png_bytes = image.to_png().unwrap();
        let decoder = png::Decoder::new(io::Cursor::new(png_bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.height, info.width), (2, 3));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(&buf[..info.buffer_size()], pixels);
    }

    #[test]
    fn a_writer_that_logged_nothing_leaves_no_file() {
        let dir = temp_dir("unused");
        let unused = EventWriter::create(&dir).unwrap();
        let path = unused.path().to_path_buf();
        // TensorBoard sees the file while the writer lives.
        assert!(path.is_file());
        drop(unused);
        assert!(!path.exists());
        let mut used = EventWriter::create(&dir).unwrap();
        used.add_scalar("loss", 1.0, 0).unwrap();
        let path = used.path().to_path_buf();
        used.close().unwrap();
        assert_eq!(records(&fs::read(&path).unwrap()).len(), 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn image_size_is_checked() {
        assert!(Image::grey(2, 2, vec![0; 3]).is_err());
        assert!(Image::rgb(2, 2, vec![0; 4]).is_err());
        assert!(Image::grey(0, 2, vec![]).is_err());
        assert!(Image::grey(2, 2, vec![0; 4]).is_ok());
    }
}
